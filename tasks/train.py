"""Stage 4, train: fit the configured model on the augmented training split, on CUDA when available.

Output: `weights.pt` (state_dict), `model.json` (architecture spec), `preprocess.json` (normalization),
`history.csv` (one row per epoch). A checkpoint after every epoch lives in the store's scratch area until the
output is published, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import shutil

import pandas as pd
import torch

from kiln.augmentation import build_transform
from kiln.config import StoreConfig, TrainConfig
from kiln.dataset import read_info, read_split, stratified_indices
from kiln.models import ModelSpec, build_model, save_model
from kiln.runtime.preprocess import Preprocessing
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json, write_json
from kiln.training import AugmentedImages, EpochCallback, fit, resolve_runtime
from tasks._task import Progress, report, report_table, stage_task

LOGGER = logging.getLogger("kiln")
STAGE = Stage("train", __name__)


def train(
    config: TrainConfig,
    dataset: ArtifactRef,
    policy: ArtifactRef,
    store: ArtifactStore,
    on_epoch: EpochCallback | None = None,
) -> ArtifactRef:
    """Train `config.model` on `dataset` with the augmentation `policy`; returns the train output."""
    inputs = {"dataset": dataset, "policy": policy}
    key = STAGE.key(config, inputs)

    def build(out_dir):
        data_dir = store.materialize(dataset)
        info = read_info(data_dir)
        height, width, channels = info.image_shape
        prep = Preprocessing(height, width, channels, tuple(info.channel_mean), tuple(info.channel_std))
        spec = ModelSpec(config.model, info.image_shape, info.num_classes)
        runtime = resolve_runtime(config.device, config.precision)
        for note in runtime.notes:
            LOGGER.warning(note)
        torch.manual_seed(config.seed)
        model = build_model(spec)
        transform = build_transform(read_json(store.materialize(policy) / "policy.json"))
        train_images, train_labels = read_split(data_dir, "train")
        validation = None
        if config.validation_fraction > 0:
            fit_indices, held_out = stratified_indices(train_labels, config.validation_fraction, config.seed)
            validation = (train_images[held_out], train_labels[held_out])
            train_images, train_labels = train_images[fit_indices], train_labels[fit_indices]
        history = fit(
            model,
            AugmentedImages(train_images, train_labels, transform),
            validation,
            prep,
            config,
            runtime,
            store.scratch_dir(STAGE.name, key) / "checkpoint.pt",
            on_epoch,
        )
        save_model(model.float().cpu(), spec, out_dir)
        write_json(out_dir / "preprocess.json", prep.to_json())
        pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)
        last = history[-1]
        return {
            "model": config.model,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "device": str(runtime.device),
            "precision": runtime.precision,
            "epochs": len(history),
            "final_train_loss": last["train_loss"],
            "final_train_accuracy": last["train_accuracy"],
            "final_val_accuracy": last["val_accuracy"],
            "train_samples": int(len(train_labels)),
            "validation_samples": 0 if validation is None else int(len(validation[1])),
            "train_seconds": round(sum(row["seconds"] for row in history), 2),
            "notes": list(runtime.notes),
        }

    ref = STAGE.produce(store, config, inputs, build)
    shutil.rmtree(store.scratch_dir(STAGE.name, key), ignore_errors=True)  # published: checkpoints are done
    return ref


@stage_task(STAGE, tags=["gpu"])
def train_task(config: TrainConfig, dataset: ArtifactRef, policy: ArtifactRef, store: StoreConfig) -> ArtifactRef:
    """Train the model, logging every epoch."""

    progress = Progress("kiln-train-progress", f"Training {config.model}: epoch 0/{config.epochs}")

    def log_epoch(row):
        summary = (
            f"epoch {row['epoch']}/{config.epochs}: loss {row['train_loss']:.4f}, "
            f"train acc {row['train_accuracy']:.3f}, val acc {row['val_accuracy']}, {row['images_per_s']:.0f} img/s"
        )
        LOGGER.info(summary)
        progress.update(row["epoch"] / config.epochs, f"Training {config.model}: {summary}")

    ref = train(config, dataset, policy, ArtifactStore(store.root, store.on_corrupt), on_epoch=log_epoch)
    metrics = ArtifactStore(store.root, store.on_corrupt).manifest(ref).metrics
    report(ref, store, "Training", [
        f"- model: `{metrics['model']}` ({metrics['parameters']:,} parameters) on {metrics['device']} ({metrics['precision']})",
        f"- {metrics['epochs']} epochs in {metrics['train_seconds']} s; final validation accuracy {metrics['final_val_accuracy']}",
    ])  # fmt: skip
    history = pd.read_csv(ArtifactStore(store.root, store.on_corrupt).materialize(ref) / "history.csv")
    report_table("kiln-training-history", history.to_dict(orient="records"), "Per-epoch training history")
    return ref
