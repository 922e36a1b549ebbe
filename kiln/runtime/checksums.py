"""sha256 of files, and checking a folder against the file list of its manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from .errors import IntegrityError


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(directory: Path, entries: Iterable[tuple[str, str]], remedy: str) -> None:
    """Check that every (relative path, sha256) exists under `directory` with that sha256.

    Raises IntegrityError naming the first missing or differing file, followed by `remedy` (what to do).
    """
    for relative_path, expected in entries:
        path = directory / relative_path
        if not path.is_file():
            raise IntegrityError(f"{path} is missing; {remedy}")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{path} is corrupted: sha256 {actual[:12]}… differs from the manifest's {expected[:12]}…; {remedy}"
            )
