"""ONNX-level compression of an exported fp32 classifier: int8 static (QDQ), int8 dynamic and fp16.

All three keep kiln's interface (`input` float32 [N, C, H, W] -> `probabilities` float32 [N, classes]) so that the
package stage can put the same uint8 image front end on whichever variant ships.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from kiln.config import CompressConfig
from kiln.dataset import stratified_subsample
from kiln.errors import ExportError
from kiln.onnx_tools import INPUT_NAME, check_onnx_file
from kiln.runtime.preprocess import Preprocessing

CALIBRATION_SEED = 0  # the stratified choice of calibration images is fixed, so the int8 model is reproducible
CALIBRATION_BATCH = 32  # at most this many images per calibration run; the ranges do not depend on it
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# Dynamic quantization computes activation ranges at run time, per batch: worth it where weights dominate (the
# linear layers of an MLP or a classifier head). onnxruntime's dynamic Conv (ConvInteger) is slower than float
# Conv on CPU, so convolutions stay in float.
DYNAMIC_OP_TYPES = ["MatMul", "Gemm"]


def calibration_images(images: np.ndarray, labels: np.ndarray, count: int, prep: Preprocessing) -> np.ndarray:
    """`count` training images (class-stratified, fixed seed), normalized to float32 [N, C, H, W]."""
    chosen = stratified_subsample(labels, count, CALIBRATION_SEED)
    return prep.normalize(images[chosen])


class CalibrationReader:
    """Feeds calibration images to onnxruntime's calibrator in batches (its CalibrationDataReader protocol)."""

    def __init__(self, images: np.ndarray, max_batch: int = CALIBRATION_BATCH):
        # Every batch has the same size: the entropy/percentile calibrators stack per-batch outputs into one array
        # and fail on a shorter last batch. So take the largest divisor of the image count within max_batch.
        batch_size = max(size for size in range(1, max_batch + 1) if len(images) % size == 0)
        self._batches = iter([images[start : start + batch_size] for start in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray, config: CompressConfig) -> None:
    """Static int8 QDQ quantization of `fp32_path` into `int8_path`, calibrated on `calibration` images.

    Raises ExportError when the result fails onnx.checker or contains no QuantizeLinear/DequantizeLinear nodes.
    """
    with tempfile.TemporaryDirectory(prefix="kiln-quant-") as scratch:
        prepared = _pre_process(fp32_path, Path(scratch))
        quantize_static(
            str(prepared),
            str(int8_path),
            CalibrationReader(calibration),
            # QDQ is the format onnxruntime recommends for CPU since 1.11: its CPU kernels fuse the QDQ patterns.
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            # onnxruntime's CPU recommendation for x86: unsigned activations, signed weights (its u8s8 kernels).
            # Without VNNI (plain AVX2) those kernels can saturate int16 intermediates, which onnxruntime avoids
            # with reduce_range (7-bit weights). We don't know the deployment CPU, so we always reduce: on an AVX2
            # build machine, full-range per-channel weights lost 1.5 points on digits (LeNet) against 0.0 with
            # reduce_range, and the measured int8 accuracy then holds on VNNI, AVX2 and ARM CPUs alike.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
            calibrate_method=CALIBRATION_METHODS[config.calibrate_method],
            # The softmax stays in float: quantizing its output would round probabilities to 1/255 steps.
            nodes_to_exclude=_softmax_nodes(prepared),
        )
    _check_quantized(int8_path, {"QuantizeLinear", "DequantizeLinear"})


def quantize_dynamic_int8(fp32_path: Path, int8_path: Path, config: CompressConfig) -> None:
    """Dynamic int8 quantization of the linear layers (MatMul/Gemm) of `fp32_path` into `int8_path`.

    Weights are int8 in the file; activations are quantized per batch at run time, so no calibration is needed.
    Raises ExportError when the result fails onnx.checker or has no integer matrix multiplication.
    """
    with tempfile.TemporaryDirectory(prefix="kiln-quant-") as scratch:
        prepared = _pre_process(fp32_path, Path(scratch))
        quantize_dynamic(
            str(prepared),
            str(int8_path),
            op_types_to_quantize=DYNAMIC_OP_TYPES,
            per_channel=config.per_channel,
            reduce_range=True,  # see quantize_int8: the same u8s8 saturation concern on AVX2 CPUs
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_softmax_nodes(prepared),
        )
    _check_quantized(int8_path, {"MatMulInteger"})


def convert_fp16(fp32_path: Path, fp16_path: Path) -> None:
    """Half-precision weights and activations, float32 at the edges: `input` and `probabilities` stay float32.

    For GPU serving (tensor cores); onnxruntime's CPU provider lacks fp16 kernels for most operators and inserts
    casts around them, so CPU figures for this variant say little about its GPU speed. The softmax stays in float32
    so that the probabilities keep their precision. Raises ExportError when the result fails onnx.checker.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16  # onnxconverter-common's, as ORT ships it

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True, op_block_list=["Softmax"])
    # The converter appends its input/output casts at the end of the node list; ONNX wants topological order.
    _sort_topologically(model.graph)
    onnx.save(model, str(fp16_path))
    check_onnx_file(fp16_path)


def _pre_process(fp32_path: Path, scratch: Path) -> Path:
    """onnxruntime's recommended quantization pre-processing (shape inference + graph optimization)."""
    prepared = scratch / "model.prepared.onnx"
    # Symbolic shape inference is meant for transformers and fails on some of our CNN graphs (e.g. the
    # Reshape after ResNet-9's global pool); ONNX shape inference plus the graph optimizations suffice here.
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    return prepared


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` so that every node comes after the nodes producing its inputs (stable otherwise)."""
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [all(name in available for name in node.input) for node in pending]
        if not any(ready):
            raise ExportError(f"the graph has a cycle or a missing input around node {pending[0].name!r}")
        for node in (node for node, is_ready in zip(pending, ready) if is_ready):
            ordered.append(node)
            available.update(node.output)
        pending = [node for node, is_ready in zip(pending, ready) if not is_ready]
    ordered = [_copy(node) for node in ordered]  # detached from the repeated field we are about to clear
    del graph.node[:]
    graph.node.extend(ordered)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    duplicate = onnx.NodeProto()
    duplicate.CopyFrom(node)
    return duplicate


def _softmax_nodes(path: Path) -> list[str]:
    return [node.name for node in onnx.load(str(path)).graph.node if node.op_type == "Softmax"]


def _check_quantized(path: Path, required_ops: set[str]) -> None:
    check_onnx_file(path)
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    if not required_ops <= op_types:
        raise ExportError(
            f"{path.name} has no {'/'.join(sorted(required_ops))} nodes (ops: {sorted(op_types)}): nothing was "
            f"quantized; remove this variant from compress.variants"
        )
