"""Measuring and checking exported ONNX classifiers on CPU, for the export, compress and package stages.

Sessions and batched inference live in kiln.runtime.onnx_runtime (the part bundles ship); they are re-exported
here so the stages have one module to import. No torch here, and `onnx` only inside check_onnx_file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiln.errors import ExportError
from kiln.runtime.onnx_runtime import INPUT_NAME, OUTPUT_NAME, ort_session, run_onnx  # noqa: F401 - one API


def top1_agreement(probabilities: np.ndarray, reference: np.ndarray) -> float:
    """Share of rows whose arg-max class equals the reference's (1.0 for two empty arrays)."""
    if len(probabilities) == 0:
        return 1.0
    return float(np.mean(probabilities.argmax(axis=1) == reference.argmax(axis=1)))


def measure_latency(session: ort.InferenceSession, sample: np.ndarray, runs: int, warmup: int = 3) -> dict[str, float]:
    """Wall-clock latency of one `session.run` on `sample` (usually [1, C, H, W]): {"p50_ms", "p95_ms"}.

    `warmup` untimed runs come first so that lazy allocations do not count. Raises ValueError if runs < 1.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(sample, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    timings_ms = np.empty(runs)
    for index in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        timings_ms[index] = (time.perf_counter() - started) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(timings_ms, 50)), 4),
        "p95_ms": round(float(np.percentile(timings_ms, 95)), 4),
    }


def measure_throughput(
    session: ort.InferenceSession, batch: np.ndarray, seconds_budget: float = 1.0, max_runs: int = 50, warmup: int = 2
) -> float:
    """Images per second when running `batch` repeatedly, for at most `seconds_budget` s or `max_runs` runs.

    At least one timed run always happens, so a slow model overshoots the budget by at most one batch.
    Raises ValueError for an empty batch or max_runs < 1.
    """
    if len(batch) == 0 or max_runs < 1:
        raise ValueError(f"need a non-empty batch and max_runs >= 1, got {len(batch)} images, max_runs={max_runs}")
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    runs = 0
    started = time.perf_counter()
    elapsed = 0.0
    while runs < max_runs and (runs == 0 or elapsed < seconds_budget):
        session.run(None, feed)
        runs += 1
        elapsed = time.perf_counter() - started
    return round(runs * len(batch) / max(elapsed, 1e-9), 1)


def check_onnx_file(path: str | Path) -> None:
    """Run `onnx.checker` (full check, with shape inference) on a model file; raise ExportError naming the file.

    Pipeline side only: imports the `onnx` package, which the deployment bundle does not need.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(
            f"{path} fails onnx.checker: {error}; the exporter or quantizer produced a broken graph"
        ) from None
