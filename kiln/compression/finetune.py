"""Short retraining of a compressed model with kiln's own training loop (kiln.training.fit).

The recipe is the teacher's (optimizer, batch size, weight decay, augmentation, device, precision, seed, read from
the train output), with fewer epochs, a cosine schedule and a lower peak learning rate: the weights are already
good, and fine-tuning only has to recover what pruning disturbed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import nn

from kiln.config import TrainConfig
from kiln.runtime.preprocess import Preprocessing
from kiln.training import AugmentedImages, EpochCallback, Runtime, fit


def teacher_recipe(raw_train_config: dict[str, Any], model_name: str) -> TrainConfig:
    """The TrainConfig the teacher was trained with (from its manifest); kiln's defaults where it does not parse,
    e.g. a manifest written by an older kiln whose train section had other keys."""
    known = {key: value for key, value in raw_train_config.items() if key in TrainConfig.model_fields}
    try:
        return TrainConfig.model_validate({**known, "model": model_name})
    except ValidationError:
        return TrainConfig(model=model_name)


def fine_tune(
    model: nn.Module,
    train_set: AugmentedImages,
    prep: Preprocessing,
    recipe: TrainConfig,
    runtime: Runtime,
    epochs: int,
    lr_scale: float,
    checkpoint_path: Path,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, Any]]:
    """Train `model` in place for `epochs` on the training split, at `lr_scale` × the recipe's peak learning rate,
    checkpointing to `checkpoint_path` after every epoch and resuming from it if present; returns fit's per-epoch
    history ([] for 0 epochs)."""
    history: list[dict[str, Any]] = []
    if epochs > 0:
        # No keep_hardest: a proxy starting from scratch would rank a trained model's batches at random. Eager steps:
        # capturing (train.cuda_graph) repays itself over many short steps, not a few epochs of fine-tuning, and
        # has not been checked on a GPU with pruning's re-masking hooks.
        update = {"epochs": epochs, "lr": recipe.lr * lr_scale, "muon_lr": recipe.muon_lr * lr_scale,
                  "schedule": "cosine", "validation_fraction": 0.0, "keep_hardest": None,
                  "cuda_graph": False}  # fmt: skip
        if recipe.whiten_bias_epochs is not None:
            update["whiten_bias_epochs"] = 0  # the recipe stopped the whitening bias: it stays where training left it
        config = recipe.model_copy(update=update)
        history = fit(
            model, train_set, None, prep, config, runtime, checkpoint_path, on_epoch,
            initialise=False,  # a trained model: FastNet's whitening (bias trained) must not be reset
        )
    return history


def to_cpu_fp32(model: nn.Module) -> nn.Module:
    """Back from training (maybe CUDA, channels_last) to what the ONNX exporter expects."""
    import torch

    return model.float().cpu().to(memory_format=torch.contiguous_format).eval()
