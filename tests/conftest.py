"""Shared fixtures: a store in a temp dir and tiny datasets/models published into it, built in-process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.config import TrainConfig
from kiln.dataset import ImageDataset, publish_dataset
from kiln.models import ModelSpec, build_model, save_model
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore
from tests.support.s3 import s3_root, s3_server  # noqa: F401 (fixtures for every test module)

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def make_blobs_dataset(
    classes: int = 3, per_class_train: int = 24, per_class_test: int = 8, size: int = 8, channels: int = 3, seed: int = 0
) -> ImageDataset:
    """A learnable toy image set: each class is a noisy bright square in its own position."""
    rng = np.random.default_rng(seed)

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for label in range(classes):
            for _ in range(per_class):
                image = rng.integers(0, 60, size=(size, size, channels), dtype=np.uint8)
                row, col = divmod(label % 4, 2)
                half = size // 2
                image[row * half : (row + 1) * half, col * half : (col + 1) * half] += 150 + label * 10
                images.append(image)
                labels.append(label)
        return np.stack(images), np.array(labels, dtype=np.int64)

    train_images, train_labels = split(per_class_train)
    test_images, test_labels = split(per_class_test)
    names = [f"class_{index}" for index in range(classes)]
    return ImageDataset("blobs", names, train_images, train_labels, test_images, test_labels)


def publish_model(store: ArtifactStore, dataset_ref: ArtifactRef, model_name: str = "simple_cnn", steps: int = 60):
    """Fit `model_name` briefly on the published dataset with plain torch and publish it as a train output."""
    from kiln.dataset import read_dataset, read_info
    from kiln.runtime.preprocess import Preprocessing

    directory = store.materialize(dataset_ref)
    dataset, info = read_dataset(directory), read_info(directory)
    height, width, channels = info.image_shape
    prep = Preprocessing(height, width, channels, tuple(info.channel_mean), tuple(info.channel_std))
    spec = ModelSpec(model_name, info.image_shape, info.num_classes)
    torch.manual_seed(0)
    model = build_model(spec)
    images = torch.from_numpy(prep.normalize(dataset.train_images))
    labels = torch.from_numpy(dataset.train_labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    model.eval()
    stage = Stage("train", "kiln.models")
    metrics = {  # the train stage's metrics that later stages (the model card) read
        "model": model_name,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "device": "cpu",
        "precision": "fp32",
        "epochs": steps,  # full-batch steps
        "final_train_loss": loss.item(),
        "train_samples": int(len(labels)),
        "validation_samples": 0,
        "train_seconds": round(time.perf_counter() - started, 2),
    }

    def build(out_dir: Path):
        save_model(model, spec, out_dir)
        (out_dir / "preprocess.json").write_text(json.dumps(prep.to_json()))
        return metrics

    return stage.produce(store, TrainConfig(model=model_name), {"dataset": dataset_ref}, build)


def copy_outputs(store: ArtifactStore, refs: list[ArtifactRef], root: Path) -> tuple[ArtifactStore, list[ArtifactRef]]:
    """A private store at `root` holding copies of `refs` (for tests that break or monkeypatch a stage)."""
    import shutil

    for ref in refs:
        shutil.copytree(Path(store.root, ref.stage, ref.key), root / ref.stage / ref.key)
    copy = ArtifactStore(root)
    return copy, [copy.lookup(ref.stage, ref.key) for ref in refs]


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def blobs() -> ImageDataset:
    return make_blobs_dataset()


@pytest.fixture
def dataset_ref(store: ArtifactStore, blobs: ImageDataset) -> ArtifactRef:
    return publish_dataset(store, blobs)


@pytest.fixture
def model_ref(store: ArtifactStore, dataset_ref: ArtifactRef) -> ArtifactRef:
    return publish_model(store, dataset_ref)
