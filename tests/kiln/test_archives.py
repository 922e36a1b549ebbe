"""Safe archive reading: members are checked before anything is read, and nothing is ever written to disk."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import pytest

from kiln.errors import DataError
from kiln.sources.archives import open_archive
from tests.support.archives import tar_gz

MiB = 1024 * 1024


def write_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    path.write_bytes(tar_gz(files, tuple(extra)))
    return path


def write_zip(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # S_IFLNK: how unix zip tools store a symlink
            archive.writestr(info, target)
    return path


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def read_all(path: Path, max_bytes: int = 64 * MiB) -> tuple[dict[str, bytes], set[str], list[dict[str, str]]]:
    with open_archive(path, max_bytes) as contents:
        data = dict(contents.read(member.name for member in contents.files))
        return data, contents.folders, contents.skipped


@pytest.mark.parametrize("writer, suffix", [(write_tar, ".tar.gz"), (write_zip, ".zip")])
def test_reads_members_by_clean_relative_name(tmp_path, writer, suffix):
    archive = writer(tmp_path / f"data{suffix}", {"./pets/cat/a.png": b"cat", "pets/dog/b.png": b"dog!"})

    data, folders, skipped = read_all(archive)

    assert data == {"pets/cat/a.png": b"cat", "pets/dog/b.png": b"dog!"}
    assert folders == {"pets", "pets/cat", "pets/dog"}
    assert skipped == []


def test_format_is_detected_by_content_not_name(tmp_path):
    archive = write_zip(tmp_path / "download", {"a/x.png": b"x"})  # a URL's file name need not end in .zip
    assert read_all(archive)[0] == {"a/x.png": b"x"}


def test_zip_backslash_names_become_folders(tmp_path):
    archive = write_zip(tmp_path / "windows.zip", {"cats\\a.png": b"a"})
    assert read_all(archive)[0] == {"cats/a.png": b"a"}


@pytest.mark.parametrize(
    "writer, member, message",
    [
        (write_tar, "../evil.png", "contains '..'"),
        (write_tar, "cats/../../evil.png", "contains '..'"),
        (write_tar, "/tmp/evil.png", "absolute path"),
        (write_zip, "../evil.png", "contains '..'"),
        (write_zip, "/evil.png", "absolute path"),
        (write_zip, "C:/evil.png", "absolute path"),
    ],
)
def test_members_escaping_the_folder_are_refused(tmp_path, writer, member, message):
    archive = writer(tmp_path / "evil.archive", {"cats/ok.png": b"ok", member: b"evil"})
    with pytest.raises(DataError, match=message) as raised:
        read_all(archive)
    assert member in str(raised.value)
    assert not any(path.name == "evil.png" for path in tmp_path.parent.rglob("evil.png"))


@pytest.mark.parametrize(
    "entry",
    [
        link("cats/escape.png", "../../outside.png"),
        link("cats/escape.png", "/etc/passwd"),
        link("cats/escape.png", "../../../etc/passwd", tarfile.LNKTYPE),
    ],
)
def test_tar_links_pointing_outside_are_refused(tmp_path, entry):
    archive = write_tar(tmp_path / "links.tar.gz", {"cats/ok.png": b"ok"}, [entry])
    with pytest.raises(DataError, match="points outside the archive"):
        read_all(archive)


def test_zip_symlink_pointing_outside_is_refused(tmp_path):
    archive = write_zip(tmp_path / "links.zip", {"cats/ok.png": b"ok"}, {"cats/escape.png": "../../etc/passwd"})
    with pytest.raises(DataError, match="points outside the archive"):
        read_all(archive)


def test_links_inside_read_as_their_target_and_dangling_ones_are_skipped(tmp_path):
    extra = [link("cats/copy.png", "a.png"), link("cats/hard.png", "cats/a.png", tarfile.LNKTYPE),
             link("cats/dangling.png", "missing.png")]  # fmt: skip
    archive = write_tar(tmp_path / "links.tar.gz", {"cats/a.png": b"pixels"}, extra)

    data, _, skipped = read_all(archive)

    assert data == {"cats/a.png": b"pixels", "cats/copy.png": b"pixels", "cats/hard.png": b"pixels"}
    assert [row["source"] for row in skipped] == ["cats/dangling.png"]
    assert "not a file in the archive" in skipped[0]["reason"]


def test_zip_symlink_inside_reads_as_its_target(tmp_path):
    archive = write_zip(tmp_path / "links.zip", {"cats/a.png": b"pixels"}, {"cats/b.png": "a.png"})
    assert read_all(archive)[0] == {"cats/a.png": b"pixels", "cats/b.png": b"pixels"}


def test_device_files_are_refused(tmp_path):
    device = tarfile.TarInfo("cats/null")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    archive = write_tar(tmp_path / "device.tar.gz", {"cats/ok.png": b"ok"}, [device])
    with pytest.raises(DataError, match="device file"):
        read_all(archive)


def test_zip_bomb_is_refused_before_reading(tmp_path):
    archive = write_zip(tmp_path / "bomb.zip", {"cats/zeros.png": bytes(4 * MiB)})
    assert archive.stat().st_size < 64 * 1024  # tiny on disk, 4 MiB unpacked

    with pytest.raises(DataError, match=r"would unpack to 4,194,304 bytes.*data\.max_archive_bytes=1,048,576"):
        read_all(archive, max_bytes=MiB)


def test_links_count_towards_the_size_limit(tmp_path):
    extra = [link(f"cats/copy{index}.png", "a.png") for index in range(8)]
    archive = write_tar(tmp_path / "links.tar.gz", {"cats/a.png": bytes(MiB)}, extra)
    with pytest.raises(DataError, match="would unpack to 9,437,184 bytes"):
        read_all(archive, max_bytes=4 * MiB)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"is empty \(0 bytes\)"):
        read_all(tmp_path / "empty.tar.gz")


def test_non_archive_is_refused(tmp_path):
    (tmp_path / "notes.zip").write_text("just some text, not an archive\n" * 20)
    with pytest.raises(DataError, match="is not a .tar.gz, .tgz, .tar or .zip archive"):
        read_all(tmp_path / "notes.zip")


def test_truncated_archive_is_refused(tmp_path):
    whole = write_tar(tmp_path / "whole.tar.gz", {f"cats/{index}.png": bytes(range(256)) * 64 for index in range(20)})
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_all(cut)


def test_errors_raised_by_the_caller_are_not_relabelled(tmp_path):
    archive = write_tar(tmp_path / "ok.tar.gz", {"cats/a.png": b"a"})
    with pytest.raises(FileNotFoundError), open_archive(archive, MiB):
        raise FileNotFoundError("the caller's own problem")
