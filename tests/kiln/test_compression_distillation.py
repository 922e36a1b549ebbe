"""Knowledge distillation: the loss is Hinton's, and a short run teaches a slim student to follow its teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.compression.distillation import build_student, distill, distillation_loss
from kiln.config import TrainConfig
from kiln.models import ModelSpec, build_model
from kiln.runtime.preprocess import Preprocessing
from kiln.training import AugmentedImages, predict_probabilities, resolve_runtime
from tests.conftest import make_blobs_dataset


def test_the_loss_is_cross_entropy_at_alpha_0_and_pure_soft_targets_at_alpha_1():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    cross_entropy = float(F.cross_entropy(student, labels))
    assert distillation_loss(student, teacher, labels, 4.0, 0.0) == pytest.approx(cross_entropy)
    assert float(distillation_loss(teacher, teacher, labels, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    soft = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean") * 4
    assert distillation_loss(student, teacher, labels, 2.0, 1.0) == pytest.approx(float(soft), rel=1e-5)


def test_a_student_is_slim_or_another_family():
    spec = ModelSpec("simple_cnn", (8, 8, 3), 3)
    slim, description = build_student(spec, "slim", 0.5, seed=0)
    assert description == "simple_cnn at width 0.5" and slim.features[0].out_channels == 16
    other, description = build_student(spec, "mlp", 0.5, seed=0)
    assert description == "mlp" and other(torch.zeros(1, 3, 8, 8)).shape == (1, 3)


def trained_teacher(data, prep: Preprocessing, spec: ModelSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = build_model(spec)
    images, labels = torch.from_numpy(prep.normalize(data.train_images)), torch.from_numpy(data.train_labels)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(teacher(images), labels).backward()
        optimizer.step()
    return teacher


def without_timings(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in ("seconds", "images_per_s")} for row in history]


PREP = Preprocessing(8, 8, 3, (0.2, 0.2, 0.2), (0.25, 0.25, 0.25))
SPEC = ModelSpec("simple_cnn", (8, 8, 3), 3)


def test_a_short_distillation_makes_the_student_follow_the_teacher(tmp_path):
    data = make_blobs_dataset()
    teacher = trained_teacher(data, PREP, SPEC)
    runtime = resolve_runtime("cpu", "fp32")
    student, _ = build_student(SPEC, "slim", 0.5, seed=0)
    config = TrainConfig(epochs=8, batch_size=16, lr=3e-3, device="cpu")
    history = distill(teacher, student, AugmentedImages(data.train_images, data.train_labels, None), PREP, config,
                      runtime, temperature=4.0, alpha=0.9, checkpoint_path=tmp_path / "distill.pt")  # fmt: skip
    assert [row["epoch"] for row in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert 0.0 <= history[0]["teacher_agreement"] <= history[-1]["teacher_agreement"] <= 1.0
    teacher_top1 = predict_probabilities(teacher, data.test_images, PREP, runtime).argmax(axis=1)
    student_top1 = predict_probabilities(student, data.test_images, PREP, runtime).argmax(axis=1)
    assert np.mean(student_top1 == teacher_top1) >= 0.9


def test_a_distillation_killed_midway_resumes_from_its_last_epoch(tmp_path):
    """Stopped after epoch 2 of 4, the next call picks up at epoch 3 and ends exactly where an uninterrupted run
    does (seeded CPU training is deterministic)."""
    data = make_blobs_dataset()
    teacher = trained_teacher(data, PREP, SPEC)
    runtime = resolve_runtime("cpu", "fp32")
    train_set = AugmentedImages(data.train_images, data.train_labels, None)
    config = TrainConfig(epochs=4, batch_size=16, lr=3e-3, device="cpu")

    def run(checkpoint, on_epoch=None):
        student, _ = build_student(SPEC, "slim", 0.5, seed=0)
        history = distill(teacher, student, train_set, PREP, config, runtime, 4.0, 0.9, checkpoint, on_epoch)
        return student, history

    def stop_after_epoch_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed.pt", stop_after_epoch_2)
    epochs_run = []
    resumed, history = run(tmp_path / "killed.pt", lambda row: epochs_run.append(row["epoch"]))
    uninterrupted, expected = run(tmp_path / "whole.pt")
    assert epochs_run == [3, 4]
    assert without_timings(history) == without_timings(expected)
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
