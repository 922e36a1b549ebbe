"""Decode image files into uint8 arrays, in parallel, telling unusable files apart instead of failing on them.

A file counts as an image only if Pillow decodes it completely: extensions are not trusted, and truncated files are
rejected (which needs `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` off).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from kiln.errors import KilnError

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# What Pillow raises for files that are not images or are damaged (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
_FILES_PER_JOB = 256  # one pool job decodes this many files: small images make per-job overhead matter


def decode_images(paths: Sequence[Path], image_size: int | None) -> list[np.ndarray | str]:
    """Each file as uint8 [H, W, 1] (grayscale modes) or [H, W, 3] (everything else), resized to
    image_size x image_size when given; or, for a file that cannot be used, the reason as a string.

    Results are in the order of `paths`. Raises KilnError if Pillow was told to accept truncated images.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise KilnError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process (some library set it), so truncated images "
            "would load half-grey instead of being skipped; set it to False before running kiln"
        )
    jobs = [paths[start : start + _FILES_PER_JOB] for start in range(0, len(paths), _FILES_PER_JOB)]
    # Threads, not processes: Pillow releases the GIL while decoding, and forking a process that runs Prefect's
    # threads is unsafe.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(lambda job: [decode_image(path, image_size) for path in job], jobs)
        return [result for job_results in decoded for result in job_results]


def decode_image(path: Path, image_size: int | None) -> np.ndarray | str:
    """One file as a uint8 [H, W, C] array (see decode_images), or why it cannot be used."""
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now: a truncated file fails here, not as a half-grey image
            pixels = _to_uint8(ImageOps.exif_transpose(image))
    except _DECODE_ERRORS as error:
        return _reason(error)
    if image_size is not None and pixels.shape[:2] != (image_size, image_size):
        pixels = resize(pixels, image_size)
    return pixels


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C], bilinear."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    resized = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    return resized.reshape(size, size, pixels.shape[2])


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
    return f"corrupt or truncated image ({error.__class__.__name__}: {message})"
