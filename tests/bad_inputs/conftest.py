"""The bad-input catalog: every wrong input a user can hand kiln, with the exact outcome each one gets.

Each case is one test whose name is the case. A failing case asserts the exception class, the parts of its message
that name the problem (the key, path, member or URL) and the fix, and that no stage output was half-written
(`fails_cleanly`); a "reported skip" asserts the skipped.csv row and that the output was published complete
(`assert_published_complete`).

test_config.py            (`load_config`, ConfigError)
    bad YAML syntax · unknown key · negative epochs · lr=NaN · unknown model · unknown profile · wrong type
    through `kiln run`: negative epochs · bad YAML · unknown profile (exit 2, a short message, no traceback,
    nothing in the store)
test_image_folders.py     (imagefolder source through `tasks.download.download`)
    DataError: path missing · empty dataset folder · one class only · class folder with no images · class folder
    whose only file is a corrupt image · mixed image sizes (the fix: data.image_size)
    succeeds: mixed sizes with data.image_size (resized) · grayscale mixed with RGB (3 channels)
    reported skip: a non-image file · a truncated JPEG
    decoded correctly: CMYK JPEG · 16-bit PNG · palette PNG · EXIF-rotated JPEG
test_archives.py          (kiln.sources.archives through the download stage; DataError, nothing unpacked)
    member with `../` · absolute member · tar symlink escaping · zip bomb (declared size over
    data.max_archive_bytes) · zip member whose header lies about its size · 0-byte archive · a .tar.gz that is
    no archive · truncated .tar.gz
test_http_downloads.py    (kiln.sources.http against a server on 127.0.0.1)
    404 (DataError, requested once) · 500 (DownloadError) · hanging server past data.timeout_s (DownloadError) ·
    torchvision mirror failing the checksum (DataError)
test_download_retries.py  (the real Prefect download task in prefect_test_harness; marked slow)
    HTTP 500: three requests (1 + 2 retries), then DownloadError · HTTP 404: one request, DataError
test_csv_manifest.py, test_storage_faults.py: the CSV manifest source, a full disk and flipped bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kiln.config import DataConfig
from kiln.dataset import read_split
from kiln.store import MANIFEST_NAME, ArtifactRef, ArtifactStore
from tests.support.archives import tar_gz, write_tree, zip_archive  # noqa: F401  (re-exported for the catalog's tests)

DOWNLOAD_FILES = {"train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy", "dataset.json",
                  "samples.csv", "skipped.csv"}  # fmt: skip


# --- no half-written output ---------------------------------------------------------------------------------------
def published_outputs(store_root: str | Path) -> set[Path]:
    """Every output directory the store would hand to a reader: those holding a manifest.json."""
    return {manifest.parent for manifest in Path(store_root).rglob(MANIFEST_NAME)}


def half_written_leftovers(store_root: str | Path) -> list[Path]:
    """What an interrupted write leaves behind: `.tmp-*` staging directories and `*.part` downloads."""
    root = Path(store_root)
    return sorted([*root.rglob(".tmp-*"), *root.rglob("*.part")])


def assert_store_unchanged(store_root: str | Path, published_before: set[Path]) -> None:
    """No output was published since `published_before` was taken, and nothing half-written was left."""
    new_outputs = published_outputs(store_root) - published_before
    assert not new_outputs, f"a failing stage published {sorted(new_outputs)}"
    leftovers = half_written_leftovers(store_root)
    assert not leftovers, f"half-written files left in the store: {leftovers}"


@contextmanager
def nothing_published(store_root: str | Path) -> Iterator[None]:
    """Around a step that must fail: afterwards the store has no new output and no half-written files."""
    published_before = published_outputs(store_root)
    yield
    assert_store_unchanged(store_root, published_before)


@contextmanager
def fails_cleanly(
    store_root: str | Path, error_type: type[BaseException], *message_parts: str
) -> Iterator[pytest.ExceptionInfo]:
    """The block must raise exactly `error_type` (pytest.raises alone would accept a subclass) with every one of
    `message_parts` in its message, and leave the store as `nothing_published` requires."""
    with nothing_published(store_root):
        with pytest.raises(error_type) as raised:
            yield raised
    assert type(raised.value) is error_type, f"raised {type(raised.value).__name__}, expected {error_type.__name__}"
    message = str(raised.value)
    missing = [part for part in message_parts if part not in message]
    assert not missing, f"the message {message!r} lacks {missing}"


def assert_published_complete(store: ArtifactStore, ref: ArtifactRef) -> Path:
    """The download output is published with every canonical file, every sha256 verified, nothing half-written."""
    directory = store.materialize(ref)  # raises IntegrityError on a missing or differing file
    assert {entry.path for entry in store.manifest(ref).files} == DOWNLOAD_FILES
    assert not half_written_leftovers(store.root)
    return directory


# --- building tiny inputs -----------------------------------------------------------------------------------------
def image_file(colour: int | tuple[int, ...], size: tuple[int, int] = (8, 8), mode: str = "RGB",
               fmt: str = "PNG", **save_options) -> bytes:  # fmt: skip
    """A flat image of `colour`, `size` = (width, height), encoded as `fmt`."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt, **save_options)
    return buffer.getvalue()


def two_classes(per_class: int = 3, prefix: str = "", **image) -> dict[str, bytes]:
    """{"<prefix>cat/<n>.png", "<prefix>dog/<n>.png": flat images}: the smallest dataset kiln accepts."""
    colours = {"cat": (200, 30, 30), "dog": (30, 30, 200)}
    return {
        f"{prefix}{name}/{index}.png": image_file(tuple(value + index for value in colour), **image)
        for name, colour in colours.items()
        for index in range(per_class)
    }


def imagefolder(uri: str | Path, **settings) -> DataConfig:
    return DataConfig(source="imagefolder", uri=str(uri), **settings)


# --- reading a published download output --------------------------------------------------------------------------
def skipped_reasons(directory: Path) -> dict[str, str]:
    """skipped.csv as {source: reason}."""
    table = pd.read_csv(directory / "skipped.csv")
    return dict(zip(table["source"], table["reason"]))


def pixels_of(directory: Path, source: str) -> np.ndarray:
    """The stored uint8 [H, W, C] array of the sample read from `source` (rows of samples.csv follow the arrays)."""
    samples = pd.read_csv(directory / "samples.csv")
    (row,) = samples.index[samples["source"] == source]
    split = samples.at[row, "split"]
    index_in_split = int((samples.loc[:row, "split"] == split).sum()) - 1
    images, _ = read_split(directory, split)
    return images[index_in_split]
