"""Bad archives, through the download stage: each is refused with a DataError naming the archive (and the member)
before anything is read from it, and nothing lands outside a folder or in the store."""

from __future__ import annotations

import struct
import tarfile
import numpy as np

from kiln.errors import DataError
from tasks.download import download
from tests.bad_inputs.conftest import fails_cleanly, imagefolder, tar_gz, two_classes, zip_archive

WRITES_OUTSIDE = "refusing an archive that writes outside its folder"
PROBABLY_CORRUPT = "it is probably corrupt or truncated: re-create or re-download it"
ARCHIVE_KINDS = "a .tar.gz, .tgz, .tar or .zip archive"
_ZIP_CENTRAL_HEADER = b"PK\x01\x02"
_UNCOMPRESSED_SIZE_IN_CENTRAL_HEADER = 24  # byte offsets of the declared size in the zip headers
_UNCOMPRESSED_SIZE_IN_LOCAL_HEADER = 22


def test_member_with_dot_dot(store, tmp_path):
    archive = tmp_path / "pets.tar.gz"
    archive.write_bytes(tar_gz({**two_classes(), "../kiln-bad-inputs-evil.png": b"evil"}))
    with fails_cleanly(store.root, DataError,
                       f"{archive}: member '../kiln-bad-inputs-evil.png' contains '..'", WRITES_OUTSIDE):  # fmt: skip
        download(imagefolder(archive), store)
    assert not (tmp_path.parent / "kiln-bad-inputs-evil.png").exists()


def test_absolute_member(store, tmp_path):
    escape = tmp_path / "outside" / "evil.png"
    archive = tmp_path / "pets.tar.gz"
    archive.write_bytes(tar_gz({**two_classes(), str(escape): b"evil"}))
    with fails_cleanly(store.root, DataError, f"{archive}: member '{escape}' has an absolute path", WRITES_OUTSIDE):
        download(imagefolder(archive), store)
    assert not escape.parent.exists()


def test_tar_symlink_escaping(store, tmp_path):
    link = tarfile.TarInfo("cat/passwd.png")
    link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    archive = tmp_path / "pets.tar.gz"
    archive.write_bytes(tar_gz(two_classes(), extra_members=(link,)))
    with fails_cleanly(store.root, DataError,
                       f"{archive}: link 'cat/passwd.png' points outside the archive (to '../../etc/passwd'); "
                       "refusing the archive"):  # fmt: skip
        download(imagefolder(archive), store)


def test_zip_bomb(store, tmp_path):
    members = {**two_classes(), "cat/zeros.png": bytes(4 * 1024 * 1024)}
    archive = tmp_path / "pets.zip"
    archive.write_bytes(zip_archive(members))
    assert archive.stat().st_size < 32 * 1024  # 4 MiB of zeros compress to a few KiB
    declared = sum(len(data) for data in members.values())
    with fails_cleanly(store.root, DataError,
                       f"{archive} would unpack to {declared:,} bytes, over data.max_archive_bytes=1,048,576",
                       "raise it with --set data.max_archive_bytes=N if you trust this archive"):  # fmt: skip
        download(imagefolder(archive, max_archive_bytes=1024 * 1024), store)


def test_zip_member_whose_header_lies_about_its_size(store, tmp_path):
    # Both headers declare 1,000 bytes for 1 MiB of zeros, so the declared total passes data.max_archive_bytes;
    # reading stops at the declared size and the checksum of what was read gives the lie away.
    # The member comes first, so its headers are the first local and the first central header in the file.
    honest = bytearray(zip_archive({"cat/zeros.png": bytes(1024 * 1024), **two_classes()}))
    struct.pack_into("<I", honest, _UNCOMPRESSED_SIZE_IN_LOCAL_HEADER, 1000)
    struct.pack_into("<I", honest, honest.index(_ZIP_CENTRAL_HEADER) + _UNCOMPRESSED_SIZE_IN_CENTRAL_HEADER, 1000)
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(honest))
    with fails_cleanly(store.root, DataError,
                       f"{liar}: member 'cat/zeros.png' cannot be read (BadZipFile: Bad CRC-32 for file "
                       f"'cat/zeros.png'); the archive is probably corrupt or truncated: re-create or re-download it"):  # fmt: skip
        download(imagefolder(liar, max_archive_bytes=64 * 1024), store)


def test_zero_byte_archive(store, tmp_path):
    archive = tmp_path / "pets.tar.gz"
    archive.write_bytes(b"")
    with fails_cleanly(store.root, DataError, f"{archive} is empty (0 bytes); expected {ARCHIVE_KINDS}"):
        download(imagefolder(archive), store)


def test_tar_gz_that_is_not_an_archive(store, tmp_path):
    archive = tmp_path / "pets.tar.gz"
    archive.write_text("a page of notes saved under the wrong name\n" * 20)
    with fails_cleanly(store.root, DataError, f"{archive} is not {ARCHIVE_KINDS} (it could not be read as one)"):
        download(imagefolder(archive), store)


def test_truncated_tar_gz(store, tmp_path):
    rng = np.random.default_rng(0)  # noise does not compress, so half the file is half the members
    members = {f"{name}/{index}.png": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
               for name in ("cat", "dog") for index in range(3)}  # fmt: skip
    whole = tar_gz(members)
    archive = tmp_path / "pets.tar.gz"
    archive.write_bytes(whole[: len(whole) // 2])
    with fails_cleanly(store.root, DataError,
                       f"{archive} cannot be read (EOFError: Compressed file ended before the end-of-stream marker "
                       f"was reached); {PROBABLY_CORRUPT}"):  # fmt: skip
        download(imagefolder(archive), store)

