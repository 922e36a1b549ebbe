"""Decode image files into uint8 arrays, in parallel, telling unusable files apart instead of failing on them.

A file counts as an image only if Pillow decodes it completely: extensions are not trusted, and truncated files are
rejected (which needs `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` off).
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import os
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from kiln.errors import KilnError

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# What Pillow raises for files that are not images or are damaged (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
_FILES_PER_JOB = 512  # files per pool job: with small images the per-job overhead matters
_PROCESS_POOL_MIN_FILES = 2000  # below this, starting worker processes (about a second) costs more than it saves
_MAX_WORKERS = 8


def decode_images(
    items: Iterable[tuple[str, Path | bytes]], count: int, image_size: int | None
) -> dict[str, np.ndarray | str]:
    """Decode `count` (name, file path or file bytes) pairs; returns name -> uint8 [H, W, 1] for grayscale modes or
    [H, W, 3] for all others (resized to image_size x image_size when given), or why the file cannot be used.

    `items` is consumed lazily, a few jobs ahead of the decoders, so an archive read on the fly is never held in
    memory whole. Raises KilnError if Pillow was told to accept truncated images.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise KilnError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process (some library set it), so truncated images "
            "would load half-grey instead of being skipped; set it to False before running kiln"
        )
    workers = min(os.cpu_count() or 1, _MAX_WORKERS)
    if count < _PROCESS_POOL_MIN_FILES or workers == 1:
        return _decode_job(list(items), image_size)
    results: dict[str, np.ndarray | str] = {}
    # Processes, because Pillow's JPEG parsing is mostly Python and holds the GIL (threads were slower than one
    # process); spawned, because forking a process that runs Prefect's threads is unsafe.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque[Future[dict[str, np.ndarray | str]]] = deque()
        for job in _batches(items, _FILES_PER_JOB):
            pending.append(pool.submit(_decode_job, job, image_size))
            if len(pending) > 4 * workers:
                results.update(pending.popleft().result())
        for future in pending:
            results.update(future.result())
    return results


def decode_image(source: Path | bytes, image_size: int | None) -> np.ndarray | str:
    """One file (path or bytes) as a uint8 [H, W, C] array (see decode_images), or why it cannot be used."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()  # decode everything now: a truncated file fails here, not as a half-grey image
            pixels = _to_uint8(ImageOps.exif_transpose(image))
    except _DECODE_ERRORS as error:
        return _reason(error)
    if image_size is not None and pixels.shape[:2] != (image_size, image_size):
        pixels = resize(pixels, image_size)
    return pixels


def _decode_job(job: list[tuple[str, Path | bytes]], image_size: int | None) -> dict[str, np.ndarray | str]:
    return {name: decode_image(source, image_size) for name, source in job}


def _batches(items: Iterable[tuple[str, Path | bytes]], size: int) -> Iterator[list[tuple[str, Path | bytes]]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def resize(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C] (or [height, width, C] for a pair), bilinear."""
    height, width = (size, size) if isinstance(size, int) else size
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return resized.reshape(height, width, pixels.shape[2])


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W, 1|3] -> [H, W, channels]: grey is repeated into RGB; RGB becomes luminance (Pillow's "L")."""
    if pixels.shape[2] == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=2)
    return np.asarray(Image.fromarray(pixels).convert("L"))[..., None]


def _to_uint8(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale (PNG/TIFF): scale 0..65535 to 0..255; Pillow's convert("L") would clip instead.
        wide = np.asarray(image, dtype=np.float32)
        return np.clip(np.round(wide / 257), 0, 255).astype(np.uint8)[..., None]
    if image.mode in GRAYSCALE_MODES:
        return np.asarray(image.convert("L"))[..., None]
    return np.asarray(image.convert("RGB"))


def _reason(error: Exception) -> str:
    message = str(error).strip() or error.__class__.__name__
    if message.startswith("cannot identify image file"):
        return "not an image (Pillow cannot identify its format)"
    if isinstance(error, OSError) and error.errno is not None:  # from the file system, not from decoding
        return f"cannot be read ({error.__class__.__name__}: {error.strerror})"
    return f"corrupt or truncated image ({error.__class__.__name__}: {message})"
