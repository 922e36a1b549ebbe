"""A real bundle and a real uvicorn server on 127.0.0.1 for the serving tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from kiln.dataset import publish_dataset
from kiln.store import ArtifactStore
from tests.conftest import make_blobs_dataset, publish_model
from tests.support.bundles import build_bundle

# Runs the bundle's own copy of the server with `kiln` made unimportable: proves the bundle needs no kiln.
STANDALONE_SERVER = (
    "import runpy, sys; sys.modules['kiln'] = None; sys.argv = ['kiln_runtime.server', *sys.argv[1:]]; "
    "runpy.run_module('kiln_runtime.server', run_name='__main__')"
)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    store = ArtifactStore(tmp_path_factory.mktemp("serving") / "store")
    dataset_ref = publish_dataset(store, make_blobs_dataset())
    _, directory = build_bundle(store, dataset_ref, publish_model(store, dataset_ref))
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(command: list[str], cwd: Path, port: int, timeout_s: float = 60) -> Iterator[str]:
    """Start `command` (a server on 127.0.0.1:`port`), wait for /healthz, yield its base URL, then stop it."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(cwd)}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{process.stdout.read()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not answer /healthz within {timeout_s} s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def standalone_command(bundle: Path, port: int, *options: str) -> list[str]:
    return [sys.executable, "-c", STANDALONE_SERVER, str(bundle), "--port", str(port), "--no-access-log", *options]


# Small limits so that the limit tests send little data.
MAX_UPLOAD_BYTES = 2_000_000
MAX_BATCH = 4
MAX_PIXELS = 4_000_000


@pytest.fixture(scope="session")
def server(bundle_dir: Path) -> Iterator[str]:
    """The bundle's standalone server (its own kiln_runtime copy, kiln unimportable), with small limits."""
    port = free_port()
    limits = ["--max-upload-bytes", str(MAX_UPLOAD_BYTES), "--max-batch", str(MAX_BATCH), "--max-pixels", str(MAX_PIXELS)]
    with running_server(standalone_command(Path("."), port, *limits), bundle_dir, port) as url:
        yield url
