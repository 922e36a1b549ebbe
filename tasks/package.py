"""Stage 8, package: a self-contained deployment bundle and its .tar.gz (layout in kiln/runtime/bundle.py).

Inputs: the dataset (class names), the trained model (architecture, training metrics), the evaluation, the ONNX
export and the compression report (which variant ships and why).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kiln.bundle import archive_bundle, load_bundle, write_bundle_manifest
from kiln.config import PackageConfig, StoreConfig
from kiln.dataset import read_info, read_split
from kiln.deploy_files import write_runtime
from kiln.errors import BundleError
from kiln.onnx_graph import add_image_preprocessing, expose_model_input
from kiln.onnx_tools import ort_session, run_onnx
from kiln.runtime.bundle import RAW_MODEL_FILE, TENSOR_MODEL_FILE
from kiln.runtime.onnx_runtime import RAW_INPUT_NAME
from kiln.runtime.preprocess import Preprocessing
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json, write_json
from kiln.triton import write_triton_repository
from tasks._task import report, stage_task
from tasks.compress import REPORT_FILE, SELECTION_FILE
from tasks.export import MODEL_FILE as FP32_FILE
from tasks.export import PARITY_FILE, PREPROCESS_FILE

STAGE = Stage("package", __name__)
TRITON_DIR = "triton"
# The raw-image graph repeats numpy's float32 preprocessing op for op; only operator fusion may differ.
RAW_INPUT_ATOL = 1e-6
RAW_PARITY_ATOL = 1e-5
PARITY_CHUNK = 1024
SELECTION_POLICY_KEYS = ("objective", "max_accuracy_drop", "fp32_accuracy", "accuracy_drop", "candidates", "rejected")
# The compression report's columns the model card shows (metrics.json keeps them all).
CARD_COMPRESSION_COLUMNS = (
    "variant", "accuracy", "agreement_with_fp32", "size_bytes", "params", "macs", "p50_ms", "p95_ms", "throughput_ips",
    "qualifies",
)  # fmt: skip


def package(
    config: PackageConfig,
    dataset: ArtifactRef,
    model: ArtifactRef,
    evaluation: ArtifactRef,
    exported: ArtifactRef,
    compressed: ArtifactRef,
    store: ArtifactStore,
) -> ArtifactRef:
    """Assemble, checksum, self-check and archive the bundle."""
    inputs = {"dataset": dataset, "model": model, "evaluation": evaluation, "exported": exported,
              "compressed": compressed}  # fmt: skip
    version = config.version or STAGE.key(config, inputs)[:12]

    def build(out_dir: Path):
        dirs = {name: store.materialize(ref) for name, ref in inputs.items()}
        selection = read_json(dirs["compressed"] / SELECTION_FILE)
        chosen_dir = dirs["exported"] if selection["stage"] == "export" else dirs["compressed"]
        info = read_info(dirs["dataset"])
        prep = Preprocessing.from_json(read_json(dirs["exported"] / PREPROCESS_FILE))
        bundle_dir = out_dir / f"{config.model_name}-{version}"
        bundle_dir.mkdir()
        shutil.copyfile(dirs["exported"] / FP32_FILE, bundle_dir / TENSOR_MODEL_FILE)
        add_image_preprocessing(chosen_dir / selection["file"], prep, bundle_dir / RAW_MODEL_FILE, info.classes)
        raw_parity = check_raw_model(bundle_dir / RAW_MODEL_FILE, chosen_dir / selection["file"], prep, dirs["dataset"])
        shutil.copyfile(dirs["exported"] / PREPROCESS_FILE, bundle_dir / "preprocess.json")
        write_json(bundle_dir / "labels.json", info.classes)
        evaluation_metrics = read_json(dirs["evaluation"] / "metrics.json")
        compression = pd.read_csv(dirs["compressed"] / REPORT_FILE)
        metrics = {
            "evaluation": evaluation_metrics,
            "compression": compression.to_dict(orient="records"),
            "chosen_variant": selection["chosen"],
            "selection_reason": selection["reason"],
            "selection_policy": {key: selection.get(key) for key in SELECTION_POLICY_KEYS},
            "raw_input_parity": raw_parity,
        }
        write_json(bundle_dir / "metrics.json", metrics)
        write_json(bundle_dir / "provenance.json", provenance(store, inputs))
        write_triton_repository(
            bundle_dir / TRITON_DIR, config.model_name, bundle_dir / RAW_MODEL_FILE, info.classes, config.triton_max_batch
        )
        write_runtime(bundle_dir, image_name=f"{config.model_name}:{version}")
        card = model_card(config, version, info, store.manifest(model), dirs, metrics)
        (bundle_dir / "model_card.md").write_text(card)
        write_bundle_manifest(
            bundle_dir, config.model_name, version, {"chosen_variant": selection["chosen"], "classes": info.classes}
        )
        load_bundle(bundle_dir)  # the bundle must verify and load before it is published
        if config.archive:
            archive_bundle(bundle_dir, out_dir / f"{bundle_dir.name}.tar.gz")
        return {
            "bundle": bundle_dir.name,
            "archive": f"{bundle_dir.name}.tar.gz" if config.archive else None,
            "version": version,
            "chosen_variant": selection["chosen"],
            "accuracy": evaluation_metrics["accuracy"],
            "blessed": evaluation_metrics["blessed"],
            "raw_input_max_abs_diff": raw_parity["max_abs_diff"],
        }

    return STAGE.produce(store, config, inputs, build)


def check_raw_model(raw_path: Path, tensor_path: Path, prep: Preprocessing, dataset_dir: Path) -> dict[str, Any]:
    """Run the raw-image model and the tensor-in model it wraps on every test image. Raise BundleError unless the
    raw model's front end computes numpy's preprocessing (within RAW_INPUT_ATOL), both give the same probabilities
    (within RAW_PARITY_ATOL), and class_index is their arg-max everywhere."""
    images, _ = read_split(dataset_dir, "test")
    raw_session = ort_session(expose_model_input(raw_path))
    tensor_session = ort_session(tensor_path)
    input_diff, probability_diff, disagreements = 0.0, 0.0, 0
    for start in range(0, len(images), PARITY_CHUNK):
        chunk = images[start : start + PARITY_CHUNK]
        probabilities, class_index, model_input = raw_session.run(None, {RAW_INPUT_NAME: chunk})
        expected_input = prep.normalize(chunk)
        # The same batches on both sides: a dynamically quantized model's activation scales depend on the batch.
        reference = run_onnx(tensor_session, expected_input, batch_size=len(chunk))
        input_diff = max(input_diff, float(np.abs(model_input - expected_input).max()))
        probability_diff = max(probability_diff, float(np.abs(probabilities - reference).max()))
        disagreements += int((class_index != reference.argmax(axis=1)).sum())
    if not (input_diff <= RAW_INPUT_ATOL and probability_diff <= RAW_PARITY_ATOL) or disagreements:
        raise BundleError(
            f"{raw_path.name} (preprocessing inside the graph) differs from {tensor_path.name} on the test set: "
            f"model input max |Δ| {input_diff:.3g} (allowed {RAW_INPUT_ATOL}), probabilities max |Δ| "
            f"{probability_diff:.3g} (allowed {RAW_PARITY_ATOL}), {disagreements} top-1 disagreements; nothing was "
            "published. This is a kiln bug: please report it with the model's preprocess.json"
        )
    return {
        "samples": len(images),
        "max_input_abs_diff": input_diff,
        "max_abs_diff": probability_diff,
        "class_index_disagreements": disagreements,
    }


def provenance(store: ArtifactStore, inputs: dict[str, ArtifactRef]) -> dict[str, Any]:
    """Every stage output the bundle descends from: key, content digest, code version, resolved config, versions."""
    lineage: dict[str, Any] = {}
    pending = list(inputs.values())
    while pending:
        ref = pending.pop()
        if ref.stage in lineage:
            continue
        manifest = store.manifest(ref)
        lineage[ref.stage] = {
            "key": manifest.key,
            "digest": manifest.digest,
            "code_version": manifest.code_version,
            "created_at": manifest.created_at,
            "config": manifest.config,
            "versions": manifest.versions,
        }
        pending += [ArtifactRef(**upstream) for upstream in manifest.inputs.values()]
    order = ["download", "augment", "train", "evaluate", "export", "compress"]
    ranked = sorted(lineage, key=lambda stage: order.index(stage) if stage in order else len(order))
    return {"stages": {stage: lineage[stage] for stage in ranked}}


def bundle_location(ref: ArtifactRef, store: ArtifactStore) -> tuple[str, str | None]:
    """(bundle folder URI, archive URI or None) of a package output."""
    metrics = store.manifest(ref).metrics
    archive = f"{ref.uri}/{metrics['archive']}" if metrics.get("archive") else None
    return f"{ref.uri}/{metrics['bundle']}", archive


def model_card(
    config: PackageConfig,
    version: str,
    info,
    train_manifest,
    dirs: dict[str, Path],
    metrics: dict[str, Any],
) -> str:
    """A model card (Mitchell et al., 2019) in markdown, filled from the stage outputs."""
    evaluation = metrics["evaluation"]
    training = train_manifest.metrics
    train_config = train_manifest.config
    per_class = pd.read_csv(dirs["evaluation"] / "per_class.csv")
    compression = pd.DataFrame(metrics["compression"])
    compression = compression[[column for column in CARD_COMPRESSION_COLUMNS if column in compression.columns]]
    parity = read_json(dirs["exported"] / PARITY_FILE)
    verdict = "blessed" if evaluation["blessed"] else "NOT blessed (below the gate; do not deploy)"
    lines = [
        f"# Model card: {config.model_name} {version}",
        "",
        f"An image classifier for **{info.num_classes} classes** of the `{info.name}` dataset, trained and packaged "
        f"by kiln. Status: **{verdict}**.",
        "",
        "## Model",
        f"- architecture: `{training['model']}`, {training['parameters']:,} parameters",
        f"- input: {info.image_shape[0]}x{info.image_shape[1]} pixels, {info.image_shape[2]} channel(s); "
        "see `preprocess.json` for resizing and normalization",
        f"- shipped variant: **{metrics['chosen_variant']}** (why: see Compression and export below)",
        "",
        "## Training",
        f"- data: {info.counts['train']} training images ({training['validation_samples']} of them held out to "
        f"watch each epoch), {info.counts['test']} test images; classes: " + ", ".join(info.classes),
        training_line(training, train_config),
        "",
        "## Evaluation (held-out test split)",
        f"- accuracy **{evaluation['accuracy']:.4f}**, macro F1 {evaluation['macro_f1']:.4f}, "
        f"gate: accuracy ≥ {evaluation['min_accuracy']}",
        "",
        _markdown_table(per_class),
        "",
        "## Compression and export",
        f"- ONNX export parity vs PyTorch: max |Δp| {parity['max_abs_diff']:.2e}, "
        f"top-1 agreement {parity['top1_agreement']:.4f}",
        "",
        *_selection_lines(metrics),
        "",
        _markdown_table(compression),
        "",
        "Every variant was re-evaluated with onnxruntime on the full test split and timed on the CPU of the machine "
        "that ran the compress stage, all in the same run (latency at batch 1, throughput at batch 64).",
        "",
        "## Use",
        f"`model.onnx` takes raw images: `image` uint8 [N, {info.image_shape[0]}, {info.image_shape[1]}, "
        f"{info.image_shape[2]}] (NHWC) and returns `probabilities` float32 [N, {info.num_classes}] and `class_index` "
        "int64 [N]; scaling and normalization happen inside the graph. `model.fp32.onnx` takes the normalized "
        "float32 NCHW tensor described in `preprocess.json`. Class names are in `labels.json` and in the ONNX "
        "metadata (`classes`).",
        "",
        "```",
        f"kiln predict {config.model_name}-{version} image1.png image2.jpg     # command line",
        f"kiln serve {config.model_name}-{version} --port 8080                 # HTTP, where kiln is installed",
        "python -m kiln_runtime.server . --port 8080                        # HTTP, inside this folder, no kiln",
        f"docker build -t {config.model_name}:{version} . && docker run -p 8080:8080 {config.model_name}:{version}",
        "curl -F image=@photo.jpg http://127.0.0.1:8080/v1/predict",
        "```",
        "The server needs only the packages in `requirements.txt`. `triton/` is a Triton Inference Server model "
        "repository for the same raw-image model (`tritonserver --model-repository=triton`). `manifest.json` lists "
        "every file's sha256; the predictor and the server verify them before loading the model.",
        "",
        "## Limitations",
        "- Measured on the test split above only; accuracy on images unlike the training data (other sizes, "
        "domains, lighting) is unknown.",
        "- Class balance of the training data shapes the errors: see the per-class table before deploying.",
        "",
    ]
    return "\n".join(lines)


def training_line(training: dict[str, Any], train_config: dict[str, Any]) -> str:
    """The model card's line on how it was trained, from the train stage's metrics and config."""
    lr = f"peak lr {train_config['lr']}"
    if train_config["optimizer"] == "muon":
        lr += f" (filters: {train_config['muon_lr']})"
    batch = f"batch {train_config['batch_size']}"
    if train_config.get("keep_hardest"):  # absent from manifests written before the setting existed
        share = 100 * train_config["keep_hardest"]
        batch += f" (trained on the hardest {share:g} % of each, ranked by a proxy network)"
    return (f"- {training['epochs']} epochs, optimizer {train_config['optimizer']}, {lr}, {batch}, on "
            f"{training['device']} ({training['precision']}), {training['train_seconds']} s")


def _selection_lines(metrics: dict[str, Any]) -> list[str]:
    """Why the shipped variant ships: the policy's inputs, the variants that qualified and why the others did not."""
    policy = metrics.get("selection_policy") or {}
    lines = [f"- shipped: **{metrics['chosen_variant']}**. {metrics['selection_reason']}"]
    if policy.get("objective") is not None:
        lines.append(
            f"- policy: among variants at most {policy['max_accuracy_drop']} less accurate than fp32 "
            f"(`compress.max_accuracy_drop`) and not excluded, the best by `compress.objective` = "
            f"{policy['objective']}; qualifying: {', '.join(policy.get('candidates') or ['fp32'])}"
        )
    for variant, why in (policy.get("rejected") or {}).items():
        lines.append(f"- not eligible: {variant} ({why})")
    return lines


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(column) for column in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


@stage_task(STAGE)
def package_task(
    config: PackageConfig,
    dataset: ArtifactRef,
    model: ArtifactRef,
    evaluation: ArtifactRef,
    exported: ArtifactRef,
    compressed: ArtifactRef,
    store: StoreConfig,
) -> ArtifactRef:
    """Build the deployment bundle."""
    artifact_store = ArtifactStore(store.root, store.on_corrupt)
    ref = package(config, dataset, model, evaluation, exported, compressed, artifact_store)
    bundle, archive = bundle_location(ref, artifact_store)
    metrics = artifact_store.manifest(ref).metrics
    report(ref, store, "Deployment bundle", [
        f"- bundle: `{bundle}`",
        f"- archive: `{archive}`" if archive else "- archive: not written (package.archive=false)",
        f"- ships `{metrics['chosen_variant']}`, test accuracy {metrics['accuracy']:.4f}, "
        f"{'blessed' if metrics['blessed'] else 'NOT blessed'}",
    ])  # fmt: skip
    return ref
