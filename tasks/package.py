"""Stage 8, package: a self-contained deployment bundle and its .tar.gz (layout in kiln/bundle.py).

Inputs: the dataset (class names), the trained model (architecture, training metrics), the evaluation, the ONNX
export and the compression report (which variant ships and why).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from kiln.bundle import archive_bundle, load_bundle, write_bundle_manifest
from kiln.config import PackageConfig, StoreConfig
from kiln.dataset import read_info
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json, write_json
from tasks._task import report, stage_task
from tasks.compress import REPORT_FILE, SELECTION_FILE
from tasks.export import MODEL_FILE as FP32_FILE
from tasks.export import PARITY_FILE, PREPROCESS_FILE

STAGE = Stage("package", __name__)


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
        bundle_dir = out_dir / f"{config.model_name}-{version}"
        bundle_dir.mkdir()
        shutil.copyfile(dirs["exported"] / FP32_FILE, bundle_dir / "model.fp32.onnx")
        shutil.copyfile(chosen_dir / selection["file"], bundle_dir / "model.onnx")
        shutil.copyfile(dirs["exported"] / PREPROCESS_FILE, bundle_dir / "preprocess.json")
        info = read_info(dirs["dataset"])
        write_json(bundle_dir / "labels.json", info.classes)
        evaluation_metrics = read_json(dirs["evaluation"] / "metrics.json")
        compression = pd.read_csv(dirs["compressed"] / REPORT_FILE)
        metrics = {
            "evaluation": evaluation_metrics,
            "compression": compression.to_dict(orient="records"),
            "chosen_variant": selection["chosen"],
            "selection_reason": selection["reason"],
        }
        write_json(bundle_dir / "metrics.json", metrics)
        write_json(bundle_dir / "provenance.json", provenance(store, inputs))
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
        }

    return STAGE.produce(store, config, inputs, build)


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
        f"- shipped variant: **{metrics['chosen_variant']}** ({metrics['selection_reason']})",
        "",
        "## Training",
        f"- data: {info.counts['train']} training images ({training['validation_samples']} of them held out to "
        f"watch each epoch), {info.counts['test']} test images; classes: " + ", ".join(info.classes),
        f"- {training['epochs']} epochs, optimizer {train_config['optimizer']}, peak lr {train_config['lr']}, "
        f"batch {train_config['batch_size']}, on {training['device']} ({training['precision']}), "
        f"{training['train_seconds']} s",
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
        _markdown_table(compression),
        "",
        "## Use",
        "```",
        f"kiln predict {config.model_name}-{version} image1.png image2.jpg",
        "```",
        "Needs only onnxruntime, numpy and pillow. `manifest.json` lists every file's sha256; the predictor "
        "verifies them before loading the model.",
        "",
        "## Limitations",
        "- Measured on the test split above only; accuracy on images unlike the training data (other sizes, "
        "domains, lighting) is unknown.",
        "- Class balance of the training data shapes the errors: see the per-class table before deploying.",
        "",
    ]
    return "\n".join(lines)


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
    artifact_store = ArtifactStore(store.root)
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
