"""The torchvision sets (cifar10, mnist, fashion-mnist), checked against torchvision's md5 checksums.

kiln fetches the archive files itself, into the folder where torchvision looks for them, because torchvision's
downloader has no timeout or size cap and folds every failure into RuntimeError, while the download task must
tell a transient failure (retried) from a final one. Each file is checked against torchvision's md5; then
`download=True` finds the files present, extracts them, checks the extracted files' md5s and parses them.
`data.uri`, when set, replaces torchvision's mirror through a subclass made for this call: the library's classes
are never patched.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torchvision.datasets
from torchvision.datasets.utils import calculate_md5

from kiln.config import DataConfig
from kiln.dataset import ImageDataset
from kiln.errors import DataError, DownloadError, KilnError
from kiln.progress import ProgressCallback, ignore_progress
from kiln.sources import SourceData
from kiln.sources.http import fetch

TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


@dataclass(frozen=True)
class _RemoteFile:
    urls: list[str]  # mirrors, tried in order
    destination: Path  # where torchvision looks for it
    md5: str  # what torchvision expects


def load_torchvision(config: DataConfig, on_progress: ProgressCallback = ignore_progress) -> SourceData:
    """Download, verify and read `config.source` as uint8 NHWC arrays (MNIST-like: [N, 28, 28, 1]).

    Raises DataError for HTTP 404 and other final errors, a checksum mismatch or a corrupt archive (naming the URL
    or file), and DownloadError for transient network failures (refused, timeouts, HTTP 5xx).
    """
    dataset_class = dataset_class_for(config.source, config.uri)
    with tempfile.TemporaryDirectory(prefix=f"kiln-{config.source}-") as root:
        for remote in _remote_files(dataset_class, Path(root)):
            _fetch_verified(remote, config, on_progress)
        train = _open_split(dataset_class, root, config.source, train=True)
        test = _open_split(dataset_class, root, config.source, train=False)
        train_images, train_labels = _as_arrays(train)
        test_images, test_labels = _as_arrays(test)
    dataset = ImageDataset(
        name=config.source,
        classes=[str(name) for name in train.classes],
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        sources={split: [f"{config.source}:{split}:{index}" for index in range(count)]
                 for split, count in (("train", len(train_labels)), ("test", len(test_labels)))},
    )
    return SourceData(dataset)


def dataset_class_for(source: str, mirror: str | None) -> type:
    """torchvision's class for `source`, or a subclass of it that downloads from the `mirror` base URL."""
    base = getattr(torchvision.datasets, TORCHVISION_CLASSES[source])
    if not mirror:
        return base
    mirror_base = mirror.rstrip("/") + "/"
    if hasattr(base, "mirrors"):  # MNIST family: file names are appended to each mirror's base URL
        overrides: dict[str, Any] = {"mirrors": [mirror_base]}
    else:  # CIFAR: one URL for the whole archive
        overrides = {"url": mirror_base + base.filename}
    # The same class name: MNIST derives its folders (<root>/MNIST/raw) from it.
    return type(base.__name__, (base,), overrides)


def _remote_files(dataset_class: type, root: Path) -> list[_RemoteFile]:
    if hasattr(dataset_class, "resources"):  # MNIST family: four .gz files in <root>/<class name>/raw
        raw = root / dataset_class.__name__ / "raw"
        raw.mkdir(parents=True)
        return [
            _RemoteFile([mirror + filename for mirror in dataset_class.mirrors], raw / filename, md5)
            for filename, md5 in dataset_class.resources
        ]
    return [_RemoteFile([dataset_class.url], root / dataset_class.filename, dataset_class.tgz_md5)]


def _fetch_verified(remote: _RemoteFile, config: DataConfig, on_progress: ProgressCallback) -> None:
    """Download from the first mirror that serves the file with the expected md5, or raise why none did."""
    failures: list[KilnError] = []
    for url in remote.urls:
        try:
            fetch(url, remote.destination, timeout_s=config.timeout_s, max_bytes=config.max_archive_bytes,
                  on_progress=on_progress)  # fmt: skip
        except (DataError, DownloadError) as error:
            failures.append(error)
            continue
        actual = calculate_md5(remote.destination)
        if actual == remote.md5:
            return
        remote.destination.unlink()
        failures.append(
            DataError(
                f"{url} has md5 {actual}, but torchvision's checksum for {remote.destination.name} is {remote.md5}: "
                f"the mirror serves a different file than torchvision's checksum expects; point data.uri at a "
                f"mirror of the original files, or unset it to use torchvision's"
            )
        )
    if len(failures) == 1:
        raise failures[0]
    # Retry (DownloadError) if any mirror might work next time.
    kind = DownloadError if any(isinstance(failure, DownloadError) for failure in failures) else DataError
    raise kind(f"no mirror served {remote.destination.name}:\n  " + "\n  ".join(map(str, failures)))


def _open_split(dataset_class: type, root: str, source: str, *, train: bool) -> Any:
    try:
        return dataset_class(root, train=train, download=True)
    except Exception as error:  # damaged files surface as RuntimeError, tarfile, pickle or idx-format errors
        raise DataError(
            f"torchvision could not read the downloaded {source} files ({error.__class__.__name__}: {error}); "
            f"the archive is corrupt or not the original release: the mirror serves a different file than "
            f"torchvision's checksum expects"
        ) from error


def _as_arrays(split: Any) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(split.data, dtype=np.uint8)  # CIFAR: numpy NHWC already; MNIST: a torch [N, 28, 28]
    if images.ndim == 3:
        images = images[..., None]
    return np.ascontiguousarray(images), np.asarray(split.targets, dtype=np.int64)
