"""How long-running library code reports progress without knowing about Prefect.

A callback `report(what, done, total)`: e.g. ("downloading train-images-idx3-ubyte.gz", 3_145_728, 9_912_422)
or ("decoding images", 4096, 60_000). `total` is 0 when unknown. The download task turns it into a Prefect
progress artifact; called directly, stages pass nothing and nothing is reported.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[str, int, int], None]


def ignore_progress(what: str, done: int, total: int) -> None:
    """The default callback: report nothing."""
