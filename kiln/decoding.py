"""Decode image files into uint8 arrays, in parallel, telling unusable files apart instead of failing on them.

A file counts as an image only if Pillow decodes it completely: extensions are not trusted, and truncated files are
rejected (which needs `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` off).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import ImageFile

from kiln.errors import KilnError
from kiln.progress import ProgressCallback, ignore_progress
from kiln.runtime.images import decode_image

_FILES_PER_JOB = 512  # files per pool job: with small images the per-job overhead matters
_PROCESS_POOL_MIN_FILES = 2000  # below this, starting worker processes (about a second) costs more than it saves
_MAX_WORKERS = 8
DECODING = "decoding images"


def decode_images(
    items: Iterable[tuple[str, Path | bytes]],
    count: int,
    image_size: int | None,
    on_progress: ProgressCallback = ignore_progress,
) -> dict[str, np.ndarray | str]:
    """Decode `count` (name, file path or file bytes) pairs; returns name -> uint8 [H, W, 1] for grayscale modes or
    [H, W, 3] for all others (resized to image_size x image_size when given), or why the file cannot be used.

    `items` is consumed lazily, a few jobs ahead of the decoders, so an archive read on the fly is never held in
    memory whole. `on_progress` hears ("decoding images", done, count) as jobs finish. Raises KilnError if Pillow
    was told to accept truncated images.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise KilnError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process (some library set it), so truncated images "
            "would load half-grey instead of being skipped; set it to False before running kiln"
        )
    workers = min(os.cpu_count() or 1, _MAX_WORKERS)
    if count < _PROCESS_POOL_MIN_FILES or workers == 1:
        decoded = _decode_job(list(items), image_size)
        on_progress(DECODING, len(decoded), count)
        return decoded
    results: dict[str, np.ndarray | str] = {}
    # Processes, because Pillow's JPEG parsing is mostly Python and holds the GIL (threads were slower than one
    # process); spawned, because forking a process that runs Prefect's threads is unsafe.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque[Future[dict[str, np.ndarray | str]]] = deque()
        for job in _batches(items, _FILES_PER_JOB):
            pending.append(pool.submit(_decode_job, job, image_size))
            if len(pending) > 4 * workers:
                results.update(pending.popleft().result())
                on_progress(DECODING, len(results), count)
        for future in pending:
            results.update(future.result())
            on_progress(DECODING, len(results), count)
    return results


def _decode_job(job: list[tuple[str, Path | bytes]], image_size: int | None) -> dict[str, np.ndarray | str]:
    return {name: decode_image(source, image_size) for name, source in job}


def _batches(items: Iterable[tuple[str, Path | bytes]], size: int) -> Iterator[list[tuple[str, Path | bytes]]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
