"""Stage 5, evaluate: score the trained model on the test split and decide whether it is blessed.

Output: `metrics.json` (accuracy, macro F1, the gate's threshold and verdict), `per_class.csv`,
`confusion_matrix.csv` + `.png`, `predictions.npy` (top-1 per test image, for parity checks downstream).
The gate itself (`check_gate`) is a separate, uncached step so that a cached evaluation still stops a bad model.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from kiln.config import EvaluateConfig, StoreConfig
from kiln.dataset import read_info, read_split
from kiln.errors import GateFailed
from kiln.imaging import save_confusion_matrix
from kiln.metrics import accuracy, confusion_matrix, per_class_table
from kiln.models import load_model
from kiln.runtime.preprocess import Preprocessing
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json, write_json
from kiln.training import predict_probabilities, resolve_runtime
from tasks._task import forward_kiln_logs, report, report_table, stage_task

LOGGER = logging.getLogger("kiln")
STAGE = Stage("evaluate", __name__)


def evaluate(config: EvaluateConfig, model: ArtifactRef, dataset: ArtifactRef, store: ArtifactStore) -> ArtifactRef:
    """Per-class metrics and a confusion matrix of `model` on `dataset`'s test split."""

    def build(out_dir):
        model_dir, data_dir = store.materialize(model), store.materialize(dataset)
        network, _ = load_model(model_dir)
        prep = Preprocessing.from_json(read_json(model_dir / "preprocess.json"))
        classes = read_info(data_dir).classes
        images, labels = read_split(data_dir, "test")
        runtime = resolve_runtime("auto", "fp32")  # scoring in fp32: the number users compare must not drift
        predictions = predict_probabilities(network, images, prep, runtime, config.batch_size).argmax(axis=1)
        matrix = confusion_matrix(labels, predictions, len(classes))
        table = per_class_table(matrix, classes)
        score = accuracy(labels, predictions)
        metrics = {
            "accuracy": round(score, 5),
            **_tta_accuracy(config, network, images, labels, prep, runtime),
            "macro_f1": round(float(table["f1"].mean()), 5),
            "test_samples": int(len(labels)),
            "min_accuracy": config.min_accuracy,
            "blessed": score >= config.min_accuracy,
        }
        np.save(out_dir / "predictions.npy", predictions.astype(np.int64))
        table.to_csv(out_dir / "per_class.csv", index=False)
        pd.DataFrame(matrix, index=classes, columns=classes).to_csv(out_dir / "confusion_matrix.csv")
        save_confusion_matrix(matrix, classes, out_dir / "confusion_matrix.png")
        write_json(out_dir / "metrics.json", metrics)
        return metrics

    return STAGE.produce(store, config, {"model": model, "dataset": dataset}, build)


def _tta_accuracy(config: EvaluateConfig, network, images, labels, prep, runtime) -> dict:
    if config.tta == "none":
        return {}
    probabilities = predict_probabilities(network, images, prep, runtime, config.batch_size, tta=config.tta)
    return {"accuracy_tta": round(accuracy(labels, probabilities.argmax(axis=1)), 5), "tta": config.tta}


def check_gate(config: EvaluateConfig, evaluation: ArtifactRef, store: ArtifactStore) -> bool:
    """True when blessed. Raises GateFailed when not blessed and config.on_gate_failure is "stop"."""
    metrics = read_json(store.materialize(evaluation) / "metrics.json")
    if metrics["blessed"]:  # the verdict evaluate recorded, so the gate and the bundle can never disagree
        return True
    message = (
        f"model accuracy {metrics['accuracy']:.5f} is below evaluate.min_accuracy {config.min_accuracy}: "
        f"train longer or a larger model (train.epochs, train.model), or lower the threshold"
    )
    if config.on_gate_failure == "stop":
        raise GateFailed(message + " (or set evaluate.on_gate_failure=continue to package it as not blessed)")
    LOGGER.warning(f"not blessed, packaging anyway: {message}")
    return False


@stage_task(STAGE)
def evaluate_task(config: EvaluateConfig, model: ArtifactRef, dataset: ArtifactRef, store: StoreConfig) -> ArtifactRef:
    """Score the model on the test split."""
    artifact_store = ArtifactStore(store.root, store.on_corrupt)
    ref = evaluate(config, model, dataset, artifact_store)
    metrics = artifact_store.manifest(ref).metrics
    verdict = "blessed" if metrics["blessed"] else "NOT blessed"
    report(ref, store, "Evaluation", [
        f"- test accuracy **{metrics['accuracy']:.4f}** on {metrics['test_samples']} images, macro F1 {metrics['macro_f1']:.4f}",
        *([f"- with test-time augmentation ({metrics['tta']}): {metrics['accuracy_tta']:.4f} (not what the bundle does)"]
          if "accuracy_tta" in metrics else []),
        f"- gate: accuracy ≥ {metrics['min_accuracy']} → **{verdict}**",
        f"- confusion matrix: `{ref.uri}/confusion_matrix.png`",
    ])  # fmt: skip
    per_class = pd.read_csv(artifact_store.materialize(ref) / "per_class.csv")
    report_table("kiln-evaluation-per-class", per_class.to_dict(orient="records"), "Per-class precision/recall/F1")
    return ref


@task(name="gate", cache_policy=NO_CACHE, persist_result=False)
@forward_kiln_logs
def gate_task(config: EvaluateConfig, evaluation: ArtifactRef, store: StoreConfig) -> bool:
    """Stop the pipeline here if the model is not blessed (unless configured to continue)."""
    return check_gate(config, evaluation, ArtifactStore(store.root, store.on_corrupt))
