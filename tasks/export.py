"""Export stage: the trained PyTorch model -> `model.fp32.onnx` that outputs probabilities, checked before it ships.

Output files:
    model.fp32.onnx    input `input` float32 [N, C, H, W] (dynamic N), output `probabilities` float32 [N, classes]
    preprocess.json    copied from the train output: how images become `input`
    parity.json        PyTorch vs onnxruntime on the first `parity_samples` test images, and the exporter used

Checks, any of which raises ExportError and publishes nothing: onnx.checker (full), the graph's input/output
names and dynamic batch axis, batch sizes other than the export example's, probabilities summing to 1, and parity
(max |p_torch - p_onnx| <= parity_atol, top-1 agreement >= min_top1_agreement).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kiln.config import ExportConfig, StoreConfig
from kiln.dataset import read_info, read_split
from kiln.errors import ExportError
from kiln.models import load_model
from kiln.onnx_export import EXAMPLE_BATCH, export_onnx, torch_probabilities
from kiln.onnx_tools import INPUT_NAME, OUTPUT_NAME, check_onnx_file, ort_session, run_onnx, top1_agreement
from kiln.runtime.preprocess import Preprocessing
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json, write_json
from tasks._task import report, stage_task

STAGE = Stage("export", __name__)
MODEL_FILE = "model.fp32.onnx"
PREPROCESS_FILE = "preprocess.json"
PARITY_FILE = "parity.json"
SUM_TOLERANCE = 1e-4  # |sum of probabilities - 1| allowed: the graph must end in a softmax
DYNAMIC_BATCH_SIZES = (1, 3)  # both differ from the export example's batch (EXAMPLE_BATCH = 2)


def export(config: ExportConfig, model: ArtifactRef, dataset: ArtifactRef, store: ArtifactStore) -> ArtifactRef:
    """Export `model` (a train output) to ONNX and check it against PyTorch on `dataset`'s test images.

    Returns the export output's reference (reused when already in the store). Raises ExportError when a check fails.
    """

    def build(out_dir: Path) -> dict[str, Any]:
        model_dir, dataset_dir = store.materialize(model), store.materialize(dataset)
        classifier, spec = load_model(model_dir)
        prep = Preprocessing.from_json(read_json(model_dir / PREPROCESS_FILE))
        _check_dataset_fits(prep, read_info(dataset_dir).image_shape, dataset.uri)

        info = export_onnx(classifier, prep, out_dir / MODEL_FILE, config.opset)
        check_onnx_file(out_dir / MODEL_FILE)
        session = ort_session(out_dir / MODEL_FILE)
        _check_interface(session, spec.num_classes, out_dir / MODEL_FILE)

        test_images, _ = read_split(dataset_dir, "test")
        inputs = prep.normalize(test_images[: config.parity_samples])
        parity = _parity(session, classifier, inputs)
        parity.update(
            exporter=info.exporter,
            dynamo_error=info.dynamo_error,
            opset=info.opset,
            example_batch=info.example_batch,
            parity_atol=config.parity_atol,
            min_top1_agreement=config.min_top1_agreement,
        )
        _gate(parity, config, out_dir / MODEL_FILE)

        shutil.copyfile(model_dir / PREPROCESS_FILE, out_dir / PREPROCESS_FILE)
        write_json(out_dir / PARITY_FILE, parity)
        return {
            "exporter": info.exporter,
            "opset": info.opset,
            "model": spec.name,
            "size_bytes": (out_dir / MODEL_FILE).stat().st_size,
            "parity_samples": parity["samples"],
            "max_abs_diff": parity["max_abs_diff"],
            "top1_agreement": parity["top1_agreement"],
        }

    return STAGE.produce(store, config, {"model": model, "dataset": dataset}, build)


def _check_dataset_fits(prep: Preprocessing, image_shape: tuple[int, ...], dataset_uri: str) -> None:
    expected = (prep.height, prep.width, prep.channels)
    if tuple(image_shape) != expected:
        raise ExportError(
            f"the dataset at {dataset_uri} has images of shape {tuple(image_shape)} (H, W, C) but the model was "
            f"trained on {expected}; pass the dataset the model was trained on"
        )


def _check_interface(session, num_classes: int, path: Path) -> None:
    """The graph must take `input` [batch, C, H, W] and return `probabilities` [batch, classes]."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names = ([item.name for item in inputs], [item.name for item in outputs])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportError(f"{path} has inputs/outputs {names}, expected ([{INPUT_NAME!r}], [{OUTPUT_NAME!r}])")
    batch_dim, classes_dim = inputs[0].shape[0], outputs[0].shape[-1]
    if isinstance(batch_dim, int):
        raise ExportError(f"{path} has a fixed batch size {batch_dim}; its first input axis must be dynamic")
    if classes_dim != num_classes:
        raise ExportError(f"{path} outputs {classes_dim} classes, but the model has {num_classes}")


def _parity(session, classifier, inputs: np.ndarray) -> dict[str, Any]:
    """Compare PyTorch and onnxruntime probabilities on `inputs`, at several batch sizes."""
    reference = torch_probabilities(classifier, inputs)
    try:
        candidate = run_onnx(session, inputs)
        # Batch sizes other than the export example's prove the batch axis really is dynamic.
        per_size_diff = {
            size: float(np.abs(run_onnx(session, inputs[:size], batch_size=size) - reference[:size]).max())
            for size in DYNAMIC_BATCH_SIZES
            if size <= len(inputs) and size != EXAMPLE_BATCH
        }
    except Exception as error:  # onnxruntime raises its own types (InvalidArgument, Fail, ...)
        raise ExportError(
            f"onnxruntime could not run the exported model on batches of {len(inputs)} and "
            f"{DYNAMIC_BATCH_SIZES}: {error.__class__.__name__}: {error}"
        ) from error
    return {
        "samples": len(inputs),
        "max_abs_diff": float(np.abs(candidate - reference).max()),
        "max_abs_diff_by_batch_size": {str(size): diff for size, diff in per_size_diff.items()},
        "top1_agreement": top1_agreement(candidate, reference),
        "max_sum_deviation": float(np.abs(candidate.sum(axis=1) - 1.0).max()),
    }


def _gate(parity: dict[str, Any], config: ExportConfig, path: Path) -> None:
    worst_diff = max([parity["max_abs_diff"], *parity["max_abs_diff_by_batch_size"].values()])
    problems = []
    if not worst_diff <= config.parity_atol:  # `not <=` also catches NaN
        problems.append(f"max |p_torch - p_onnx| = {worst_diff:.3g} exceeds export.parity_atol = {config.parity_atol}")
    if not parity["top1_agreement"] >= config.min_top1_agreement:
        problems.append(
            f"top-1 agreement {parity['top1_agreement']:.4f} is below export.min_top1_agreement = "
            f"{config.min_top1_agreement}"
        )
    if not parity["max_sum_deviation"] <= SUM_TOLERANCE:
        problems.append(f"probabilities sum to 1 +- {parity['max_sum_deviation']:.3g}, more than {SUM_TOLERANCE}")
    if problems:
        raise ExportError(
            f"{path.name} ({parity['exporter']} exporter, opset {parity['opset']}) fails its parity check on "
            f"{parity['samples']} test images: " + "; ".join(problems) + ". Nothing was published; "
            "inspect the model for export-unfriendly operators, or loosen export.parity_atol if the gap is benign"
        )


@stage_task(STAGE)
def export_task(config: ExportConfig, model: ArtifactRef, dataset: ArtifactRef, store: StoreConfig) -> ArtifactRef:
    """Export the trained model to ONNX and check its parity with PyTorch."""
    ref = export(config, model, dataset, ArtifactStore(store.root, store.on_corrupt))
    metrics = ArtifactStore(store.root, store.on_corrupt).manifest(ref).metrics
    report(
        ref,
        store,
        "ONNX export",
        [
            f"- exporter: {metrics['exporter']}, opset {metrics['opset']}, {metrics['size_bytes']:,} bytes",
            f"- parity on {metrics['parity_samples']} test images: max |Δp| = {metrics['max_abs_diff']:.2e}, "
            f"top-1 agreement {metrics['top1_agreement']:.2%}",
        ],
    )
    return ref
