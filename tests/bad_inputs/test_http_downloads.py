"""Bad downloads, from a server on 127.0.0.1: final failures are DataError (the task does not retry them), transient
ones DownloadError (it does); either way no `.part` file survives, in the store or in the download's scratch."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest

from kiln.config import DataConfig
from kiln.errors import DataError, DownloadError
from tasks.download import download
from tests.bad_inputs.conftest import fails_cleanly, imagefolder
from tests.support.http_server import serve_http


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temp folder the sources download into (and must clean up), watched by the test."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def download_leftovers(scratch: Path) -> list[Path]:
    """The sources' own temp folders (kiln-imagefolder-*, kiln-cifar10-*) and partial files; other libraries'
    caches (torch's) may live there too."""
    return sorted([*scratch.glob("kiln-*"), *scratch.rglob("*.part")])


def test_http_404(store, scratch):
    with serve_http() as server:
        url = server.url("/pets.tar.gz")
        with fails_cleanly(store.root, DataError,
                           f"{url} answered HTTP 404 Not Found",
                           "check data.uri (nothing is served at that address)"):  # fmt: skip
            download(imagefolder(url), store)
        assert server.requests == ["/pets.tar.gz"]
    assert download_leftovers(scratch) == []


def test_http_500(store, scratch):
    with serve_http() as server:
        server.fail("/pets.tar.gz", 500)
        url = server.url("/pets.tar.gz")
        with fails_cleanly(store.root, DownloadError,
                           f"{url} answered HTTP 500 Internal Server Error",
                           "the server may recover (transient failures are retried)"):  # fmt: skip
            download(imagefolder(url), store)
    assert download_leftovers(scratch) == []


def test_server_hanging_past_the_timeout(store, scratch):
    with serve_http() as server:
        server.hang("/pets.tar.gz")
        url = server.url("/pets.tar.gz")
        with fails_cleanly(store.root, DownloadError, f"{url} sent nothing for data.timeout_s=0.2 s", "raise the limit with --set data.timeout_s=N"):
            download(imagefolder(url, timeout_s=0.2), store)
    assert download_leftovers(scratch) == []


def test_torchvision_mirror_failing_the_checksum(store, scratch):
    import torchvision

    served = b"an HTML error page, not the CIFAR-10 archive"
    with serve_http(files={"/mirror/cifar-10-python.tar.gz": served}) as server:
        url = server.url("/mirror/cifar-10-python.tar.gz")
        with fails_cleanly(
            store.root, DataError,
            f"{url} has md5 {hashlib.md5(served).hexdigest()}, but torchvision's checksum for "
            f"cifar-10-python.tar.gz is {torchvision.datasets.CIFAR10.tgz_md5}",
            "the mirror serves a different file than torchvision's checksum expects",
            "point data.uri at a mirror of the original files, or unset it to use torchvision's",
        ):  # fmt: skip
            download(DataConfig(source="cifar10", uri=server.url("/mirror/")), store)
    assert download_leftovers(scratch) == []
