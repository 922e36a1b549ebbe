"""The thin Prefect layer every stage task shares: a cache key over the stage's content hash, and reports.

A stage task is cached by Prefect under the same content hash that names its output directory, but only while the
store really holds that output: if someone deletes the directory, the key is withheld and the stage recomputes
instead of handing on a reference to nothing. The first run that finds an output in the store runs the (instant)
reuse path and records it; later runs are served by Prefect's cache directly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger

from kiln.config import StoreConfig
from kiln.errors import IntegrityError
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore

KILN_LOGGER = logging.getLogger("kiln")
# A stage that runs past its timeout is failed by Prefect instead of hanging a worker. Generous on purpose: they
# catch stuck runs, not slow ones. Override one with e.g. `train_task.with_options(timeout_seconds=...)`.
STAGE_TIMEOUT_S = {
    "download": 4 * 3600,
    "validate": 2 * 3600,
    "augment": 600,
    "train": 48 * 3600,
    "evaluate": 2 * 3600,
    "export": 3600,
    "compress": 6 * 3600,
    "package": 3600,
}


def stage_task(stage: Stage, **task_options: Any) -> Callable:
    """Decorate a stage's wrapper `fn(config, <ArtifactRef inputs>..., store: StoreConfig)` as a Prefect task.

    The pure stage functions log to the standard "kiln" logger; inside the task those records go to the run's log.
    """
    options = {
        "name": stage.name,
        "cache_key_fn": _cache_key_fn(stage),
        "persist_result": True,
        "result_serializer": "json",
        "timeout_seconds": STAGE_TIMEOUT_S.get(stage.name),
        **task_options,
    }

    return lambda fn: task(**options)(forward_kiln_logs(fn))


def forward_kiln_logs(fn: Callable) -> Callable:
    """Wrap a task function so that records of the "kiln" logger reach the Prefect run's log while it runs."""

    @functools.wraps(fn)
    def with_run_logging(*args: Any, **kwargs: Any) -> Any:
        if KILN_LOGGER.level == logging.NOTSET:  # else the root logger's WARNING default drops the stages' INFO lines
            KILN_LOGGER.setLevel(logging.INFO)
        handler = _RunLogForwarder()
        KILN_LOGGER.addHandler(handler)
        # Inside a run the run logger prints the line (and sends it to the UI); propagating to the root logger,
        # which Prefect also gives a console handler, would print it twice.
        propagate = KILN_LOGGER.propagate
        KILN_LOGGER.propagate = propagate and not in_prefect_run()
        try:
            return fn(*args, **kwargs)
        finally:
            KILN_LOGGER.removeHandler(handler)
            KILN_LOGGER.propagate = propagate

    return with_run_logging


class _RunLogForwarder(logging.Handler):
    """Sends "kiln" log records to the current Prefect run's logger (shown in the UI)."""

    def emit(self, record: logging.LogRecord) -> None:
        if in_prefect_run():  # a task body called directly (`task.fn(...)`) has no run log to write to
            get_run_logger().log(record.levelno, record.getMessage())


def _cache_key_fn(stage: Stage) -> Callable[[Any, dict[str, Any]], str | None]:
    def cache_key(_context: Any, parameters: dict[str, Any]) -> str | None:
        inputs = {name: value for name, value in parameters.items() if isinstance(value, ArtifactRef)}
        key = stage.key(parameters["config"], inputs)
        store_config = _store_config(parameters)
        store = ArtifactStore(store_config.root, store_config.on_corrupt)
        stored = store.lookup(stage.name, key)
        if stored is None or not _intact(store, stored):
            return None  # run the task: its stage rebuilds the output (or stops, by store.on_corrupt)
        # Prefect's result records outlive any one store: naming the store and the stored digest in the cache key
        # means a cached reference always points at exactly the content this store holds now.
        where = hashlib.sha256(store.url.encode()).hexdigest()[:12]
        return f"kiln-{stage.name}-{key}-{stored.digest[:16]}-{where}"

    return cache_key


def _intact(store: ArtifactStore, ref: ArtifactRef) -> bool:
    try:
        store.verify(ref)
        return True
    except IntegrityError:
        return False


def _store_config(parameters: dict[str, Any]) -> StoreConfig:
    store = parameters["store"]
    return store if isinstance(store, StoreConfig) else StoreConfig.model_validate(store)


def in_prefect_run() -> bool:
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def report(ref: ArtifactRef, store: StoreConfig, title: str, lines: list[str] | None = None) -> None:
    """Publish a short markdown Prefect artifact for a stage output (skipped outside a Prefect run)."""
    manifest = ArtifactStore(store.root, store.on_corrupt).manifest(ref)
    status = "reused from the store" if ref.reused else f"computed in {manifest.duration_s:.1f} s"
    body = [f"## {title}", "", f"- output: `{ref.uri}` ({status})", f"- content digest: `{ref.digest[:16]}`"]
    body += lines or []
    KILN_LOGGER.info(f"{ref.stage}: {status} -> {ref.uri}")
    if in_prefect_run():
        create_markdown_artifact(markdown="\n".join(body), key=f"kiln-{ref.stage}", description=title)


def report_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """Publish a table Prefect artifact (skipped outside a Prefect run)."""
    if in_prefect_run() and rows:
        create_table_artifact(table=rows, key=key, description=description)


class Progress:
    """A Prefect progress artifact (0-100 %) that a long stage moves forward; does nothing outside a Prefect run.

    Updates are API calls, so one is sent only when the bar moves by a whole percent or the step changes.
    """

    def __init__(self, key: str, description: str):
        self.artifact_id = create_progress_artifact(0.0, key=key, description=description) if in_prefect_run() else None
        self.last: tuple[int, str | None] = (0, None)

    def update(self, fraction: float, description: str | None = None, step: str | None = None) -> None:
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        if self.artifact_id is None or (int(percent), step) == self.last:
            return
        self.last = (int(percent), step)
        update_progress_artifact(self.artifact_id, percent, description)

    def report(self, what: str, done: int, total: int) -> None:
        """A kiln.progress callback: `what` with done/total (a bar only when the total is known)."""
        if total > 0:
            self.update(done / total, f"{what}: {done:,}/{total:,}", step=what)
