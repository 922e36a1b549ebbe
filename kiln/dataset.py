"""The canonical on-disk dataset every stage after download reads.

Files in a download output directory:
    train_images.npy, test_images.npy   uint8 [N, H, W, C]
    train_labels.npy, test_labels.npy   int64 [N], indices into classes
    dataset.json                        name, classes, image shape, counts, per-channel mean/std of train
    samples.csv                         one row per sample: split, label, height, width, channels, mean, std,
                                        max (brightest pixel), content_hash, source (what data validation runs on)
    skipped.csv                         files that were not used: source, reason, kind ("unreadable": a file in a
                                        class folder that did not decode; "ignored": not part of the layout)
Arrays are plain .npy loaded with allow_pickle=False: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kiln.errors import DataError
from kiln.store import ArtifactRef, ArtifactStore, read_json, write_json

SPLITS = ("train", "test")
SKIPPED_COLUMNS = ("source", "reason", "kind")
UNREADABLE, IGNORED = "unreadable", "ignored"  # skipped.csv kinds
SAMPLE_COLUMNS = ("split", "label", "height", "width", "channels", "mean", "std", "max", "content_hash", "source")


@dataclass(frozen=True)
class ImageDataset:
    """Images and labels for both splits, plus class names."""

    name: str
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    sources: dict[str, list[str]] = field(default_factory=dict)  # split -> where each sample came from

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels)."""
        return tuple(int(size) for size in self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_indices(
        cls, name: str, classes: list[str], images: np.ndarray, labels: np.ndarray, sources: np.ndarray,
        train_index: np.ndarray, test_index: np.ndarray,
    ) -> ImageDataset:  # fmt: skip
        """One pool of images, labels and sources divided into train and test by index."""
        return cls(
            name=name,
            classes=classes,
            train_images=images[train_index],
            train_labels=labels[train_index],
            test_images=images[test_index],
            test_labels=labels[test_index],
            sources={"train": sources[train_index].tolist(), "test": sources[test_index].tolist()},
        )

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name == "train":
            return self.train_images, self.train_labels
        if name == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"unknown split {name!r}")


@dataclass(frozen=True)
class DatasetInfo:
    """dataset.json: what consumers need without loading the arrays."""

    name: str
    classes: list[str]
    image_shape: tuple[int, int, int]
    counts: dict[str, int]
    channel_mean: list[float]  # of the training images, in [0, 1]
    channel_std: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def write_dataset(out_dir: Path, dataset: ImageDataset, skipped: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Write `dataset` in the canonical format; returns metrics for the manifest."""
    _check_arrays(dataset)
    for split in SPLITS:
        images, labels = dataset.split(split)
        np.save(out_dir / f"{split}_images.npy", np.ascontiguousarray(images, dtype=np.uint8))
        np.save(out_dir / f"{split}_labels.npy", labels.astype(np.int64))
    mean, std = channel_statistics(dataset.train_images)
    info = {
        "name": dataset.name,
        "classes": list(dataset.classes),
        "image_shape": list(dataset.image_shape),
        "counts": {split: int(len(dataset.split(split)[1])) for split in SPLITS},
        "channel_mean": mean,
        "channel_std": std,
    }
    write_json(out_dir / "dataset.json", info)
    sample_table(dataset).to_csv(out_dir / "samples.csv", index=False)
    skipped_table = pd.DataFrame(skipped or [], columns=list(SKIPPED_COLUMNS))
    skipped_table["kind"] = skipped_table["kind"].fillna(IGNORED)
    skipped_table.to_csv(out_dir / "skipped.csv", index=False)
    return {
        "train_samples": info["counts"]["train"],
        "test_samples": info["counts"]["test"],
        "num_classes": dataset.num_classes,
        "image_shape": info["image_shape"],
        "skipped_files": len(skipped or []),
    }


def publish_dataset(store: ArtifactStore, dataset: ImageDataset) -> ArtifactRef:
    """Publish in-memory `dataset` into `store` as the download stage's output would be, keyed on its contents, for
    callers that hold the arrays already: the tests' fixtures and benchmarks/train_speed.py, which runs the train
    stage on data it decoded once."""
    from kiln.config import DataConfig
    from kiln.stage import Stage

    content = hashlib.sha256()
    for array in (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels):
        content.update(np.ascontiguousarray(array).tobytes())
    content.update("\n".join(dataset.classes).encode())
    config = DataConfig(source="imagefolder", uri=f"memory://{dataset.name}/{content.hexdigest()[:16]}")
    return Stage("download", __name__).produce(store, config, {}, lambda out_dir: write_dataset(out_dir, dataset))


def read_info(directory: Path) -> DatasetInfo:
    raw = read_json(directory / "dataset.json")
    return DatasetInfo(
        name=raw["name"],
        classes=list(raw["classes"]),
        image_shape=tuple(raw["image_shape"]),
        counts=dict(raw["counts"]),
        channel_mean=list(raw["channel_mean"]),
        channel_std=list(raw["channel_std"]),
    )


def read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,H,W,C], labels int64 [N]) of one split, loaded without unpickling."""
    images = np.load(directory / f"{split}_images.npy", allow_pickle=False)
    labels = np.load(directory / f"{split}_labels.npy", allow_pickle=False)
    return images, labels


def read_dataset(directory: Path) -> ImageDataset:
    info = read_info(directory)
    train_images, train_labels = read_split(directory, "train")
    test_images, test_labels = read_split(directory, "test")
    return ImageDataset(info.name, info.classes, train_images, train_labels, test_images, test_labels)


def read_samples(directory: Path) -> pd.DataFrame:
    return pd.read_csv(directory / "samples.csv")


def read_skipped(directory: Path) -> pd.DataFrame:
    """skipped.csv, with every column as text (an empty file gives an empty table with the columns)."""
    return pd.read_csv(directory / "skipped.csv", dtype=str, keep_default_na=False)


def channel_statistics(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images, on the [0, 1] scale (float64 accumulation)."""
    channels = images.shape[-1]
    flat = images.reshape(-1, channels)
    mean = np.zeros(channels)
    sq = np.zeros(channels)
    for start in range(0, len(flat), 1 << 22):  # chunks keep the float copy small on big datasets
        chunk = flat[start : start + (1 << 22)].astype(np.float64) / 255.0
        mean += chunk.sum(axis=0)
        sq += (chunk**2).sum(axis=0)
    count = len(flat)
    mean /= count
    std = np.sqrt(np.maximum(sq / count - mean**2, 1e-12))
    return [round(float(value), 6) for value in mean], [round(float(value), 6) for value in std]


def sample_table(dataset: ImageDataset) -> pd.DataFrame:
    """One row per image with its shape, pixel statistics and a hash of its decoded pixels."""
    frames = []
    for split in SPLITS:
        images, labels = dataset.split(split)
        count = len(labels)
        height, width, channels = images.shape[1:] if images.ndim == 4 else (0, 0, 0)
        as_float = images.reshape(count, -1).astype(np.float32)
        sources = dataset.sources.get(split) or [f"{dataset.name}:{split}:{index}" for index in range(count)]
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "label": labels.astype(np.int64),
                    "height": height,
                    "width": width,
                    "channels": channels,
                    "mean": as_float.mean(axis=1).round(3),
                    "std": as_float.std(axis=1).round(3),
                    "max": images.reshape(count, -1).max(axis=1) if count else np.zeros(0, dtype=np.uint8),
                    "content_hash": [hashlib.sha256(image.tobytes()).hexdigest()[:16] for image in images],
                    "source": sources,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[list(SAMPLE_COLUMNS)]


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, held_out) with `fraction` of every class held out (at least one per class
    when the class has two or more samples)."""
    rng = np.random.default_rng(seed)
    held_out: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(len(members) * fraction))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        held_out.append(members[:count])
    held = np.sort(np.concatenate(held_out)) if held_out else np.array([], dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held


def stratified_subsample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most `limit` samples, keeping class proportions (sorted)."""
    if limit >= len(labels):
        return np.arange(len(labels))
    keep, _ = stratified_indices(labels, 1 - limit / len(labels), seed)
    return keep


def _check_arrays(dataset: ImageDataset) -> None:
    for split in SPLITS:
        images, labels = dataset.split(split)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(f"{split} images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{split}: {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise DataError(f"the {split} split is empty; a dataset needs images in both train and test")
    if dataset.train_images.shape[1:] != dataset.test_images.shape[1:]:
        raise DataError(
            f"train images are {dataset.train_images.shape[1:]} but test images are {dataset.test_images.shape[1:]}"
        )
