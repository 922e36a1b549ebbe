"""Load-test a bundle's HTTP server on 127.0.0.1: batch-1 requests/s and p50/p99 latency, shipped variant vs fp32.

    python benchmarks/serve_load.py BUNDLE [--requests 2000] [--seconds 30] [--concurrency 4] [--image FILE]

For each variant it starts `kiln serve BUNDLE --variant V` as its own process, waits for /healthz, sends a few
warm-up requests, then sends batch-1 multipart PNG uploads from this process over keep-alive connections, from
`--concurrency` threads, until `--requests` were answered or `--seconds` passed, whichever comes first. Only
127.0.0.1 is contacted. Client and server share the machine's cores: on a 2-core box the figures are a floor for
the server alone. Every non-200 answer is counted as an error and reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kiln.runtime.bundle import load_bundle  # noqa: E402

WARMUP_REQUESTS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="bundle folder (as printed by `kiln run`)")
    parser.add_argument("--requests", type=int, default=2000, help="at most this many timed requests per variant")
    parser.add_argument("--seconds", type=float, default=30.0, help="at most this long per variant")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads, each with its own connection")
    parser.add_argument("--image", type=Path, help="image file to send (default: random pixels at the model's size)")
    parser.add_argument("--variants", default="shipped,fp32", help="comma-separated: shipped, fp32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    payload = args.image.read_bytes() if args.image else random_png(bundle.input_shape)
    results = []
    for variant in args.variants.split(","):
        with server(args.bundle, variant) as url:
            results.append(run_load(url, payload, args.requests, args.seconds, args.concurrency) | {
                "variant": bundle.variant_name if variant == "shipped" else variant,
            })  # fmt: skip
    report = {
        "bundle": f"{bundle.name}-{bundle.version}",
        "input_shape": list(bundle.input_shape),
        "image_bytes": len(payload),
        "concurrency": args.concurrency,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def random_png(shape: tuple[int, int, int]) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if shape[2] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class server:
    """`kiln serve` for one variant on a free 127.0.0.1 port, as a context manager yielding its URL."""

    def __init__(self, bundle: Path, variant: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.command = [sys.executable, "-m", "kiln.cli", "serve", str(bundle), "--variant", variant,
                        "--port", str(self.port), "--no-access-log"]  # fmt: skip

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit("the server did not become healthy within 60 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def run_load(url: str, payload: bytes, max_requests: int, max_seconds: float, concurrency: int) -> dict:
    files = {"image": ("image.png", payload, "image/png")}
    with httpx.Client(timeout=30) as warmup:
        for _ in range(WARMUP_REQUESTS):
            warmup.post(f"{url}/v1/predict", files=files).raise_for_status()
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    issued = 0
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        nonlocal issued, errors
        with httpx.Client(timeout=30) as client:
            while True:
                with lock:
                    if issued >= max_requests or time.perf_counter() >= deadline:
                        return
                    issued += 1
                started = time.perf_counter()
                status = client.post(f"{url}/v1/predict", files=files).status_code
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    errors += status != 200

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()  # a client-side failure (refused connection, timeout) stops the benchmark
    wall = time.perf_counter() - started
    timings_ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(timings_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(timings_ms, 99)), 2),
    }


def print_table(report: dict) -> None:
    print(f"\n{report['bundle']}: input {report['input_shape']}, {report['image_bytes']} B PNG per request, "
          f"batch 1, {report['concurrency']} client threads, {report['machine']}, {report['date']}")  # fmt: skip
    print(f"{'variant':<10}{'requests':>10}{'errors':>8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for row in report["results"]:
        print(f"{row['variant']:<10}{row['requests']:>10}{row['errors']:>8}{row['requests_per_s']:>10}"
              f"{row['p50_ms']:>10}{row['p99_ms']:>10}")  # fmt: skip


if __name__ == "__main__":
    main()
