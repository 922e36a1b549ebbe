"""Safe reading of .tar(.gz/.bz2/.xz) and .zip archives member by member, in memory, never extracting to disk.

Every member is checked when the archive is opened, so a bad archive is refused before anything is read from it:
absolute paths, `..` components, device files and links pointing outside raise DataError, and the declared
uncompressed total must fit `max_bytes` (zip bombs); a member holding more than it declares is refused when read.
A link that stays inside the archive reads as its target's bytes.

Nothing is written, so nothing can land outside a folder; and reading tens of thousands of small images from
memory is far faster than creating them as files (on the 2-core development machines, `tar xzf` of the shared
60,000-JPEG CIFAR-10 archive takes about a minute; listing and reading it here takes about six seconds).
"""

from __future__ import annotations

import lzma
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kiln.errors import DataError

ARCHIVE_HINT = "a .tar.gz, .tgz, .tar or .zip archive"
_MAX_LINK_BYTES = 4096  # a zip symlink's target is its content: read no more than a path could need
# What a damaged compressed stream raises from tarfile/zipfile/gzip/bz2/lzma (RuntimeError: an encrypted zip).
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, RuntimeError)


@dataclass(frozen=True)
class _File:
    name: str  # clean relative posix path
    size: int  # declared uncompressed size (a link's: its target's)
    open: Callable[[], IO[bytes]]  # a link's opens its target


@dataclass
class ArchiveContents:
    """The checked members of an open archive: files to read, folders, and members that will not be read."""

    path: Path
    files: list[_File] = field(default_factory=list)  # in archive order: the fast order to read a compressed tar
    folders: set[str] = field(default_factory=set)  # every folder, including those only implied by a file's path
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source": member, "reason": ...}

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of the named files, in archive order. DataError for a damaged member or one holding more
        bytes than its header declares (the declared sizes are what max_bytes was checked against)."""
        wanted = set(names)
        for member in self.files:
            if member.name in wanted:
                yield member.name, self._read_one(member)

    def _read_one(self, member: _File) -> bytes:
        try:
            with member.open() as handle:
                data = handle.read(member.size + 1)  # one byte more than declared tells a lying header apart
        except _READ_ERRORS as error:
            raise DataError(
                f"{self.path}: member {member.name!r} cannot be read ({error.__class__.__name__}: {error}); "
                f"the archive is probably corrupt or truncated: re-create or re-download it"
            ) from None
        if len(data) > member.size:
            raise DataError(f"{self.path}: member {member.name!r} holds more than its declared size; refusing it")
        return data


@contextmanager
def open_archive(archive: Path, max_bytes: int) -> Iterator[ArchiveContents]:
    """Open `archive` (detected by content, not name) with every member checked; see the module docstring.

    Raises DataError for an empty, unreadable or unrecognised file, for an unsafe member (naming it) and when the
    members declare more than `max_bytes` in all.
    """
    if archive.stat().st_size == 0:
        raise DataError(f"{archive} is empty (0 bytes); expected {ARCHIVE_HINT}")
    # Tar first: zip detection looks for a trailer anywhere in the last 64 KiB, which a plain .tar that happens to
    # end with a .zip member also has.
    if _is_tarfile(archive):
        opener, list_members = tarfile.open, _tar_members
    elif zipfile.is_zipfile(archive):
        opener, list_members = zipfile.ZipFile, _zip_members
    else:
        raise DataError(f"{archive} is not {ARCHIVE_HINT} (it could not be read as one)")
    try:
        opened = opener(archive)
    except _READ_ERRORS as error:
        raise _unreadable(archive, error) from None
    with opened:
        try:  # around our own reads only: errors from the caller's block must not be relabelled
            entries = list_members(archive, opened)
        except _READ_ERRORS as error:
            raise _unreadable(archive, error) from None
        yield _checked(archive, entries, max_bytes)


def _unreadable(archive: Path, error: Exception) -> DataError:
    return DataError(
        f"{archive} cannot be read ({error.__class__.__name__}: {error}); it is probably corrupt or truncated: re-create or re-download it"
    )


def _is_tarfile(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except _READ_ERRORS:  # e.g. a .gz that is not a tar inside, or a damaged gzip header
        return False


@dataclass(frozen=True)
class _Entry:
    """One member as listed, before links are resolved."""

    name: str
    kind: str  # "file", "folder" or "link"
    size: int
    open: Callable[[], IO[bytes]] | None  # files only
    link_target: str | None = None  # links only: a clean path inside the archive


def _tar_members(archive: Path, opened: tarfile.TarFile) -> list[_Entry]:
    entries = []
    for info in opened.getmembers():
        name = _safe_name(archive, info.name)
        if not name:
            continue  # the archive's own root, "./"
        if info.isdir():
            entries.append(_Entry(name, "folder", 0, None))
        elif info.isreg():
            entries.append(_Entry(name, "file", info.size, lambda info=info: opened.extractfile(info)))
        elif info.issym():  # relative to the link's own folder
            joined = posixpath.join(posixpath.dirname(name), info.linkname)
            entries.append(_Entry(name, "link", 0, None, _safe_link_target(archive, name, joined, info.linkname)))
        elif info.islnk():  # a hard link names its target from the archive's root
            target = _safe_link_target(archive, name, info.linkname, info.linkname)
            entries.append(_Entry(name, "link", 0, None, target))
        else:
            raise DataError(f"{archive}: member {info.name!r} is a device file or FIFO; refusing the archive")
    return entries


def _zip_members(archive: Path, opened: zipfile.ZipFile) -> list[_Entry]:
    entries = []
    for info in opened.infolist():
        name = _safe_name(archive, info.filename)
        if not name:
            continue
        mode = info.external_attr >> 16  # unix mode bits, when the zip was made on unix
        if info.is_dir() or stat.S_ISDIR(mode):
            entries.append(_Entry(name, "folder", 0, None))
        elif stat.S_ISLNK(mode):
            with opened.open(info) as handle:
                link_text = handle.read(_MAX_LINK_BYTES).decode("utf-8", errors="replace")
            joined = posixpath.join(posixpath.dirname(name), link_text)
            entries.append(_Entry(name, "link", 0, None, _safe_link_target(archive, name, joined, link_text)))
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no file type recorded, a plain file
            raise DataError(f"{archive}: member {info.filename!r} is a device file or FIFO; refusing the archive")
        else:
            entries.append(_Entry(name, "file", info.file_size, lambda info=info: opened.open(info)))
    return entries


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
            f"{archive}: link {name!r} points outside the archive (to {raw_target!r}); refusing the archive"
        )
    return target


def _checked(archive: Path, entries: list[_Entry], max_bytes: int) -> ArchiveContents:
    """Resolve links to the files they name, collect folders, and enforce the declared-size budget."""
    by_name = {entry.name: entry for entry in entries if entry.kind == "file"}
    contents = ArchiveContents(archive)
    files: dict[str, _File] = {}  # a name archived twice: the later member wins, as when extracting
    for entry in entries:
        if entry.kind == "folder":
            contents.folders.add(entry.name)
            continue
        target = by_name.get(entry.link_target or "") if entry.kind == "link" else entry
        if target is None or target.open is None:
            reason = f"link to {entry.link_target!r}, which is not a file in the archive"
            contents.skipped.append({"source": entry.name, "reason": reason})
            continue
        files[entry.name] = _File(entry.name, target.size, target.open)
    contents.files = list(files.values())
    for member in contents.files:
        parent = posixpath.dirname(member.name)
        while parent and parent not in contents.folders:
            contents.folders.add(parent)
            parent = posixpath.dirname(parent)
    declared = sum(member.size for member in contents.files)
    if declared > max_bytes:
        raise DataError(
            f"{archive} would unpack to {declared:,} bytes, over data.max_archive_bytes={max_bytes:,}; "
            f"raise it with --set data.max_archive_bytes=N if you trust this archive"
        )
    return contents
