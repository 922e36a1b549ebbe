"""A throwaway HTTP server on 127.0.0.1 for tests that download: serves a folder and/or in-memory files.

    with serve_http(files={"/data.tar.gz": payload}) as server:
        server.fail("/data.tar.gz", 500)           # force a status for one path (0 resets it)
        url = server.url("/data.tar.gz")
        ...
        assert server.requests == ["/data.tar.gz"]

`server.hang(path)` makes a path accept the request and never answer (until the server stops), for timeouts;
`server.refused_url()` is an address where nothing listens.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class LocalServer:
    """The running server's address and its knobs; every field may be changed while it runs."""

    port: int
    directory: Path | None
    files: dict[str, bytes]  # URL path -> body; checked before `directory`
    statuses: dict[str, int] = field(default_factory=dict)  # URL path -> forced status
    hanging: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)  # URL paths requested, in order
    stopping: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def fail(self, path: str, status: int) -> None:
        """Answer `path` with this HTTP status from now on (0: serve it normally again)."""
        if status:
            self.statuses[_normalise(path)] = status
        else:
            self.statuses.pop(_normalise(path), None)

    def hang(self, path: str) -> None:
        self.hanging.add(_normalise(path))

    def body(self, path: str) -> bytes | None:
        if path in self.files:
            return self.files[path]
        if self.directory is None:
            return None
        candidate = (self.directory / path.lstrip("/")).resolve()
        inside = candidate == self.directory.resolve() or self.directory.resolve() in candidate.parents
        return candidate.read_bytes() if inside and candidate.is_file() else None

    @staticmethod
    def refused_url(path: str = "/") -> str:
        """A URL on a port that was free a moment ago, so connecting to it is refused."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return f"http://127.0.0.1:{port}/{path.lstrip('/')}"


@contextmanager
def serve_http(directory: Path | None = None, files: Mapping[str, bytes] | None = None) -> Iterator[LocalServer]:
    """Serve `directory` and/or `files` (URL path -> bytes) on 127.0.0.1 at a free port until the block ends."""
    state = LocalServer(0, directory, {_normalise(path): body for path, body in (files or {}).items()})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._answer(send_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            path = _normalise(unquote(urlsplit(self.path).path))
            state.requests.append(path)
            if path in state.hanging:
                state.stopping.wait()
                return
            if path in state.statuses:
                self.send_error(state.statuses[path])
                return
            body = state.body(path)
            if body is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    # A short poll interval: shutdown() waits up to one interval, and tests start many servers.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="test-http-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()


def _normalise(path: str) -> str:
    return "/" + path.lstrip("/")
