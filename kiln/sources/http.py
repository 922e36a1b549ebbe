"""Download one URL to a local file with a timeout and a size cap, sorting failures into retryable or not.

The download task retries `DownloadError` only, so the split matters: a refused connection, a timeout or an HTTP
5xx may work next time; a 404 or a file larger than allowed will not.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from kiln.errors import DataError, DownloadError
from kiln.progress import ProgressCallback, ignore_progress

USER_AGENT = "kiln-pipeline"
_CHUNK_BYTES = 1 << 20
_TRANSIENT_STATUSES = frozenset({408, 425, 429})  # client-side codes that still mean "try again later"


def is_url(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def fetch(
    url: str, destination: Path, *, timeout_s: float, max_bytes: int, on_progress: ProgressCallback = ignore_progress
) -> Path:
    """Download `url` to `destination` (through a .part file, so a failed download leaves nothing behind).

    `timeout_s` bounds each socket operation. Raises DownloadError for failures worth retrying (connection refused
    or reset, timeouts, HTTP 5xx/408/429, a body shorter than announced) and DataError for ones that will not
    change (HTTP 404 and other 4xx, a body larger than `max_bytes`). `on_progress` hears the bytes received.
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            announced = _announced_length(response)
            if announced is not None and announced > max_bytes:
                raise _too_large(url, max_bytes, f"announces {announced:,} bytes")
            received = _copy_capped(url, response, partial, max_bytes, announced or 0, on_progress)
        if announced is not None and received < announced:
            raise DownloadError(f"{url}: the connection closed after {received:,} of {announced:,} bytes; retrying")
        partial.replace(destination)
        return destination
    except urllib.error.HTTPError as error:
        error.close()
        raise _status_error(url, error.code, str(error.reason)) from None
    except urllib.error.URLError as error:  # refused, DNS failure, TLS failure, timeout while connecting
        if isinstance(error.reason, TimeoutError):
            raise _timed_out(url, timeout_s) from None
        raise DownloadError(f"cannot reach {url}: {error.reason}; check the address and the network") from None
    except TimeoutError:  # during the body
        raise _timed_out(url, timeout_s) from None
    except (ConnectionError, http.client.HTTPException) as error:  # during the body
        raise DownloadError(f"downloading {url} failed: {error.__class__.__name__}: {error}") from None
    finally:
        partial.unlink(missing_ok=True)


def _announced_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _copy_capped(
    url: str, response: http.client.HTTPResponse, target: Path, max_bytes: int, total: int,
    on_progress: ProgressCallback,
) -> int:  # fmt: skip
    # Counted while streaming because Content-Length may be absent or wrong.
    received = 0
    what = f"downloading {url.rsplit('/', 1)[-1] or url}"
    with open(target, "wb") as out:
        while chunk := response.read(_CHUNK_BYTES):
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(url, max_bytes, f"sent more than {max_bytes:,} bytes")
            out.write(chunk)
            on_progress(what, received, total)
    return received


def _timed_out(url: str, timeout_s: float) -> DownloadError:
    return DownloadError(
        f"{url} sent nothing for data.timeout_s={timeout_s:g} s; the server may be slow or down (transient failures "
        f"are retried); if it is just slow, raise the limit with --set data.timeout_s=N"
    )


def _too_large(url: str, max_bytes: int, what: str) -> DataError:
    return DataError(
        f"{url} {what}, over data.max_archive_bytes={max_bytes:,}; "
        f"raise it with --set data.max_archive_bytes=N if you trust this source"
    )


def _status_error(url: str, status: int, reason: str) -> DataError | DownloadError:
    if status >= 500 or status in _TRANSIENT_STATUSES:
        return DownloadError(f"{url} answered HTTP {status} {reason}; the server may recover (transient failures are retried)")
    return DataError(f"{url} answered HTTP {status} {reason}; check data.uri (nothing is served at that address)")
