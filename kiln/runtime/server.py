"""The bundle's HTTP server (FastAPI on uvicorn): classify uploaded images with a verified bundle.

    python -m kiln_runtime.server BUNDLE_DIR [--host 127.0.0.1] [--port 8080]   # inside a bundle, no kiln needed
    kiln serve BUNDLE [--host 127.0.0.1] [--port 8080]                          # where kiln is installed

    GET  /healthz        liveness: {"status": "ok", ...}
    GET  /v1/metadata    model name, version, classes, input spec, metrics, limits
    POST /v1/predict     multipart/form-data with one or more image files (any field name; PNG, JPEG, ...), or
                         application/json {"instances": [IMAGE, ...]} where IMAGE is a nested [H][W] or [H][W][C]
                         array of integers 0..255, or {"b64": "<base64 of an image file>"}; `?top_k=N` optional.

Images of any size are resized as in training. Every bad request gets a 4xx status and a JSON body
{"error": {"status", "code", "message"}} that names the problem; limits on body bytes, batch size and pixels keep
one request from exhausting the server. The bundle's files are verified against its manifest before it serves.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from dataclasses import asdict
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .bundle import Bundle, load_bundle
from .errors import KilnError
from .images import ImageTooLarge, UnreadableImage, open_image
from .options import Limits, add_server_arguments

logger = logging.getLogger("kiln.serve")
_DRAIN_LIMIT = 64 * 1024**2  # an oversized body is read and dropped up to this, so the client gets its 413 cleanly


class RequestRejected(Exception):
    """A bad request: becomes a 4xx JSON response."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def create_app(bundle: Bundle, limits: Limits = Limits()) -> FastAPI:
    """The FastAPI application serving `bundle` (already verified by load_bundle) within `limits`."""
    app = FastAPI(
        title=f"{bundle.name} {bundle.version}",
        description=f"Image classifier ({len(bundle.labels)} classes) served from a kiln bundle.",
        version=bundle.version,
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    _add_error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "model": bundle.name, "version": bundle.version}

    @app.get("/v1/metadata")
    def metadata() -> dict[str, Any]:
        return describe(bundle, limits)

    workers = anyio.CapacityLimiter(limits.max_workers)

    @app.post("/v1/predict")
    async def predict(request: Request, top_k: int = Query(1, ge=1, le=len(bundle.labels))) -> dict[str, Any]:
        media_type, payload = await _read_payload(request, limits)
        # Parsing, decoding and inference run in worker threads: the event loop keeps answering /healthz.
        predictions = await anyio.to_thread.run_sync(
            _classify, bundle, media_type, payload, limits, top_k, limiter=workers
        )
        return {
            "model": bundle.name,
            "version": bundle.version,
            "variant": bundle.variant_name,
            "predictions": [asdict(prediction) for prediction in predictions],
        }

    return app


def describe(bundle: Bundle, limits: Limits) -> dict[str, Any]:
    height, width, channels = bundle.input_shape
    evaluation = bundle.metrics.get("evaluation", {})
    rows = {row.get("variant"): row for row in bundle.metrics.get("compression", [])}
    return {
        "name": bundle.name,
        "version": bundle.version,
        "variant": bundle.variant_name,
        "classes": bundle.labels,
        "input": {
            "model_input": {"name": bundle.session.get_inputs()[0].name, "dtype": bundle.session.get_inputs()[0].type},
            "image": {"height": height, "width": width, "channels": channels, "dtype": "uint8", "layout": "HWC"},
            "accepts": ["multipart/form-data: image files (PNG, JPEG, BMP, GIF, WebP, TIFF), any size",
                        'application/json: {"instances": [[[0..255]]] or [{"b64": "<image file>"}]}'],  # fmt: skip
        },
        "metrics": {
            "test_accuracy": rows.get(bundle.variant_name, {}).get("accuracy", evaluation.get("accuracy")),
            "fp32_test_accuracy": evaluation.get("accuracy"),
            "blessed": evaluation.get("blessed"),
            "selection_reason": bundle.metrics.get("selection_reason"),
        },
        "limits": asdict(limits),
    }


async def _read_payload(request: Request, limits: Limits) -> tuple[str, Any]:
    """The request's media type and its raw content: the JSON body's bytes, or the uploaded (name, bytes) files."""
    body = await request.body()
    if not body:
        raise RequestRejected(400, "empty_body", "the request body is empty; send image files or JSON instances")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return media_type, await _uploaded_files(request, limits)
    if media_type == "application/json":
        return media_type, body
    raise RequestRejected(
        415, "unsupported_media_type",
        f"Content-Type {media_type or '(none)'} is not supported; send multipart/form-data with image files or "
        "application/json with {\"instances\": [...]}",
    )  # fmt: skip


def _classify(bundle: Bundle, media_type: str, payload: Any, limits: Limits, top_k: int) -> list[Any]:
    """Decode every image, shrink it to the model's input at once (so a request holds one full-size image at a
    time), and classify the batch. Runs in a worker thread."""
    if media_type == "multipart/form-data":
        sources = [name for name, _ in payload]
        images = [bundle.fit(_decode_file(name, data, limits)) for name, data in payload]
    else:
        instances = _json_instances(payload)
        _check_batch(len(instances), limits)
        sources = [f"instances[{index}]" for index in range(len(instances))]
        images = [bundle.fit(_decode_instance(index, item, limits)) for index, item in enumerate(instances)]
    if not images:
        raise RequestRejected(400, "no_images", "the request holds no images; attach at least one image file")
    return bundle.predict_images(images, sources, top_k)


async def _uploaded_files(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    # One file more than the batch limit reaches _check_batch, which answers 413 like the JSON path.
    form = await request.form(
        max_files=limits.max_batch + 1, max_fields=limits.max_batch + 1, max_part_size=limits.max_upload_bytes
    )
    files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
             if isinstance(value, UploadFile)]  # fmt: skip
    _check_batch(len(files), limits)
    return files


def _check_batch(count: int, limits: Limits) -> None:
    if count > limits.max_batch:
        raise RequestRejected(
            413, "batch_too_large", f"{count} images in one request, more than the limit of {limits.max_batch}; "
            "split the batch",
        )  # fmt: skip


def _decode_file(name: str, data: bytes, limits: Limits) -> np.ndarray:
    if not data:
        raise RequestRejected(400, "empty_file", f"file {name!r} is empty; attach the image's contents")
    try:
        return open_image(data, limits.max_pixels)
    except ImageTooLarge as error:
        raise RequestRejected(413, "image_too_large", f"file {name!r}: {error}") from None
    except UnreadableImage as error:
        raise RequestRejected(400, "unreadable_image", f"file {name!r}: {error}; send a PNG/JPEG/BMP/GIF/WebP image") from None


def _json_instances(body: bytes) -> list[Any]:
    try:
        payload = json.loads(body)
    except RecursionError:
        raise RequestRejected(400, "invalid_json", "the JSON body is nested too deeply") from None
    except ValueError as error:
        raise RequestRejected(400, "invalid_json", f"the body is not valid JSON ({error})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise RequestRejected(422, "invalid_instances", 'the JSON body must be an object {"instances": [IMAGE, ...]}')
    return payload["instances"]


def _decode_instance(index: int, instance: Any, limits: Limits) -> np.ndarray:
    where = f"instances[{index}]"
    if isinstance(instance, dict):
        if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise RequestRejected(422, "invalid_instance", f'{where}: an object instance must be {{"b64": "<base64>"}}')
        try:
            data = base64.b64decode(instance["b64"], validate=True)
        except ValueError as error:  # binascii.Error, or non-ASCII characters
            raise RequestRejected(422, "invalid_base64", f"{where}: not valid base64 ({error})") from None
        return _decode_file(where, data, limits)
    try:
        pixels = np.asarray(instance)
    except (ValueError, RecursionError):
        pixels = np.asarray([])  # ragged or absurdly deep nesting: reported below as a wrong shape
    if pixels.dtype.kind not in "iu" or pixels.ndim not in (2, 3) or pixels.size == 0:
        raise RequestRejected(
            422, "invalid_array", f"{where}: expected a non-empty [H][W] or [H][W][C] array of integers 0..255, got "
            f"shape {pixels.shape} of {pixels.dtype}",
        )  # fmt: skip
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    height, width, channels = pixels.shape
    if channels not in (1, 3):
        raise RequestRejected(422, "invalid_array", f"{where}: {channels} channels; send 1 (grey) or 3 (RGB)")
    if height * width > limits.max_pixels:
        raise RequestRejected(413, "image_too_large", f"{where}: {height * width:,} pixels, more than {limits.max_pixels:,}")
    if pixels.min() < 0 or pixels.max() > 255:
        raise RequestRejected(422, "invalid_array", f"{where}: pixel values must be within 0..255")
    return pixels.astype(np.uint8)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestRejected)
    async def rejected(_request: Request, error: RequestRejected) -> JSONResponse:
        return _error(error.status, error.code, error.message)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        if str(error.detail).startswith("Too many files"):  # Starlette's multipart parser stopped the batch early
            return _error(413, "batch_too_large", f"{error.detail}; split the batch")
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
        return _error(error.status_code, code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
        return _error(422, "invalid_parameters", problems)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return _error(500, "internal_error", f"{error.__class__.__name__}: the server failed; see its log")


class BodyLimit:
    """ASGI middleware: buffer the request body up to `max_bytes`, answer 413 past that (declared or streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _drain(receive, _DRAIN_LIMIT)
            return await self._too_large(scope, receive, send, int(declared))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                if more:
                    await _drain(receive, _DRAIN_LIMIT)
                return await self._too_large(scope, receive, send, len(body))
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, size: int):
        response = _error(
            413, "payload_too_large", f"the request body is {size:,}+ bytes, more than the limit of "
            f"{self.max_bytes:,}; send fewer or smaller images",
        )  # fmt: skip
        await response(scope, receive, send)


async def _drain(receive, budget: int) -> None:
    """Read and drop the rest of a request body (at most `budget` bytes) so the client can read the response."""
    seen = 0
    while seen <= budget:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


def serve(bundle_path: str, args: argparse.Namespace) -> None:
    """Verify the bundle, then serve it with uvicorn until interrupted. Raises KilnError for a bad bundle."""
    import uvicorn

    bundle = load_bundle(bundle_path, variant=args.variant)
    limits = Limits(args.max_upload_bytes, args.max_batch, args.max_pixels, args.max_workers, args.max_connections)
    logger.info("serving %s %s (%s) on http://%s:%d", bundle.name, bundle.version, bundle.variant_name, args.host, args.port)
    uvicorn.run(
        create_app(bundle, limits),
        host=args.host,
        port=args.port,
        access_log=not args.no_access_log,
        limit_concurrency=limits.max_connections,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln_runtime.server", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle folder or .tar.gz")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    try:
        serve(args.bundle, args)
    except KilnError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
