"""Compress stage: post-training static int8 quantization of the exported model, re-evaluated against fp32.

Output files:
    model.int8.onnx          QDQ int8 model (int8_static only; checked with onnx.checker)
    compression_report.csv   one row per variant: accuracy on the full test set, top-1 agreement with fp32, file
                             size, batch-1 latency p50/p95, batch-64 throughput (onnxruntime, CPU)
    predictions.<variant>.npy  int64 top-1 class per test image, for later parity checks
    selection.json           the variant to ship and why (int8 only if its accuracy drop is within budget)

The fp32 model is not copied: it stays in the export output, which selection.json points to.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

from kiln.config import CompressConfig, StoreConfig
from kiln.dataset import read_split, stratified_subsample
from kiln.errors import ExportError
from kiln.onnx_tools import (
    INPUT_NAME,
    check_onnx_file,
    measure_latency,
    measure_throughput,
    ort_session,
    run_onnx,
    top1_agreement,
)
from kiln.runtime.preprocess import Preprocessing
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json, write_json
from tasks._task import report, report_table, stage_task
from tasks.export import MODEL_FILE as FP32_FILE
from tasks.export import PREPROCESS_FILE

STAGE = Stage("compress", __name__)
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "compression_report.csv"
SELECTION_FILE = "selection.json"
REPORT_COLUMNS = (
    "variant", "file", "accuracy", "agreement_with_fp32", "size_bytes", "params", "p50_ms", "p95_ms", "throughput_ips",
)  # fmt: skip

CALIBRATION_SEED = 0  # the stratified choice of calibration images is fixed, so the int8 model is reproducible
CALIBRATION_BATCH = 32  # at most this many images per calibration run; the ranges do not depend on it
EVAL_CHUNK = 2048  # test images normalized at a time
THROUGHPUT_BATCH = 64
THROUGHPUT_SECONDS = 1.0  # time budget per variant for the throughput measurement
THROUGHPUT_MAX_RUNS = 50  # ... or this many batches, whichever comes first
ACCURACY_EPSILON = 1e-9  # accuracies are k/n fractions: don't let float rounding flip an exact-budget decision
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


def compress(config: CompressConfig, exported: ArtifactRef, dataset: ArtifactRef, store: ArtifactStore) -> ArtifactRef:
    """Quantize `exported`'s fp32 model (per `config.method`), evaluate every variant on the test set, choose one.

    Returns the compress output's reference (reused when already in the store). Raises ExportError when the
    quantized model is invalid or has no quantize/dequantize nodes.
    """

    def build(out_dir: Path) -> dict[str, Any]:
        export_dir, dataset_dir = store.materialize(exported), store.materialize(dataset)
        prep = Preprocessing.from_json(read_json(export_dir / PREPROCESS_FILE))
        variants = {"fp32": export_dir / FP32_FILE}
        if config.method == "int8_static":
            train_images, train_labels = read_split(dataset_dir, "train")
            calibration = calibration_images(train_images, train_labels, config.calibration_samples, prep)
            quantize_int8(variants["fp32"], out_dir / INT8_FILE, calibration, config)
            variants["int8"] = out_dir / INT8_FILE

        test_images, test_labels = read_split(dataset_dir, "test")
        params = count_parameters(variants["fp32"])
        rows: list[dict[str, Any]] = []
        fp32_probabilities = None
        for variant, path in variants.items():
            row, probabilities = evaluate_variant(
                variant, path, test_images, test_labels, prep, fp32_probabilities, config
            )
            fp32_probabilities = probabilities if variant == "fp32" else fp32_probabilities
            row["params"] = params
            rows.append(row)
            np.save(out_dir / f"predictions.{variant}.npy", probabilities.argmax(axis=1).astype(np.int64))
        pd.DataFrame(rows, columns=list(REPORT_COLUMNS)).to_csv(out_dir / REPORT_FILE, index=False)

        selection = select_variant(rows, config)
        write_json(out_dir / SELECTION_FILE, selection)
        metrics: dict[str, Any] = {"chosen": selection["chosen"], "test_samples": len(test_labels)}
        for row in rows:
            for field in ("accuracy", "agreement_with_fp32", "size_bytes", "p50_ms", "p95_ms", "throughput_ips"):
                metrics[f"{row['variant']}_{field}"] = row[field]
        return metrics

    return STAGE.produce(store, config, {"exported": exported, "dataset": dataset}, build)


def calibration_images(
    images: np.ndarray, labels: np.ndarray, count: int, prep: Preprocessing
) -> np.ndarray:
    """`count` training images (class-stratified, fixed seed), normalized to float32 [N, C, H, W]."""
    chosen = stratified_subsample(labels, count, CALIBRATION_SEED)
    return prep.normalize(images[chosen])


class _CalibrationReader:
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
        prepared = Path(scratch) / "model.prepared.onnx"
        # Symbolic shape inference is meant for transformers and fails on some of our CNN graphs (e.g. the
        # Reshape after ResNet-9's global pool); ONNX shape inference plus the graph optimizations suffice here.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        softmax_nodes = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Softmax"]
        quantize_static(
            str(prepared),
            str(int8_path),
            _CalibrationReader(calibration),
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
            nodes_to_exclude=softmax_nodes,
        )
    check_onnx_file(int8_path)
    op_types = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    if not {"QuantizeLinear", "DequantizeLinear"} <= op_types:
        raise ExportError(
            f"{int8_path.name} has no QuantizeLinear/DequantizeLinear nodes (ops: {sorted(op_types)}): nothing was "
            f"quantized; set compress.method=none to ship fp32"
        )


def count_parameters(path: Path) -> int:
    """Number of floating-point weights in an fp32 ONNX model (its initializers), i.e. the network's parameters."""
    model = onnx.load(str(path))
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    weights = [tensor for tensor in model.graph.initializer if tensor.data_type in floating]
    return int(sum(np.prod(tensor.dims, dtype=np.int64) for tensor in weights))


def evaluate_variant(
    variant: str,
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    prep: Preprocessing,
    fp32_probabilities: np.ndarray | None,
    config: CompressConfig,
) -> tuple[dict[str, Any], np.ndarray]:
    """One report row for the model at `path` (accuracy, agreement with fp32, size, latency, throughput) and its
    probabilities for uint8 `images`. `fp32_probabilities` None means this is the fp32 reference itself."""
    session = ort_session(path)
    # Normalized in chunks: a float32 copy of a large test set of big images would not fit in memory at once.
    probabilities = np.concatenate(
        [
            run_onnx(session, prep.normalize(images[start : start + EVAL_CHUNK]))
            for start in range(0, len(images), EVAL_CHUNK)
        ]
    )
    reference = probabilities if fp32_probabilities is None else fp32_probabilities
    throughput_batch = prep.normalize(np.resize(images, (THROUGHPUT_BATCH, *images.shape[1:])))  # repeats if few
    latency = measure_latency(session, prep.normalize(images[:1]), runs=config.latency_runs)
    row = {
        "variant": variant,
        "file": path.name,
        "accuracy": round(float(np.mean(probabilities.argmax(axis=1) == labels)), 6),
        "agreement_with_fp32": round(top1_agreement(probabilities, reference), 6),
        "size_bytes": path.stat().st_size,
        **latency,
        "throughput_ips": measure_throughput(
            session, throughput_batch, seconds_budget=THROUGHPUT_SECONDS, max_runs=THROUGHPUT_MAX_RUNS
        ),
    }
    return row, probabilities


def select_variant(rows: list[dict[str, Any]], config: CompressConfig) -> dict[str, Any]:
    """The variant to ship: int8 when its accuracy is within `max_accuracy_drop` of fp32's, else fp32."""
    by_variant = {row["variant"]: row for row in rows}
    fp32 = by_variant["fp32"]
    fp32_choice = {"chosen": "fp32", "file": FP32_FILE, "stage": "export"}  # the fp32 model lives in the export output
    if "int8" not in by_variant:
        return {**fp32_choice, "reason": "Compression is disabled (compress.method=none), so the fp32 model ships."}
    int8 = by_variant["int8"]
    drop = fp32["accuracy"] - int8["accuracy"]
    budget = config.max_accuracy_drop
    facts = {"accuracy_drop": round(drop, 6), "max_accuracy_drop": budget}
    if drop <= budget + ACCURACY_EPSILON:
        return {
            "chosen": "int8",
            "file": INT8_FILE,
            "stage": "compress",
            "reason": (
                f"int8 accuracy {int8['accuracy']:.4f} against fp32's {fp32['accuracy']:.4f} is a drop of "
                f"{drop:.4f}, within the {budget} allowed by compress.max_accuracy_drop, and the file is "
                f"{fp32['size_bytes'] / max(int8['size_bytes'], 1):.1f}x smaller."
            ),
            **facts,
        }
    return {
        **fp32_choice,
        "reason": (
            f"int8 accuracy {int8['accuracy']:.4f} is {drop:.4f} below fp32's {fp32['accuracy']:.4f}, more than the "
            f"{budget} allowed by compress.max_accuracy_drop, so the fp32 model ships."
        ),
        **facts,
    }


@stage_task(STAGE)
def compress_task(
    config: CompressConfig, exported: ArtifactRef, dataset: ArtifactRef, store: StoreConfig
) -> ArtifactRef:
    """Quantize the exported model, re-evaluate every variant on the test set and choose the one to ship."""
    artifact_store = ArtifactStore(store.root)
    ref = compress(config, exported, dataset, artifact_store)
    output_dir = artifact_store.materialize(ref)
    selection = read_json(output_dir / SELECTION_FILE)
    rows = pd.read_csv(output_dir / REPORT_FILE).to_dict(orient="records")
    lines = [
        f"- {row['variant']}: accuracy {row['accuracy']:.2%}, {row['size_bytes']:,} bytes, "
        f"p50 {row['p50_ms']:.2f} ms, {row['throughput_ips']:,.0f} images/s"
        for row in rows
    ]
    report(ref, store, "Compression", [*lines, f"- chosen: **{selection['chosen']}**. {selection['reason']}"])
    report_table("kiln-compression", rows, "Model variants re-evaluated with onnxruntime on the test set (CPU)")
    return ref
