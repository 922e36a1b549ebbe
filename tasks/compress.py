"""Compress stage: build the compressed variants of the exported model, re-evaluate each against fp32 on the full
test set, measure them side by side, and pick the one to ship (kiln/compression/ does the work).

Variants (`compress.variants`): int8_static (QDQ, calibrated), int8_dynamic (linear layers), fp16 (GPU serving),
prune_structured (channels removed, fine-tuned), prune_unstructured (weights zeroed, fine-tuned), distill (a
smaller student) and distill_int8 (that student in int8). The last four retrain from the train output.

Output files:
    model.<variant>.onnx     one per variant, with kiln's `input` -> `probabilities` interface, checked by
                             onnx.checker (and, for retrained ones, against PyTorch) and run by onnxruntime
    compression_report.csv   one row per variant, fp32 first: accuracy on the full test set, drop and top-1
                             agreement against fp32, file and gzip size, parameters, zero weights, multiply-accumulates,
                             batch-1 latency p50/p95, batch-64 throughput (all variants timed interleaved, same CPU,
                             same run), Pareto front, whether it qualifies, and a note on what it is
    predictions.<variant>.npy  int64 top-1 class per test image, for later parity checks
    history.<variant>.csv    per-epoch fine-tuning or distillation history (retrained variants)
    variants.json            how each variant was made (kept channel widths, sparsity, student, epochs)
    selection.json           the variant to ship, the policy's inputs, the qualifying variants and why others lost
    report/pareto.png        accuracy vs latency scatter (outside the content digest)

The fp32 model is not copied: it stays in the export output, which selection.json points to.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
from torch import nn

from kiln.compression.distillation import build_student, distill
from kiln.compression.finetune import fine_tune, teacher_recipe, to_cpu_fp32
from kiln.compression.measure import count_macs, count_parameters, gzip_size, time_sessions, zero_weight_fraction
from kiln.compression.plot import save_pareto_plot
from kiln.compression.pruning import make_pruning_permanent, prune_channels, prune_unstructured, weight_sparsity
from kiln.compression.quantization import (  # noqa: F401 - calibration_images and quantize_int8 are this stage's API
    calibration_images,
    convert_fp16,
    quantize_dynamic_int8,
    quantize_int8,
)
from kiln.compression.selection import FP32, VARIANT_NOTES, pareto_front, select_variant
from kiln.config import CompressConfig, StoreConfig
from kiln.dataset import read_split
from kiln.errors import ConfigError, ExportError
from kiln.models import load_model
from kiln.onnx_export import default_opset, export_onnx, torch_probabilities
from kiln.onnx_tools import check_onnx_file, ort_session, run_onnx, top1_agreement
from kiln.runtime.preprocess import Preprocessing
from kiln.stage import Stage
from kiln.store import REPORT_DIR, ArtifactRef, ArtifactStore, read_json, write_json
from kiln.training import AugmentedImages, Runtime, resolve_runtime
from tasks._task import report, report_table, stage_task
from tasks.export import MODEL_FILE as FP32_FILE
from tasks.export import PREPROCESS_FILE

LOGGER = logging.getLogger("kiln")
STAGE = Stage("compress", __name__)
VARIANT_ORDER = (  # build order: distill_int8 quantizes the distill output
    "int8_static", "int8_dynamic", "fp16", "prune_structured", "prune_unstructured", "distill", "distill_int8",
)  # fmt: skip
RETRAINED = frozenset({"prune_structured", "prune_unstructured", "distill", "distill_int8"})  # need the train output
REPORT_FILE = "compression_report.csv"
SELECTION_FILE = "selection.json"
DETAILS_FILE = "variants.json"
PLOT_FILE = f"{REPORT_DIR}/pareto.png"
REPORT_COLUMNS = (
    "variant", "file", "accuracy", "accuracy_drop", "agreement_with_fp32", "size_bytes", "gzip_size_bytes", "params",
    "zero_weight_fraction", "macs", "p50_ms", "p95_ms", "throughput_ips", "throughput_vs_fp32", "pareto", "qualifies",
    "note",
)  # fmt: skip
METRIC_FIELDS = (
    "accuracy", "agreement_with_fp32", "size_bytes", "params", "macs", "p50_ms", "p95_ms", "throughput_ips",
)  # fmt: skip
EVAL_CHUNK = 2048  # test images normalized at a time
THROUGHPUT_BATCH = 64
PARITY_SAMPLES = 64  # test images on which a retrained variant's ONNX export must match PyTorch
PARITY_ATOL = 1e-4


def variant_file(variant: str) -> str:
    return FP32_FILE if variant == FP32 else f"model.{variant}.onnx"


def compress(
    config: CompressConfig,
    exported: ArtifactRef,
    dataset: ArtifactRef,
    store: ArtifactStore,
    model: ArtifactRef | None = None,
) -> ArtifactRef:
    """Build `config.variants` from `exported` (and, for pruning/distillation, from the train output `model`),
    evaluate every variant and fp32 on `dataset`'s test set, and choose the one to ship.

    Returns the compress output's reference (reused when already in the store). Raises ConfigError when a variant
    needs `model` and none was given, ExportError when a variant's graph is invalid or does not match PyTorch.
    """
    retrained = [name for name in config.variants if name in RETRAINED]
    if retrained and model is None:
        raise ConfigError(
            f"compress.variants {retrained} retrain from the trained model, but the compress stage got no train "
            "output: pass model=<train output> (the training flow does), or remove them from compress.variants"
        )
    inputs = {"exported": exported, "dataset": dataset} | ({"model": model} if model is not None else {})
    key = STAGE.key(config, inputs)

    def build(out_dir: Path) -> dict[str, Any]:
        export_dir, dataset_dir = store.materialize(exported), store.materialize(dataset)
        prep = Preprocessing.from_json(read_json(export_dir / PREPROCESS_FILE))
        fp32_path = export_dir / FP32_FILE
        test_images, test_labels = read_split(dataset_dir, "test")
        # Fine-tuning and distillation checkpoint every epoch there, so a killed compress resumes them.
        scratch = store.scratch_dir(STAGE.name, key)
        builder = _Builder(config, fp32_path, prep, dataset_dir, out_dir, test_images[:PARITY_SAMPLES], scratch)
        if retrained:
            builder.load_teacher(store, model)
        sources = {FP32: fp32_path}  # variant -> the float graph its parameters and MACs are read from
        for name in (name for name in VARIANT_ORDER if name in config.variants):
            LOGGER.info(f"compress: building {name}")
            sources[name] = builder.build(name)
        write_json(out_dir / DETAILS_FILE, builder.details)

        rows = evaluate_variants(sources, export_dir, out_dir, test_images, test_labels, prep, config)
        selection = select_variant(rows, config)
        for row in rows:
            row["qualifies"] = row["variant"] in selection["candidates"]
        pd.DataFrame(rows, columns=list(REPORT_COLUMNS)).to_csv(out_dir / REPORT_FILE, index=False)
        write_json(out_dir / SELECTION_FILE, selection)
        (out_dir / REPORT_DIR).mkdir(exist_ok=True)
        save_pareto_plot(rows, selection, out_dir / PLOT_FILE)

        metrics: dict[str, Any] = {
            "chosen": selection["chosen"],
            "objective": config.objective,
            "test_samples": len(test_labels),
        }
        for row in rows:
            metrics.update({f"{row['variant']}_{field}": row[field] for field in METRIC_FIELDS})
        return metrics

    ref = STAGE.produce(store, config, inputs, build)
    shutil.rmtree(store.scratch_dir(STAGE.name, key), ignore_errors=True)  # published: checkpoints are done
    return ref


class _Builder:
    """Makes each variant's ONNX file in the output directory; keeps what retraining needs and what it did."""

    def __init__(self, config, fp32_path: Path, prep: Preprocessing, dataset_dir: Path, out_dir: Path, parity_images,
                 scratch: Path):  # fmt: skip
        self.config, self.fp32_path, self.prep, self.out_dir, self.scratch = config, fp32_path, prep, out_dir, scratch
        self.parity_images = parity_images
        self.opset = default_opset(onnx.load(str(fp32_path), load_external_data=False))
        self.train_images, self.train_labels = read_split(dataset_dir, "train")
        self.details: dict[str, dict[str, Any]] = {}
        self._calibration: np.ndarray | None = None
        self.teacher: nn.Module | None = None

    @property
    def calibration(self) -> np.ndarray:
        if self._calibration is None:
            self._calibration = calibration_images(
                self.train_images, self.train_labels, self.config.calibration_samples, self.prep
            )
        return self._calibration

    def load_teacher(self, store: ArtifactStore, model: ArtifactRef) -> None:
        """The trained model, the recipe it was trained with, its augmentation and where to retrain."""
        self.teacher, self.spec = load_model(store.materialize(model))
        manifest = store.manifest(model)
        self.recipe = teacher_recipe(manifest.config, self.spec.name)
        policy = manifest.inputs.get("policy")
        # The train stage's augmentation, so retraining sees the same kind of images (none for a bare model); the
        # spec lets fit run it batched on the GPU, as the train stage did.
        self.policy_spec = read_json(store.materialize(ArtifactRef(**policy)) / "policy.json") if policy else None
        self.runtime: Runtime = resolve_runtime(self.recipe.device, self.recipe.precision)
        for note in self.runtime.notes:
            LOGGER.warning(note)

    def build(self, name: str) -> Path:
        """Write `name`'s ONNX file; returns the float graph its static figures are read from."""
        path, config = self.out_dir / variant_file(name), self.config
        if name == "int8_static":
            quantize_int8(self.fp32_path, path, self.calibration, config)
            return self.fp32_path
        if name == "int8_dynamic":
            quantize_dynamic_int8(self.fp32_path, path, config)
            return self.fp32_path
        if name == "fp16":
            convert_fp16(self.fp32_path, path)
            return path
        if name == "distill_int8":
            student_path = self.out_dir / variant_file("distill")
            quantize_int8(student_path, path, self.calibration, config)
            self.details[name] = {"from": "distill", "calibrate_method": config.calibrate_method}
            return student_path
        retrain: dict[str, Callable[[], nn.Module]] = {
            "prune_structured": self._prune_structured,
            "prune_unstructured": self._prune_unstructured,
            "distill": self._distill,
        }
        model = retrain[name]()
        try:
            self._export_checked(model, path)
        except Exception:
            # Its training is checkpointed as finished: a retry would resume into the same failure, so retrain.
            self._checkpoint(name).unlink(missing_ok=True)
            raise
        return path

    def _train_set(self) -> AugmentedImages:
        """The training split with the train stage's augmentation; the spec lets fit run it on the GPU."""
        from kiln.augmentation import build_transform

        transform = build_transform(self.policy_spec) if self.policy_spec else None
        return AugmentedImages(self.train_images, self.train_labels, transform, self.policy_spec)

    def _checkpoint(self, name: str) -> Path:
        """Where `name`'s retraining checkpoints every epoch (kept until the output is published)."""
        return self.scratch / f"{name}.pt"

    def _prune_structured(self) -> nn.Module:
        pruned, widths = prune_channels(self.teacher, self.config.prune_amount)
        history = self._fine_tune(pruned, "prune_structured")
        self.details["prune_structured"] = {
            "amount": self.config.prune_amount,
            "channel_widths": [{"before": before, "after": after} for before, after in widths],
            "finetune_epochs": len(history),
        }
        return pruned

    def _prune_unstructured(self) -> nn.Module:
        sparse = prune_unstructured(self.teacher, self.config.sparsity)
        history = self._fine_tune(sparse, "prune_unstructured")  # the masks keep pruned weights at zero meanwhile
        make_pruning_permanent(sparse)
        self.details["prune_unstructured"] = {
            "requested_sparsity": self.config.sparsity,
            "weight_sparsity": round(weight_sparsity(sparse), 6),
            "finetune_epochs": len(history),
        }
        return sparse

    def _distill(self) -> nn.Module:
        config = self.config
        student, description = build_student(self.spec, config.distill_student, config.distill_width, self.recipe.seed)
        # No keep_hardest: the proxy ranks by the labels' loss, while the student learns mostly from the teacher.
        recipe = self.recipe.model_copy(update={"epochs": config.distill_epochs, "keep_hardest": None})
        history = distill(
            self.teacher,
            student,
            self._train_set(),
            self.prep,
            recipe,
            self.runtime,
            config.distill_temperature,
            config.distill_alpha,
            self._checkpoint("distill"),
            on_epoch=_log_epoch("distill", config.distill_epochs),
        )
        pd.DataFrame(history).to_csv(self.out_dir / "history.distill.csv", index=False)
        self.teacher.cpu()
        student_params = sum(parameter.numel() for parameter in student.parameters())
        teacher_params = sum(parameter.numel() for parameter in self.teacher.parameters())
        self.details["distill"] = {
            "student": description,
            "student_params": student_params,
            "teacher_params": teacher_params,
            "params_ratio": round(student_params / teacher_params, 4),
            "temperature": config.distill_temperature,
            "alpha": config.distill_alpha,
            "epochs": config.distill_epochs,
        }
        return to_cpu_fp32(student)

    def _fine_tune(self, model: nn.Module, name: str) -> list[dict[str, Any]]:
        history = fine_tune(
            model, self._train_set(), self.prep, self.recipe, self.runtime,
            self.config.finetune_epochs, self.config.finetune_lr_scale, self._checkpoint(name),
            _log_epoch(name, self.config.finetune_epochs),
        )  # fmt: skip
        if history:
            pd.DataFrame(history).to_csv(self.out_dir / f"history.{name}.csv", index=False)
        to_cpu_fp32(model)
        return history

    def _export_checked(self, model: nn.Module, path: Path) -> None:
        """Export a retrained model and hold its ONNX graph to the export stage's standard: checker and parity."""
        export_onnx(model, self.prep, path, self.opset)
        check_onnx_file(path)
        inputs = self.prep.normalize(self.parity_images)
        difference = float(np.abs(run_onnx(ort_session(path), inputs) - torch_probabilities(model, inputs)).max())
        if not difference <= PARITY_ATOL:  # `not <=` also catches NaN
            raise ExportError(
                f"{path.name}: onnxruntime and PyTorch disagree by up to {difference:.3g} (allowed {PARITY_ATOL}) on "
                f"{len(inputs)} test images; the retrained model does not export faithfully"
            )


def _log_epoch(name: str, epochs: int) -> Callable[[dict[str, Any]], None]:
    def log(row: dict[str, Any]) -> None:
        LOGGER.info(f"compress {name}: epoch {row['epoch']}/{epochs}, loss {row['train_loss']:.4f}, "
                    f"train acc {row['train_accuracy']:.3f}")  # fmt: skip

    return log


def evaluate_variants(
    sources: dict[str, Path],
    export_dir: Path,
    out_dir: Path,
    images: np.ndarray,
    labels: np.ndarray,
    prep: Preprocessing,
    config: CompressConfig,
) -> list[dict[str, Any]]:
    """One report row per variant (fp32 first): accuracy on the full test set, agreement with fp32, sizes, static
    figures from its float source graph, and timings measured for all variants together."""
    sessions, rows = {}, []
    fp32_probabilities: np.ndarray | None = None
    for name, source in sources.items():
        path = (export_dir if name == FP32 else out_dir) / variant_file(name)
        # Accuracy on every core; timing on a session of its own, with the threads the timing is meant for.
        session = ort_session(path)
        sessions[name] = ort_session(path, config.timing_threads) if config.timing_threads else session
        # Normalized in chunks: a float32 copy of a large test set of big images would not fit in memory at once.
        chunks = range(0, len(images), EVAL_CHUNK)
        probabilities = np.concatenate(
            [run_onnx(session, prep.normalize(images[start : start + EVAL_CHUNK])) for start in chunks]
        )
        fp32_probabilities = probabilities if fp32_probabilities is None else fp32_probabilities
        predictions = probabilities.argmax(axis=1).astype(np.int64)
        np.save(out_dir / f"predictions.{name}.npy", predictions)
        accuracy = round(float(np.mean(predictions == labels)), 6)
        rows.append({
            "variant": name,
            "file": path.name,
            "accuracy": accuracy,
            "accuracy_drop": round(rows[0]["accuracy"] - accuracy, 6) if rows else 0.0,
            "agreement_with_fp32": round(top1_agreement(probabilities, fp32_probabilities), 6),
            "size_bytes": path.stat().st_size,
            "gzip_size_bytes": gzip_size(path),
            "params": count_parameters(source),
            "zero_weight_fraction": zero_weight_fraction(source),
            "macs": count_macs(source),
            "note": VARIANT_NOTES.get(name, ""),
        })  # fmt: skip
    sample = prep.normalize(images[:1])
    batch = prep.normalize(np.resize(images, (THROUGHPUT_BATCH, *images.shape[1:])))  # repeats a small test set
    timings = time_sessions(sessions, sample, batch, config.latency_runs, config.throughput_seconds)
    for row in rows:
        row.update(timings[row["variant"]])
        row["throughput_vs_fp32"] = round(row["throughput_ips"] / max(timings[FP32]["throughput_ips"], 1e-9), 3)
    front = pareto_front(rows)
    for row in rows:
        row["pareto"] = row["variant"] in front
    return rows


@stage_task(STAGE)
def compress_task(
    config: CompressConfig,
    exported: ArtifactRef,
    dataset: ArtifactRef,
    store: StoreConfig,
    model: ArtifactRef | None = None,
) -> ArtifactRef:
    """Build the compressed variants, re-evaluate each on the test set and choose the one to ship."""
    artifact_store = ArtifactStore(store.root, store.on_corrupt)
    ref = compress(config, exported, dataset, artifact_store, model=model)
    output_dir = artifact_store.materialize(ref)
    selection = read_json(output_dir / SELECTION_FILE)
    rows = pd.read_csv(output_dir / REPORT_FILE).to_dict(orient="records")
    lines = [
        f"- {row['variant']}: accuracy {row['accuracy']:.2%}, {row['size_bytes']:,} bytes, {row['params']:,} params, "
        f"p50 {row['p50_ms']:.3f} ms, {row['throughput_ips']:,.0f} images/s ({row['throughput_vs_fp32']:.2f}x fp32)"
        f"{'' if row['qualifies'] else ', does not qualify'}"
        for row in rows
    ]
    lines.append(f"- chosen: **{selection['chosen']}** (objective {selection['objective']}, budget "
                 f"{selection['max_accuracy_drop']}). {selection['reason']}")  # fmt: skip
    report(ref, store, "Compression", lines)
    report_table(
        "kiln-compression",
        [{column: row[column] for column in REPORT_COLUMNS if column != "note"} for row in rows],
        "Model variants re-evaluated with onnxruntime on the full test set, timed on the same CPU in the same run",
    )
    return ref
