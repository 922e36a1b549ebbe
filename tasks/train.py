"""Stage 4, train: fit the configured model on the augmented training split, on CUDA when available.

Output: `weights.pt` (state_dict), `model.json` (architecture spec), `preprocess.json` (normalization),
`history.csv` (one row per epoch). A checkpoint after every epoch lives in the store's scratch area until the
output is published, so an interrupted run resumes where it stopped. With train.devices > 1 the fit runs as a
data-parallel torchrun job (kiln/distributed.py) whose rank 0 writes the same files.
"""

from __future__ import annotations

import logging
import shutil

import pandas as pd

from kiln.config import StoreConfig, TrainConfig
from kiln.distributed import launch_training, world_size
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json
from kiln.training import EpochCallback, run_training, write_training_output
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
        policy_spec = read_json(store.materialize(policy) / "policy.json")
        checkpoint = store.scratch_dir(STAGE.name, key) / "checkpoint.pt"
        processes = world_size(config)
        if processes > 1:
            return launch_training(data_dir, policy_spec, config, checkpoint, out_dir, on_epoch)
        result = run_training(data_dir, policy_spec, config, checkpoint, on_epoch)
        for note in result.runtime.notes:
            LOGGER.warning(note)
        return write_training_output(result, config, out_dir)

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
