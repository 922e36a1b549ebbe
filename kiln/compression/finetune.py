"""Short retraining of a compressed model with kiln's own training loop (kiln.training.fit).

The recipe is the teacher's (optimizer, batch size, weight decay, augmentation, device, precision, seed, read from
the train output), with fewer epochs, a cosine schedule and a lower peak learning rate: the weights are already
good, and fine-tuning only has to recover what pruning disturbed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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
    images: np.ndarray,
    labels: np.ndarray,
    transform: Callable | None,
    prep: Preprocessing,
    recipe: TrainConfig,
    runtime: Runtime,
    epochs: int,
    lr_scale: float,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, Any]]:
    """Train `model` in place for `epochs` on the training split (uint8 NHWC `images`), at `lr_scale` × the
    recipe's peak learning rate; returns fit's per-epoch history ([] for 0 epochs). Leaves the model on the CPU in
    fp32, eval mode."""
    history: list[dict[str, Any]] = []
    if epochs > 0:
        config = recipe.model_copy(
            update={"epochs": epochs, "lr": recipe.lr * lr_scale, "schedule": "cosine", "validation_fraction": 0.0}
        )
        with tempfile.TemporaryDirectory(prefix="kiln-finetune-") as scratch:
            # fit() resumes from an existing checkpoint; a fresh directory means a fresh start every time.
            history = fit(
                model, AugmentedImages(images, labels, transform), None, prep, config, runtime,
                Path(scratch) / "checkpoint.pt", on_epoch,
            )  # fmt: skip
    return history


def to_cpu_fp32(model: nn.Module) -> nn.Module:
    """Back from training (maybe CUDA, channels_last) to what the ONNX exporter expects."""
    import torch

    return model.float().cpu().to(memory_format=torch.contiguous_format).eval()
