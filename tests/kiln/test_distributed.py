"""Data-parallel training (kiln/distributed.py) with 2 gloo processes on the CPU, launched by torchrun as in production.

The model here has no BatchNorm, so averaging the two ranks' gradients of their halves of each global batch is the
gradient of the whole batch: the loss curve must match the one-process run up to float summation order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.augmentation import resolve_policy
from kiln.config import AugmentConfig, TrainConfig
from kiln.dataset import write_dataset
from kiln.distributed import launch_training, world_size
from kiln.errors import ConfigError
from kiln.models import load_model
from kiln.training import run_training
from tests.conftest import make_blobs_dataset

pytestmark = pytest.mark.slow  # torchrun starts two Python processes that import torch: ~20 s


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("blobs")
    write_dataset(directory, make_blobs_dataset(classes=3, per_class_train=32, size=8))
    return directory


def config(**settings) -> TrainConfig:
    defaults = dict(model="simple_cnn", epochs=3, batch_size=16, lr=3e-3, data_path="device", validation_fraction=0.25)
    return TrainConfig(**{**defaults, **settings})


POLICY = resolve_policy(AugmentConfig(policy="crop_flip", crop_padding=1), (8, 8, 3))


def test_two_processes_follow_the_one_process_loss_curve_and_only_rank_0_writes(data_dir, tmp_path):
    single = run_training(data_dir, POLICY, config(), tmp_path / "single.pt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    epochs_heard: list[int] = []

    metrics = launch_training(data_dir, POLICY, config(devices=2), tmp_path / "ddp.pt", out_dir,
                              on_epoch=lambda row: epochs_heard.append(row["epoch"]))  # fmt: skip

    assert metrics["processes"] == 2 and metrics["train_samples"] == single.train_samples == 72
    assert epochs_heard == [1, 2, 3]  # rank 0 only: one line per epoch
    assert sorted(path.name for path in out_dir.iterdir()) == ["history.csv", "model.json", "preprocess.json", "weights.pt"]
    assert (tmp_path / "ddp.pt").is_file()  # the checkpoint, written by rank 0, resumable like a one-process one
    import pandas as pd

    ddp_losses = pd.read_csv(out_dir / "history.csv")["train_loss"].tolist()
    single_losses = [row["train_loss"] for row in single.history]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-3, abs=1e-4)
    model, spec = load_model(out_dir)
    assert spec.name == "simple_cnn"
    for name, tensor in single.model.state_dict().items():
        assert (tensor - model.state_dict()[name]).abs().max() < 1e-3, name


def test_a_global_batch_that_does_not_split_evenly_is_refused_before_launching(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size=15 is the global batch and must divide evenly among 2"):
        launch_training(data_dir, POLICY, config(devices=2, batch_size=15), tmp_path / "x.pt", tmp_path)


def test_devices_auto_means_every_visible_gpu_or_one_process():
    import torch

    assert world_size(config(devices="auto")) == max(torch.cuda.device_count(), 1)
    assert world_size(config(devices=3)) == 3
    with pytest.raises(ValueError, match="must be at least 1, or auto"):
        config(devices=0)


def test_muon_trains_data_parallel_as_in_one_process(data_dir, tmp_path):
    """cifar10-fast's optimizer under data parallelism (the 4-GPU deployment runs it): every rank orthogonalizes the
    same averaged gradient, and the loss falls as in one process. With BatchNorm each rank normalizes its own half of
    the batch, so the curves are close, not equal. (Only rank 0 saves weights: the others' are not compared.)"""
    settings = dict(model="fastnet", optimizer="muon", lr=0.05, momentum=0.85, epochs=8, batch_size=24)
    single = run_training(data_dir, POLICY, config(**settings), tmp_path / "single.pt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    launch_training(data_dir, POLICY, config(devices=2, **settings), tmp_path / "ddp.pt", out_dir)

    import pandas as pd

    ddp_losses = pd.read_csv(out_dir / "history.csv")["train_loss"].tolist()
    single_losses = [row["train_loss"] for row in single.history]
    assert ddp_losses[-1] < 0.7 * ddp_losses[0] and single_losses[-1] < 0.7 * single_losses[0]
    assert ddp_losses == pytest.approx(single_losses, rel=0.25)
    model, spec = load_model(out_dir)
    assert spec.name == "fastnet"
    filters = [tensor for name, tensor in model.state_dict().items() if tensor.dim() == 4 and "whiten" not in name]
    # Muon scales every filter tensor to norm sqrt(output channels) before its update, and the last updates are small
    # (the lr falls toward 0) and nearly orthogonal to the filters, so the saved filters sit at that norm; torch's
    # initial filters are near sqrt(output channels / 3). So the weights rank 0 saved took Muon's steps.
    for tensor in filters:
        assert tensor.norm().item() == pytest.approx(tensor.shape[0] ** 0.5, rel=1e-3)


def test_a_rank_that_fails_fails_the_run_with_its_own_error_in_the_message(tmp_path):
    """A worker that raises still exits as failed (only a worker whose work is done skips the interpreter's
    teardown), and the message keeps the rank's own traceback, not only torchrun's."""
    from kiln.runtime.errors import KilnError

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(KilnError, match="data-parallel training failed") as failed:
        launch_training(tmp_path / "no-such-dataset", POLICY, config(devices=2), tmp_path / "ddp.pt", out_dir)
    assert "no-such-dataset" in str(failed.value)
    assert sorted(out_dir.iterdir()) == []
