"""A real S3-compatible server for tests: moto's, started on 127.0.0.1, with the environment pointing at it.

The server is reached the way a user reaches theirs: store.root=s3://bucket/prefix, with the endpoint in
AWS_ENDPOINT_URL_S3 and credentials in the usual AWS_* variables (botocore reads them, so s3fs does). Import the
fixtures are registered for every test by tests/conftest.py; a test that asks for one is skipped where s3fs or moto
is not installed.
"""

from __future__ import annotations

import logging
import threading
import uuid

import pytest

BUCKET = "kiln-test"


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free port of 127.0.0.1, a bucket in it, and the environment pointing at both."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    from moto.s3.responses import S3Response

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as patch:
        # moto checks If-None-Match and then stores the object, two steps that its threaded server can interleave;
        # S3 does both atomically. Serialising PUTs gives the test server S3's guarantee: the store's protocol on top
        # of it is what these tests check.
        put_object, one_put_at_a_time = S3Response.put_object, threading.Lock()

        def atomic_put_object(self, *args, **kwargs):
            with one_put_at_a_time:
                return put_object(self, *args, **kwargs)

        patch.setattr(S3Response, "put_object", atomic_put_object)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        patch.delenv("AWS_PROFILE", raising=False)
        environment = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}  # fmt: skip
        for name, value in environment.items():
            patch.setenv(name, value)
        from s3fs import S3FileSystem

        S3FileSystem.clear_instance_cache()  # no instance made before this endpoint was set
        S3FileSystem().makedirs(BUCKET, exist_ok=True)  # moto keeps buckets in-process: an earlier module's stays
        try:
            yield f"http://{host}:{port}"
        finally:
            S3FileSystem.clear_instance_cache()  # none left pointing at the stopped server
            server.stop()


@pytest.fixture
def s3_root(s3_server) -> str:
    """A fresh store.root in the bucket for each test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/store"
