"""The training loop, apart from the stage that wires it: runtime choice, data, optimizer recipe, epochs, resume.

Device and precision are decided once (`resolve_runtime`) and passed down; normalization happens on the device,
after augmentation of uint8 images, so the loader moves bytes, not floats.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kiln.config import TrainConfig
from kiln.runtime.preprocess import Preprocessing

LOGGER = logging.getLogger("kiln")

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Runtime:
    """Where and how numbers are computed; `notes` says what was changed from the request and why."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    notes: tuple[str, ...] = ()

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def resolve_runtime(device: str, precision: str) -> Runtime:
    """Pick the device and precision; GPU-only requests degrade to the CPU equivalent with a note."""
    notes = []
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        notes.append("train.device=cuda but no CUDA device is visible: training on the CPU")
    chosen = torch.device("cuda" if (device in ("auto", "cuda") and cuda) else "cpu")
    if precision == "auto":
        precision = "bf16" if chosen.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    elif precision == "fp16" and chosen.type == "cpu":
        notes.append("fp16 autocast is for CUDA: training in fp32 on the CPU")
        precision = "fp32"
    return Runtime(chosen, precision, tuple(notes))


class AugmentedImages(Dataset):
    """uint8 NHWC images -> (augmented uint8 CHW tensor, label). Picklable, for DataLoader workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class DeviceNormalizer(nn.Module):
    """uint8 NCHW on the device -> normalized float, as Preprocessing specifies."""

    def __init__(self, prep: Preprocessing, device: torch.device):
        super().__init__()
        shape = (1, prep.channels, 1, 1)
        self.mean = torch.tensor(prep.mean, device=device).view(shape)
        self.std = torch.tensor(prep.std, device=device).view(shape)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() / 255.0 - self.mean) / self.std


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # Norm and bias parameters are not decayed: decaying them only fights the normalization.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps + 1, pct_start=0.25, anneal_strategy="linear"
        )
    warmup = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, images: np.ndarray, prep: Preprocessing, runtime: Runtime, batch_size: int = 512
) -> np.ndarray:
    """Softmax probabilities [N, classes] (float32, CPU) for uint8 NHWC images."""
    model.eval().to(runtime.device)
    normalizer = DeviceNormalizer(prep, runtime.device)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        with runtime.autocast():
            logits = model(normalizer(batch.to(runtime.device)))
        outputs.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(outputs).numpy()


def fit(
    model: nn.Module,
    train_set: AugmentedImages,
    validation_set: tuple[np.ndarray, np.ndarray] | None,
    prep: Preprocessing,
    config: TrainConfig,
    runtime: Runtime,
    checkpoint_path: Path,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, Any]]:
    """Train for config.epochs, checkpointing after every epoch and resuming from `checkpoint_path` if present.

    `validation_set` (held out from the training split, never the test split) is scored after every epoch.
    Returns the per-epoch history (train loss/accuracy, validation accuracy, lr, throughput).
    """
    torch.manual_seed(config.seed)
    model.to(runtime.device)
    if runtime.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(train_set) > config.batch_size,
        num_workers=config.num_workers,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=config.num_workers > 0,
        generator=generator,
    )
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, config.epochs * len(loader))
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.precision == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    normalizer = DeviceNormalizer(prep, runtime.device)
    history: list[dict[str, Any]] = []
    start_epoch = 1
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=runtime.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        torch.set_rng_state(state["torch_rng"])  # augmentation draws continue as if never interrupted
        LOGGER.info(f"resuming from the checkpoint after epoch {start_epoch - 1} of {config.epochs}")
    for epoch in range(start_epoch, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels in loader:
            images = images.to(runtime.device, non_blocking=True)
            labels = labels.to(runtime.device, non_blocking=True)
            inputs = normalizer(images)
            if runtime.device.type == "cuda":
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                logits = model(inputs)
                loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "train_loss": round(loss_sum / max(seen, 1), 5),
            "train_accuracy": round(correct / max(seen, 1), 5),
            "val_accuracy": _accuracy(model, validation_set, prep, runtime),
            "lr": round(scheduler.get_last_lr()[0], 6),
            "seconds": round(seconds, 3),
            "images_per_s": round(seen / max(seconds, 1e-9), 1),
        }
        history.append(row)
        _save_checkpoint(checkpoint_path, model, optimizer, scheduler, generator, epoch, history)
        if on_epoch is not None:
            on_epoch(row)
    return history


def _accuracy(model, labelled: tuple[np.ndarray, np.ndarray] | None, prep, runtime: Runtime) -> float | None:
    if labelled is None or len(labelled[1]) == 0:
        return None
    images, labels = labelled
    return round(float((predict_probabilities(model, images, prep, runtime).argmax(axis=1) == labels).mean()), 5)


def _save_checkpoint(path: Path, model, optimizer, scheduler, generator, epoch: int, history) -> None:
    """Write to a temp file, then os.replace: a crash mid-write leaves the previous checkpoint intact."""
    temporary = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": epoch,
            "history": history,
        },
        temporary,
    )
    os.replace(temporary, path)
