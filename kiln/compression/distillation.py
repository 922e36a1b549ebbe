"""Knowledge distillation (Hinton et al., 2015): a smaller student learns from the trained teacher's softened
probabilities as well as from the labels.

    loss = alpha · T² · KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) · CE(student, label)

T (temperature) > 1 exposes the teacher's "dark knowledge" (which wrong classes it finds plausible); the T² factor
keeps the soft term's gradients on the scale of the hard one's. Teacher and student see the same augmented batch.
The student is trained by kiln.training.fit with this loss as its objective, so it gets the train stage's data
paths, precision, compile and per-epoch checkpoints: a distillation killed midway resumes from its last epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import TrainConfig
from kiln.models import ModelSpec, build_model
from kiln.runtime.preprocess import Preprocessing
from kiln.training import AugmentedImages, EpochCallback, Objective, Runtime, fit
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


class DistillationObjective(Objective):
    """fit's objective for a student: `distillation_loss` against the frozen teacher's logits for the same batch,
    and each epoch's top-1 agreement with the teacher."""

    capturable = False  # the agreement's count of images is kept on the host, step by step

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float, label_smoothing: float = 0.0):
        super().__init__(label_smoothing)
        self.teacher, self.temperature, self.alpha = teacher.eval(), temperature, alpha
        self.label_smoothing = label_smoothing
        self.agreed: torch.Tensor | int = 0  # accumulated on the device: no GPU sync per step
        self.seen = 0

    def loss(self, inputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs).float()
        self.agreed = self.agreed + (logits.detach().argmax(dim=1) == teacher_logits.argmax(dim=1)).sum()
        self.seen += len(labels)
        return distillation_loss(logits, teacher_logits, labels, self.temperature, self.alpha, self.label_smoothing)

    def epoch_metrics(self) -> dict[str, Any]:
        agreement = round(int(self.agreed) / max(self.seen, 1), 5)
        self.agreed, self.seen = 0, 0
        return {"teacher_agreement": agreement}


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_set: AugmentedImages,
    prep: Preprocessing,
    config: TrainConfig,
    runtime: Runtime,
    temperature: float,
    alpha: float,
    checkpoint_path: Path,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, Any]]:
    """Train `student` in place for config.epochs against `teacher` (frozen, eval mode) on `train_set` with fit,
    checkpointing to `checkpoint_path` after every epoch and resuming from it if present.

    Returns fit's per-epoch history, with the student's agreement with the teacher.
    """
    teacher.to(runtime.device)
    if runtime.device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)  # fit makes the student's inputs channels_last there
    objective = DistillationObjective(teacher, temperature, alpha, config.label_smoothing)
    return fit(student, train_set, None, prep, config, runtime, checkpoint_path, on_epoch, objective=objective)
