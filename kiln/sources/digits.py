"""The digits source: scikit-learn's bundled 8x8 handwritten digits (1,797 images), so the quickstart is offline."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits as sklearn_load_digits

from kiln.config import DataConfig
from kiln.dataset import ImageDataset, stratified_indices
from kiln.errors import ConfigError
from kiln.progress import ProgressCallback, ignore_progress
from kiln.sources import SourceData

_MAX_PIXEL = 16  # the digits' pixel values are counts (0..16) of set pixels in 4x4 blocks of a 32x32 bitmap


def load_digits(config: DataConfig, on_progress: ProgressCallback = ignore_progress) -> SourceData:
    """Digits as uint8 [N, 8, 8, 1] in 0..255, classes "0".."9", split stratified by data.test_fraction/seed.

    Raises ConfigError when data.uri is set: the set ships with scikit-learn, so a uri would be silently ignored.
    """
    if config.uri:
        raise ConfigError(
            f"data.uri={config.uri!r} is not used by data.source=digits (bundled with scikit-learn); remove it, "
            f"or use data.source=imagefolder for your own images"
        )
    bunch = sklearn_load_digits()
    images = np.round(bunch.images * 255 / _MAX_PIXEL).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    train_index, test_index = stratified_indices(labels, config.test_fraction, config.seed)
    sources = np.array([f"sklearn-digits:{index}" for index in range(len(labels))])
    dataset = ImageDataset(
        name="digits",
        classes=[str(name) for name in bunch.target_names],
        train_images=images[train_index],
        train_labels=labels[train_index],
        test_images=images[test_index],
        test_labels=labels[test_index],
        sources={"train": sources[train_index].tolist(), "test": sources[test_index].tolist()},
    )
    return SourceData(dataset)
