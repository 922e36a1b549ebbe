"""Knowledge distillation (Hinton et al., 2015): a smaller student learns from the trained teacher's softened
probabilities as well as from the labels.

    loss = alpha · T² · KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) · CE(student, label)

T (temperature) > 1 exposes the teacher's "dark knowledge" (which wrong classes it finds plausible); the T² factor
keeps the soft term's gradients on the scale of the hard one's. Teacher and student see the same augmented batch.
The loop mirrors kiln.training.fit (optimizer recipe, schedule, device normalization, autocast) without its
checkpointing: a student trains in minutes, and fit's loss is fixed to cross-entropy.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kiln.config import TrainConfig
from kiln.models import ModelSpec, build_model
from kiln.runtime.preprocess import Preprocessing
from kiln.training import AugmentedImages, DeviceNormalizer, EpochCallback, Runtime, make_optimizer, make_scheduler
from kiln.compression.pruning import slim_copy


def build_student(teacher_spec: ModelSpec, student: str, width: float, seed: int) -> tuple[nn.Module, str]:
    """A freshly initialized student and a short description of it. `student` "slim" is the teacher's own
    architecture with every channel group scaled by `width`; any other value is a kiln model family."""
    torch.manual_seed(seed)
    if student == "slim":
        return slim_copy(build_model(teacher_spec), width), f"{teacher_spec.name} at width {width}"
    return build_model(ModelSpec(student, teacher_spec.image_shape, teacher_spec.num_classes)), student


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """alpha · T² · KL(teacher_T || student_T) + (1 - alpha) · cross-entropy with the labels (batch means)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_set: AugmentedImages,
    prep: Preprocessing,
    config: TrainConfig,
    runtime: Runtime,
    temperature: float,
    alpha: float,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, Any]]:
    """Train `student` in place for config.epochs against `teacher` (frozen, eval mode) on `train_set`.

    Returns the per-epoch history (loss, the student's training accuracy and agreement with the teacher).
    """
    torch.manual_seed(config.seed)
    teacher.to(runtime.device).eval()
    student.to(runtime.device)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(train_set) > config.batch_size,
        num_workers=config.num_workers,
        pin_memory=runtime.device.type == "cuda",
        generator=generator,
    )
    optimizer = make_optimizer(student, config)
    scheduler = make_scheduler(optimizer, config, config.epochs * len(loader))
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.precision == "fp16")
    normalizer = DeviceNormalizer(prep, runtime.device)
    history: list[dict[str, Any]] = []
    for epoch in range(1, config.epochs + 1):
        student.train()
        started = time.perf_counter()
        loss_sum, correct, agree, seen = 0.0, 0, 0, 0
        for images, labels in loader:
            inputs = normalizer(images.to(runtime.device, non_blocking=True))
            labels = labels.to(runtime.device, non_blocking=True)
            with runtime.autocast():
                with torch.no_grad():
                    teacher_logits = teacher(inputs).float()
                student_logits = student(inputs)
                loss = distillation_loss(
                    student_logits.float(), teacher_logits, labels, temperature, alpha, config.label_smoothing
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            predicted = student_logits.argmax(dim=1)
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((predicted == labels).sum())
            agree += int((predicted == teacher_logits.argmax(dim=1)).sum())
            seen += len(labels)
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "train_loss": round(loss_sum / max(seen, 1), 5),
            "train_accuracy": round(correct / max(seen, 1), 5),
            "teacher_agreement": round(agree / max(seen, 1), 5),
            "lr": round(scheduler.get_last_lr()[0], 6),
            "seconds": round(seconds, 3),
            "images_per_s": round(seen / max(seconds, 1e-9), 1),
        }
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return history
