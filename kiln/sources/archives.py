"""Safe extraction of .tar(.gz/.bz2/.xz) and .zip archives: nothing lands outside the target folder.

Every member is checked before anything is written, so a bad archive leaves nothing behind: absolute paths, `..`
components, device files and links pointing outside are refused, and the declared uncompressed total must fit
`max_bytes` (zip bombs). Members are then written as plain files by streamed copies that count every byte; a link
that stays inside the archive is written as a copy of its target, so the extracted tree holds no links at all.
"""

from __future__ import annotations

import lzma
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from kiln.errors import DataError

ARCHIVE_HINT = "a .tar.gz, .tgz, .tar or .zip archive"
_CHUNK_BYTES = 1 << 20
# What a damaged compressed stream raises from tarfile/zipfile/gzip while reading.
# (RuntimeError: an encrypted zip member.)
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, RuntimeError)


@dataclass(frozen=True)
class _Member:
    name: str  # clean relative posix path inside the archive
    kind: Literal["file", "dir", "link"]
    size: int
    link_target: str | None  # for links: the clean path, inside the archive, of what it points to
    open: Callable[[], IO[bytes] | None]  # the member's bytes (a link's: its target's); None for folders


def extract_archive(archive: Path, destination: Path, max_bytes: int) -> list[dict[str, str]]:
    """Extract `archive` into the existing folder `destination`; returns members not extracted, with reasons.

    Raises DataError for an empty, unreadable or unrecognised file, for an unsafe member (naming it) and when the
    archive unpacks to more than `max_bytes`.
    """
    with _open_members(archive) as members:
        by_name = {member.name: member for member in members}
        _check_total_size(archive, members, by_name, max_bytes)
        budget = _Budget(archive, max_bytes)
        skipped = []
        for member in members:
            reason = _extract_member(archive, member, by_name, destination, budget)
            if reason:
                skipped.append({"source": member.name, "reason": reason})
    return skipped


def is_archive_name(name: str) -> bool:
    return name.lower().endswith((".tar.gz", ".tgz", ".tar", ".zip", ".tar.bz2", ".tar.xz"))


@contextmanager
def _open_members(archive: Path) -> Iterator[list[_Member]]:
    if archive.stat().st_size == 0:
        raise DataError(f"{archive} is empty (0 bytes); expected {ARCHIVE_HINT}")
    # Detected by content, not by name: a download's URL need not end in .zip.
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as opened:
                yield _zip_members(archive, opened)
            return
        if _is_tarfile(archive):
            with tarfile.open(archive) as opened:
                yield _tar_members(archive, opened)
            return
    except _READ_ERRORS as error:
        raise DataError(
            f"{archive} cannot be read ({error.__class__.__name__}: {error}); it is probably corrupt or truncated"
        ) from None
    raise DataError(f"{archive} is not {ARCHIVE_HINT} (it could not be read as one)")


def _is_tarfile(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except _READ_ERRORS:  # e.g. a .gz that is not a tar inside, or a damaged gzip header
        return False


def _tar_members(archive: Path, opened: tarfile.TarFile) -> list[_Member]:
    members = []
    for info in opened.getmembers():
        name = _safe_name(archive, info.name)
        if not name:
            continue  # the archive's own root, "./"
        if info.isdir():
            kind, target = "dir", None
        elif info.isreg():
            kind, target = "file", None
        elif info.issym():  # relative to the link's own folder
            relative_to_root = posixpath.join(posixpath.dirname(name), info.linkname)
            kind, target = "link", _safe_link_target(archive, name, relative_to_root, info.linkname)
        elif info.islnk():  # hard links name their target from the archive root
            kind, target = "link", _safe_link_target(archive, name, info.linkname, info.linkname)
        else:
            raise DataError(f"{archive}: member {info.name!r} is a device file or FIFO; refusing to extract it")
        # tarfile resolves a link's target by name inside the archive, never through the filesystem.
        members.append(_Member(name, kind, info.size, target, lambda info=info: opened.extractfile(info)))
    return members


def _zip_members(archive: Path, opened: zipfile.ZipFile) -> list[_Member]:
    members = []
    for info in opened.infolist():
        name = _safe_name(archive, info.filename)
        if not name:
            continue
        mode = info.external_attr >> 16  # unix mode bits, when the zip was made on unix
        if info.is_dir() or stat.S_ISDIR(mode):
            members.append(_Member(name, "dir", 0, None, lambda: None))
        elif stat.S_ISLNK(mode):
            link_text = opened.read(info).decode("utf-8", errors="replace")  # a zip symlink stores its target
            relative_to_root = posixpath.join(posixpath.dirname(name), link_text)
            target = _safe_link_target(archive, name, relative_to_root, link_text)
            members.append(_Member(name, "link", 0, target, lambda target=target: _open_zip_target(opened, target)))
        elif mode and not stat.S_ISREG(mode):
            raise DataError(f"{archive}: member {info.filename!r} is a device file or FIFO; refusing to extract it")
        else:
            members.append(_Member(name, "file", info.file_size, None, lambda info=info: opened.open(info)))
    return members


def _open_zip_target(opened: zipfile.ZipFile, target: str) -> IO[bytes] | None:
    try:
        info = opened.getinfo(target)
    except KeyError:
        return None
    if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
        return None  # links to folders or to other links are not followed
    return opened.open(info)


def _safe_name(archive: Path, raw_name: str) -> str:
    """The member's path as clean relative posix parts; DataError for absolute paths and `..` components."""
    unified = raw_name.replace("\\", "/")  # zips written on Windows may use backslashes
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise DataError(
            f"{archive}: member {raw_name!r} has an absolute path; refusing an archive that writes outside its folder"
        )
    parts = [part for part in unified.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise DataError(
            f"{archive}: member {raw_name!r} contains '..'; refusing an archive that writes outside its folder"
        )
    return "/".join(parts)


def _safe_link_target(archive: Path, name: str, joined: str, raw_target: str) -> str:
    target = posixpath.normpath(joined.replace("\\", "/"))
    if raw_target.startswith("/") or target == ".." or target.startswith("../"):
        raise DataError(
            f"{archive}: link {name!r} points outside the archive (to {raw_target!r}); refusing to extract it"
        )
    return target


def _check_total_size(archive: Path, members: list[_Member], by_name: dict[str, _Member], max_bytes: int) -> None:
    total = 0
    for member in members:
        if member.kind == "file":
            total += member.size
        elif member.kind == "link" and member.link_target in by_name:
            total += by_name[member.link_target].size
    if total > max_bytes:
        raise DataError(
            f"{archive} would unpack to {total:,} bytes, over data.max_archive_bytes={max_bytes:,}; "
            f"raise it with --set data.max_archive_bytes=N if you trust this archive"
        )


class _Budget:
    """Bytes still allowed; enforced while copying because declared sizes can lie."""

    def __init__(self, archive: Path, max_bytes: int):
        self.archive, self.max_bytes, self.left = archive, max_bytes, max_bytes

    def spend(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise DataError(
                f"{self.archive} unpacks to more than data.max_archive_bytes={self.max_bytes:,} "
                f"(more than its headers declare); refusing it"
            )


def _extract_member(
    archive: Path, member: _Member, by_name: dict[str, _Member], destination: Path, budget: _Budget
) -> str | None:
    """Write one member under `destination`; returns why it was skipped, or None."""
    path = destination.joinpath(*member.name.split("/"))
    try:
        if member.kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            return None
        if member.kind == "link" and by_name.get(member.link_target or "", member).kind != "file":
            return f"link to {member.link_target!r}, which is not a file in the archive"
        try:
            source = member.open()
        except KeyError:  # tarfile finds a hard link's target only among the members before it
            source = None
        if source is None:
            return f"link to {member.link_target!r}, which is not a file in the archive"
        path.parent.mkdir(parents=True, exist_ok=True)
        with source, open(path, "wb") as out:
            while chunk := source.read(_CHUNK_BYTES):
                budget.spend(len(chunk))
                out.write(chunk)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise DataError(
            f"{archive}: member {member.name!r} clashes with another member of the same path (a file and a folder)"
        ) from None
    except _READ_ERRORS as error:
        raise DataError(
            f"{archive}: member {member.name!r} cannot be extracted ({error.__class__.__name__}: {error}); "
            f"the archive is probably corrupt or truncated"
        ) from None
    return None
