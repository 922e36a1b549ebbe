"""The record-speed profiles (kiln/profiles/cifar10-fast.yaml, cifar10-long.yaml) as they are, at toy scale on the
CPU: their settings come from GPU runs (benchmarks/RESULTS.md); here, that their whole combination trains."""

import math

import pytest

from kiln.augmentation import resolve_policy
from kiln.config import load_config
from kiln.dataset import write_dataset
from kiln.training import run_training
from tests.conftest import make_blobs_dataset


@pytest.mark.parametrize("profile", ["cifar10-fast", "cifar10-long"])
def test_the_fast_recipes_train_on_the_cpu_as_they_are(profile, tmp_path):
    """Each record-speed profile's whole combination of settings (cifar10-fast: Muon, the whitening bias's own
    schedule, the alternating flip; cifar10-long: fastnet_lean, Cutout inside the image, Lookahead; both capture their
    steps as CUDA graphs on a GPU and run bf16 there, eager and fp32 on the CPU) trains on the CPU as it is, only
    smaller: a few steps lower the loss well below chance's."""
    # the device data path, as on a GPU: it runs the alternating flip (the CPU's loader path flips at random)
    config = load_config(profile, overrides=["train.batch_size=32", "train.epochs=8", "train.data_path=device"])
    data_dir = tmp_path / "blobs"
    data_dir.mkdir()
    write_dataset(data_dir, make_blobs_dataset(classes=3, per_class_train=48, size=16))
    policy = resolve_policy(config.augment, (16, 16, 3))

    result = run_training(data_dir, policy, config.train, tmp_path / "checkpoint.pt")

    losses = [row["train_loss"] for row in result.history]
    # ln 3 is the loss of a model that has learnt nothing about the 3 classes
    assert len(losses) == 8 and losses[-1] < 0.8 * math.log(3)
    assert result.runtime.precision == "fp32" and result.history[0]["data_path"] == "device"
