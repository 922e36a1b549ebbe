"""Prefect's task results and cache records kept in the artifact store, next to the outputs they point at.

A stage task's Prefect result is a small JSON reference to a stored output, and its cache record is what lets the
next run skip the stage. By default Prefect writes both under the worker's `~/.prefect/storage`, so a run on another
machine (another container, another pod) sees neither. Inside `results_in_store(store)` they go to
`<store.root>/.prefect-results/` instead: on S3 every worker that can reach the store shares the cache, and a
run's results live and die with the outputs they name. `store.prefect_results: false` leaves them to Prefect's own
settings (e.g. `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`).

The storage is saved as a Prefect block (`kiln-results-<digest of the URL>`), so the records name a block that any
client of the same Prefect server can load to read them back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.context import FlowRunContext
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem

from kiln.config import StoreConfig
from kiln.store import ArtifactStore

RESULTS_DIR = ".prefect-results"  # <store.root>/.prefect-results/: Prefect's records, never read by kiln itself


@contextmanager
def results_in_store(store: StoreConfig) -> Iterator[WritableFileSystem | None]:
    """Within the current flow run, persist task results and cache records under `<store.root>/.prefect-results`.

    Subflows started inside inherit it. Outside a flow run, or with `store.prefect_results` off, changes nothing.
    """
    context = FlowRunContext.get()
    if context is None or not store.prefect_results:
        yield None
        return
    storage = result_storage(store)
    result_store = context.result_store.model_copy(update={"result_storage": storage})
    with context.model_copy(update={"result_store": result_store}):
        yield storage


def result_storage(store: StoreConfig) -> WritableFileSystem:
    """The saved Prefect storage block for `<store.root>/.prefect-results` (created on first use)."""
    artifact_store = ArtifactStore(store.root)
    block: WritableFileSystem
    if artifact_store.is_local:
        block = LocalFileSystem(basepath=f"{artifact_store.root}/{RESULTS_DIR}")
    else:
        block = RemoteFileSystem(basepath=f"{artifact_store.url}/{RESULTS_DIR}")
    name = "kiln-results-" + hashlib.sha256(artifact_store.url.encode()).hexdigest()[:12]
    try:
        block.save(name)
    except ValueError:  # Prefect's "name already in use": an earlier run saved it
        block = type(block).load(name)
    return block
