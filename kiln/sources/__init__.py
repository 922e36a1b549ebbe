"""Dataset loaders for the download stage, one module per kind of source; no Prefect in here.

`load_source(config)` returns the images of the configured `data.source` (subsampled if asked) and the files that
were not used; `source_fingerprint(config)` is the cheap content fingerprint that keys the download stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from kiln.config import DataConfig
from kiln.dataset import SPLITS, ImageDataset, stratified_subsample
from kiln.progress import ProgressCallback, ignore_progress


@dataclass(frozen=True)
class SourceData:
    """What a loader returns: the dataset, and the files it did not use with the reason (for skipped.csv)."""

    dataset: ImageDataset
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source": ..., "reason": ...}


def load_source(config: DataConfig, on_progress: ProgressCallback = ignore_progress) -> SourceData:
    """Load `config.source`, then apply data.max_train_samples / data.max_test_samples (stratified).

    `on_progress` hears long downloads (bytes) and decodes (images).

    Raises DataError for data that is missing, unsafe or unusable and DownloadError for transient network failures.
    """
    # Imported here so that the digits quickstart never pays for importing torchvision.
    if config.source == "digits":
        from kiln.sources.digits import load_digits as loader
    elif config.source == "imagefolder":
        from kiln.sources.imagefolder import load_imagefolder as loader
    else:
        from kiln.sources.torchvision_sets import load_torchvision as loader
    loaded = loader(config, on_progress)
    limited = limit_samples(loaded.dataset, config.max_train_samples, config.max_test_samples, config.seed)
    return SourceData(limited, loaded.skipped)


def limit_samples(dataset: ImageDataset, max_train: int | None, max_test: int | None, seed: int) -> ImageDataset:
    """A stratified subsample of each split down to its limit (None: keep all); sources follow their images."""
    arrays: dict[str, np.ndarray] = {}
    sources = dict(dataset.sources)
    for split, limit in zip(SPLITS, (max_train, max_test)):
        images, labels = dataset.split(split)
        keep = stratified_subsample(labels, limit, seed) if limit is not None else np.arange(len(labels))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep]
        if split in sources:
            sources[split] = [sources[split][index] for index in keep]
    return ImageDataset(dataset.name, list(dataset.classes), sources=sources, **arrays)


def source_fingerprint(config: DataConfig) -> str:
    """A cheap fingerprint of a local imagefolder source's current content, so edits make a new stage key.

    A folder: sha256 over every file's relative path, size and mtime. An archive: its path, size and mtime. A CSV
    manifest: its bytes and every listed file's size and mtime. URLs and the built-in sets: "" (treated as
    immutable). A missing path: "" (loading it raises the error).
    """
    if config.source != "imagefolder" or not config.uri:
        return ""
    from kiln.sources.http import is_url  # imported here: these modules import SourceData from this one
    from kiln.sources.csv_manifest import is_csv_manifest, manifest_fingerprint
    from kiln.sources.imagefolder import folder_files, local_path

    if is_url(config.uri):
        return ""
    path = local_path(config.uri)
    if path.is_file() and is_csv_manifest(config.uri):
        return manifest_fingerprint(path)
    if path.is_file():
        info = path.stat()
        return hashlib.sha256(f"{path.resolve()}\t{info.st_size}\t{info.st_mtime_ns}".encode()).hexdigest()
    if not path.is_dir():
        return ""
    digest = hashlib.sha256()
    for name in folder_files(path):
        try:
            info = (path / name).stat()
            digest.update(f"{name}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
        except OSError:  # e.g. a dangling symlink: loading reports it; the key must still be computable
            digest.update(f"{name}\tunreadable\n".encode())
    return digest.hexdigest()
