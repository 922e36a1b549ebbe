"""Prefect's task results and cache records kept in the artifact store, next to the outputs they point at.

A stage task's Prefect result is a small JSON reference to a stored output, and its cache record is what lets the
next run skip the stage. By default Prefect writes both under the worker's `~/.prefect/storage`, so a run on another
machine (another container, another pod) sees neither. Inside `results_in_store(store)` they go to
`<store.root>/.prefect-results/` instead: on S3 every worker that can reach the store shares the cache, and a
run's results live and die with the outputs they name. `store.prefect_results: false` leaves them to Prefect's own
settings (e.g. `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`).

The storage is saved as a Prefect block (`kiln-results-<digest of the URL>`), so the records name a block that any
client of the same Prefect server can load to read them back. kiln's own runs read the records through a guard that
accepts only what kiln's stage tasks write (JSON holding ArtifactRefs): Prefect decodes a record with whatever
serializer the record names, pickle included, so without it anyone able to write to the store could run code on
every worker. With the guard the store stays data, as it is for the weights (loaded with `weights_only`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.context import FlowRunContext
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem
from prefect.serializers import JSONSerializer

from kiln.config import StoreConfig
from kiln.store import ArtifactStore

RESULTS_DIR = ".prefect-results"  # <store.root>/.prefect-results/: Prefect's records, never read by kiln itself
ALLOWED_CLASSES = frozenset({"kiln.store.ArtifactRef"})  # what a stage task's JSON result may name
LOGGER = logging.getLogger("kiln")


@contextmanager
def results_in_store(store: StoreConfig) -> Iterator[WritableFileSystem | None]:
    """Within the current flow run, persist task results and cache records under `<store.root>/.prefect-results`.

    Subflows started inside inherit it. Outside a flow run, with `store.prefect_results` off, or where the root
    cannot hold them (a warning says why), changes nothing.
    """
    context = FlowRunContext.get()
    storage = result_storage(store) if context is not None and store.prefect_results else None
    if storage is None:
        yield None
        return
    result_store = context.result_store.model_copy(update={"result_storage": storage})
    with context.model_copy(update={"result_store": result_store}):
        yield storage


def result_storage(store: StoreConfig) -> WritableFileSystem | None:
    """The storage for `<store.root>/.prefect-results`, reading through the guard; the plain block is saved (on
    first use) as `kiln-results-<digest>`. None, with a warning, where Prefect cannot use the root."""
    artifact_store = ArtifactStore(store.root)
    name = "kiln-results-" + hashlib.sha256(artifact_store.url.encode()).hexdigest()[:12]
    if artifact_store.is_local:
        block_type, guarded_type, basepath = LocalFileSystem, _GuardedLocal, f"{artifact_store.root}/{RESULTS_DIR}"
    else:
        block_type, guarded_type, basepath = RemoteFileSystem, _GuardedRemote, f"{artifact_store.url}/{RESULTS_DIR}"
    try:
        saved = _load_or_save(block_type, name, basepath)
    except Exception as error:  # e.g. memory:///x, a URL Prefect's RemoteFileSystem does not take; or no API access
        LOGGER.warning(
            f"Prefect's results and cache records stay in Prefect's own result storage, not in {basepath}: {error}. "
            "Set store.prefect_results=false to silence this."
        )
        return None
    guarded = guarded_type(basepath=saved.basepath)
    guarded._block_document_id = saved._block_document_id  # records name the saved plain block, loadable anywhere
    return guarded


def _load_or_save(block_type: type[WritableFileSystem], name: str, basepath: str) -> WritableFileSystem:
    try:
        return block_type.load(name)
    except ValueError:  # Prefect's "unable to find block document": the first run on this store
        pass
    block = block_type(basepath=basepath)
    try:
        block.save(name)
    except ValueError:  # Prefect's "name already in use": a run starting at the same moment saved it first
        return block_type.load(name)
    return block


def only_kiln_records(content: bytes, path: str) -> bytes:
    """`content` if it is a record kiln's stage tasks could have written: Prefect's default JSON serializer and a
    result naming no class but ArtifactRef. Anything else raises (Prefect then treats the record as absent, and
    the task runs and writes a proper one over it) and is logged."""
    reason = _why_not_kiln(content)
    if reason is None:
        return content
    message = f"ignored Prefect result record {path}: {reason}; the task runs instead and rewrites it"
    LOGGER.warning(message)
    raise ValueError(message)


def _why_not_kiln(content: bytes) -> str | None:
    try:
        record = json.loads(content)
        serializer, result = record["metadata"]["serializer"], record["result"]
    except (ValueError, KeyError, TypeError) as error:
        return f"not a Prefect result record ({error.__class__.__name__})"
    if serializer != JSONSerializer().model_dump(mode="json"):
        kind = serializer.get("type") if isinstance(serializer, dict) else serializer
        return f"its serializer is {kind!r} with other settings than kiln's stage tasks use (plain JSON)"
    try:
        named = _named_classes(json.loads(result) if isinstance(result, str) else result)
    except ValueError as error:
        return f"its result is not JSON ({error.__class__.__name__})"
    if not named <= ALLOWED_CLASSES:
        return f"it names {sorted(named - ALLOWED_CLASSES)}, and kiln's stage results hold only ArtifactRefs"
    return None


def _named_classes(value: Any) -> set[str]:
    """Every class or exception type a Prefect-JSON value would make its decoder import."""
    if isinstance(value, dict):
        named = {str(value[field]) for field in ("__class__", "__exc_type__") if field in value}
        return named.union(*(_named_classes(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(_named_classes(item) for item in value))
    return set()


class _OnlyKilnRecords:
    """Storage mixin: every record read passes `only_kiln_records` first (sync and async paths)."""

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        content = super().read_path(path, _sync=True)  # type: ignore[misc]
        return only_kiln_records(content, f"{self.basepath}/{path}")  # type: ignore[attr-defined]

    async def aread_path(self, path: str) -> bytes:
        content = await super().aread_path(path)  # type: ignore[misc]
        return only_kiln_records(content, f"{self.basepath}/{path}")  # type: ignore[attr-defined]


# Never saved (records name the plain block); own slugs so that Prefect's registry keeps resolving the plain types.
class _GuardedLocal(_OnlyKilnRecords, LocalFileSystem):
    _block_type_slug = "kiln-guarded-local-file-system"


class _GuardedRemote(_OnlyKilnRecords, RemoteFileSystem):
    _block_type_slug = "kiln-guarded-remote-file-system"
