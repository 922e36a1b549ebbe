"""The real Prefect download task against a failing server: a transient failure is retried twice, then the last
DownloadError reaches the caller; a final one (HTTP 404) is not retried at all.

Slow only because of the temporary Prefect API that prefect_test_harness starts (about half a minute on 2 cores);
the retries themselves run without delay.
"""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from kiln.config import DataConfig, StoreConfig
from kiln.errors import DataError, DownloadError
from tasks.download import download_task
from tests.bad_inputs.conftest import fails_cleanly, imagefolder
from tests.support.http_server import serve_http

pytestmark = pytest.mark.slow

download_without_delay = download_task.with_options(retry_delay_seconds=0)  # the real retries and retry condition


@flow
def download_only(config: DataConfig, store: StoreConfig):
    """The training flow's first step alone (a task runs with its retries inside a flow run, as in production)."""
    return download_without_delay(config, store)


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_http_500_is_retried_twice_then_fails(harness, store):
    with serve_http() as server:
        server.fail("/pets.tar.gz", 500)
        url = server.url("/pets.tar.gz")
        with fails_cleanly(store.root, DownloadError,
                           f"{url} answered HTTP 500 Internal Server Error",
                           "the server may recover (transient failures are retried). Gave up after 3 attempts: "
                           "try again later, or point data.uri at another mirror"):  # fmt: skip
            download_only(imagefolder(url), StoreConfig(root=store.root))
        assert server.requests == ["/pets.tar.gz"] * 3  # the first try and download_task's 2 retries


def test_http_404_is_requested_once(harness, store):
    with serve_http() as server:
        url = server.url("/pets.tar.gz")
        with fails_cleanly(store.root, DataError,
                           f"{url} answered HTTP 404 Not Found",
                           "check data.uri (nothing is served at that address)"):  # fmt: skip
            download_only(imagefolder(url), StoreConfig(root=store.root))
        assert server.requests == ["/pets.tar.gz"]
