"""What the compression report measures about an ONNX variant, and the timed onnxruntime runs behind its speed.

Static figures (parameters, multiply-accumulates, zero weights) are read from a model's float graph: for an int8
variant, from the float model it was quantized from, since int8 changes how weights are stored, not how many there
are or how much arithmetic they need.
"""

from __future__ import annotations

import math
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
TIMING_ROUNDS = 5  # every variant is timed in this many interleaved slices (see time_sessions)


def count_parameters(path: Path) -> int:
    """Number of floating-point weights in a float ONNX model (its initializers), i.e. the network's parameters."""
    weights = [tensor for tensor in onnx.load(str(path)).graph.initializer if tensor.data_type in FLOAT_TYPES]
    return int(sum(np.prod(tensor.dims, dtype=np.int64) for tensor in weights))


def zero_weight_fraction(path: Path) -> float:
    """Share of the weight-matrix entries (float initializers of rank 2 or more: conv and linear weights) that are
    exactly zero: the sparsity unstructured pruning creates."""
    zeros = total = 0
    for tensor in onnx.load(str(path)).graph.initializer:
        if tensor.data_type in FLOAT_TYPES and len(tensor.dims) >= 2:
            values = numpy_helper.to_array(tensor)
            zeros += int(np.count_nonzero(values == 0))
            total += values.size
    return round(zeros / total, 6) if total else 0.0


def gzip_size(path: Path) -> int:
    """Bytes of the file after zlib (gzip's DEFLATE) level 6: what zeros save in storage and download."""
    return len(zlib.compress(Path(path).read_bytes(), 6))


def count_macs(path: Path) -> int:
    """Multiply-accumulates of one image (batch 1) in the Conv, Gemm and MatMul nodes of a float ONNX model.

    Shapes come from ONNX shape inference with the batch axis fixed to 1. Nodes whose shapes cannot be inferred
    count as 0, so the figure is a lower bound for exotic graphs and exact for kiln's.
    """
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {tensor.name: list(tensor.dims) for tensor in inferred.graph.initializer}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if all(dim.HasField("dim_value") for dim in dims):
            shapes[value.name] = [dim.dim_value for dim in dims]
    total = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type in ("Conv", "ConvInteger"):
            weight = shapes.get(node.input[1])
            total += math.prod(out) * math.prod(weight[1:]) if weight else 0
        elif node.op_type in ("Gemm", "MatMul", "MatMulInteger"):
            left = shapes.get(node.input[0])
            trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
            inner = (left[-2] if trans_a else left[-1]) if left else 0
            total += math.prod(out) * inner
    return int(total)


def time_sessions(
    sessions: dict[str, ort.InferenceSession],
    sample: np.ndarray,
    batch: np.ndarray,
    latency_runs: int,
    throughput_seconds: float,
    rounds: int = TIMING_ROUNDS,
) -> dict[str, dict[str, float]]:
    """Batch-1 latency (p50/p95 over `latency_runs` runs of `sample`) and batch throughput (images/s running
    `batch` for about `throughput_seconds`) of every session: {name: {"p50_ms", "p95_ms", "throughput_ips"}}.

    The timing is interleaved: each variant runs a slice of its runs in turn, `rounds` times over, in a rotating
    order. On a shared machine, load that comes and goes then spreads over all variants instead of penalizing
    whichever was being timed at that moment, so their ratios, which the selection compares, stay fair.
    """
    if latency_runs < 1 or len(batch) == 0:
        raise ValueError(f"need latency_runs >= 1 and a non-empty batch, got {latency_runs} and {len(batch)} images")
    rounds = max(1, min(rounds, latency_runs))
    feeds = {
        name: ({session.get_inputs()[0].name: np.ascontiguousarray(sample, dtype=np.float32)},
               {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)})
        for name, session in sessions.items()
    }  # fmt: skip
    for name, session in sessions.items():  # untimed: lazy allocations and kernel choices happen here
        for _ in range(3):
            session.run(None, feeds[name][0])
        session.run(None, feeds[name][1])
    latencies: dict[str, list[float]] = {name: [] for name in sessions}
    batch_seconds: dict[str, float] = dict.fromkeys(sessions, 0.0)
    batch_runs: dict[str, int] = dict.fromkeys(sessions, 0)
    names = list(sessions)
    for round_index in range(rounds):
        runs = latency_runs // rounds + (1 if round_index < latency_runs % rounds else 0)
        # Each round starts one variant later, so no variant is always the one timed first (or right after another).
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            session = sessions[name]
            single, batched = feeds[name]
            for _ in range(runs):
                started = time.perf_counter()
                session.run(None, single)
                latencies[name].append((time.perf_counter() - started) * 1000.0)
            started = time.perf_counter()
            elapsed = 0.0
            while batch_runs[name] == 0 or elapsed < throughput_seconds / rounds:  # at least one batch per slice
                session.run(None, batched)
                batch_runs[name] += 1
                elapsed = time.perf_counter() - started
                if elapsed >= throughput_seconds / rounds:
                    break
            batch_seconds[name] += elapsed
    return {
        name: {
            "p50_ms": round(float(np.percentile(latencies[name], 50)), 4),
            "p95_ms": round(float(np.percentile(latencies[name], 95)), 4),
            "throughput_ips": round(batch_runs[name] * len(batch) / max(batch_seconds[name], 1e-9), 1),
        }
        for name in sessions
    }
