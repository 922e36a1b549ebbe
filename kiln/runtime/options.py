"""The server's command-line options and request limits, importable without FastAPI (for `kiln`'s argument parser)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from .bundle import VARIANTS


@dataclass(frozen=True)
class Limits:
    """What one request, and the server as a whole, may use. Peak memory is about max_upload_bytes + max_pixels x 3
    bytes per worker, plus the model."""

    max_upload_bytes: int = 16 * 1024**2  # whole request body
    max_batch: int = 64  # images per request
    max_pixels: int = 25_000_000  # per image, checked from its header before decoding
    # Requests decoded and classified at once (each holds at most one full-size decoded image); the rest wait.
    max_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_connections: int = 128  # uvicorn answers 503 past this many open connections



def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Limits()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--variant", choices=VARIANTS, default="shipped",
                        help="shipped: model.onnx, the variant the pipeline chose; fp32: model.fp32.onnx")  # fmt: skip
    parser.add_argument("--max-upload-bytes", type=int, default=defaults.max_upload_bytes)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="images per request")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="per image")
    parser.add_argument("--max-workers", type=int, default=defaults.max_workers,
                        help="requests decoded and classified at once (default: CPU count)")  # fmt: skip
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections before the server answers 503")  # fmt: skip
    parser.add_argument("--no-access-log", action="store_true", help="don't log every request (for load tests)")
