"""Files for tests that feed the download stage: a tree written to disk, or an in-memory archive."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write {relative path: bytes} under `root` (folders created as needed); returns `root`."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def tar_gz(files: dict[str, bytes], extra_members: tuple[tarfile.TarInfo, ...] = ()) -> bytes:
    """A .tar.gz of regular files plus hand-made members (links, devices) that tarfile would never write for a real
    tree, for the safety tests."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for member in extra_members:
            tar.addfile(member)
    return buffer.getvalue()


def zip_archive(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()
