"""What every stage shares: how its output is keyed, looked up, built and published.

A stage's pure function calls `Stage.produce(store, config, inputs, build)`. If the store already holds the output
for that key, and every file still matches its sha256, it is reused; otherwise `build(out_dir)` writes files into an
empty local directory and returns metrics, and the directory is published atomically with its manifest. A stored
output that fails its checksums is set aside and rebuilt, or stops the run, by the store's `on_corrupt` policy.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import importlib.util
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import kiln
from kiln.errors import IntegrityError, StorageFull
from kiln.store import ArtifactRef, ArtifactStore

LOGGER = logging.getLogger("kiln")
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

BuildFn = Callable[[Path], dict[str, Any] | None]


@dataclass(frozen=True)
class Stage:
    """A named pipeline stage whose code version is the hash of its module and of the kiln core."""

    name: str
    module: str  # the module whose source (with kiln's) versions the stage's code
    # For stages that read outside the store (download): a cheap fingerprint of the source's current content,
    # so that changed files produce a new key instead of a stale reuse.
    source_fingerprint: Callable[[Any], str] | None = None

    def code_version(self) -> str:
        # CPython 3.11's ast.parse is not thread-safe ("AST constructor recursion depth mismatch" when two threads
        # parse at once, e.g. two stages keyed concurrently); the result is cached, so the lock costs nothing later.
        with _CODE_VERSION_LOCK:
            return _code_version(self.module)

    def key(self, config: BaseModel, inputs: Mapping[str, ArtifactRef]) -> str:
        """Content hash of what produces the output: stage, config section, input digests, source, code."""
        fingerprint = self.source_fingerprint(config) if self.source_fingerprint else ""
        material = {
            "stage": self.name,
            "config": config.key_fields() if hasattr(config, "key_fields") else config.model_dump(mode="json"),
            "inputs": {name: ref.digest for name, ref in sorted(inputs.items())},
            "source_fingerprint": fingerprint,
            "code": self.code_version(),
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]

    def produce(
        self,
        store: ArtifactStore,
        config: BaseModel,
        inputs: Mapping[str, ArtifactRef],
        build: BuildFn,
    ) -> ArtifactRef:
        """Reuse the stored output for this key if it is intact, or build and publish it.

        Raises IntegrityError for a corrupt stored output when the store's policy is "stop", and StorageFull when
        the disk fills up while building.
        """
        key = self.key(config, inputs)
        existing = store.lookup(self.name, key)
        if existing is not None and self._intact(store, existing, set_aside=False):
            return existing.model_copy(update={"reused": True})
        with store.building(self.name, key):
            existing = store.lookup(self.name, key)  # a concurrent run may have published it while we waited
            if existing is not None and self._intact(store, existing, set_aside=True):
                return existing.model_copy(update={"reused": True})
            return self._build(store, key, config, inputs, build)

    def _intact(self, store: ArtifactStore, ref: ArtifactRef, *, set_aside: bool) -> bool:
        """Whether a stored output still matches its manifest. A corrupt one raises under the "stop" policy;
        otherwise it is moved aside (only while holding the build lock, `set_aside`) so that it is rebuilt."""
        try:
            store.verify(ref)
            return True
        except IntegrityError as error:
            if store.on_corrupt == "stop":
                raise IntegrityError(
                    f"{self.name}: the stored output is corrupt and store.on_corrupt is 'stop': {error}, or set "
                    f"store.on_corrupt=recompute"
                ) from None
            if set_aside:
                where = store.set_aside(ref)
                LOGGER.warning(f"{self.name}: {error}. Recomputing it; the corrupt copy was moved to {where}")
            return False

    def _build(
        self, store: ArtifactStore, key: str, config: BaseModel, inputs: Mapping[str, ArtifactRef], build: BuildFn
    ) -> ArtifactRef:
        started_at = time.time()
        try:
            with store.staging(self.name) as out_dir:
                metrics = build(out_dir) or {}
                return store.publish(
                    self.name,
                    key,
                    out_dir,
                    code_version=self.code_version(),
                    inputs=dict(inputs),
                    config=config.model_dump(mode="json"),
                    metrics=metrics,
                    started_at=started_at,
                )
        except OSError as error:
            if error.errno not in _DISK_FULL:
                raise
            where = f" ({error.filename})" if error.filename else ""
            raise StorageFull(
                f"{self.name}: the disk under store.root={store.url} is full{where}; nothing was published and the "
                f"partial output was removed. Free space there (old outputs under it can be deleted), or point "
                f"store.root at a larger disk with --set store.root=PATH"
            ) from None


_CODE_VERSION_LOCK = threading.Lock()


@cache
def _code_version(module_name: str) -> str:
    """Hash of the stage module's source and of every project module it imports, directly or not.

    Editing the CLI or another stage leaves this stage's key, and so its stored output, untouched.
    """
    digest = hashlib.sha256(kiln.__version__.encode())
    for path in sorted(_project_sources(module_name)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _project_sources(module_name: str) -> set[Path]:
    """Source files of `module_name` and of the kiln/tasks/flows modules it imports (anywhere in its body)."""
    seen: dict[str, Path] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        if name in seen or name.split(".")[0] not in _PROJECT_PACKAGES:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # `from module import function` names no module
            continue
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        seen[name] = Path(spec.origin)
        pending.extend(_imported_names(Path(spec.origin), name, is_package=spec.submodule_search_locations is not None))
    return set(seen.values())


_PROJECT_PACKAGES = ("kiln", "tasks", "flows")


def _imported_names(path: Path, module_name: str, is_package: bool) -> list[str]:
    package = module_name if is_package else module_name.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module` imports a module
    expanded = []  # importing a.b.c runs a/__init__ and a/b/__init__ too
    for name in names:
        parts = name.split(".")
        expanded += [".".join(parts[: index + 1]) for index in range(len(parts))]
    return expanded
