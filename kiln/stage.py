"""What every stage shares: how its output is keyed, looked up, built and published.

A stage's pure function calls `Stage.produce(store, config, inputs, build)`. If the store already holds the output
for that key it is reused; otherwise `build(out_dir)` writes files into an empty local directory and returns metrics,
and the directory is published atomically with its manifest.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import kiln
from kiln.store import ArtifactRef, ArtifactStore

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
        return _code_version(self.module)

    def key(self, config: BaseModel, inputs: Mapping[str, ArtifactRef]) -> str:
        """Content hash of what produces the output: stage, config section, input digests, source, code."""
        fingerprint = self.source_fingerprint(config) if self.source_fingerprint else ""
        material = {
            "stage": self.name,
            "config": config.model_dump(mode="json"),
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
        """Reuse the stored output for this key, or build and publish it."""
        key = self.key(config, inputs)
        existing = store.lookup(self.name, key)
        if existing is not None:
            return existing.model_copy(update={"reused": True})
        started_at = time.time()
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


@cache
def _code_version(module_name: str) -> str:
    import importlib

    digest = hashlib.sha256(kiln.__version__.encode())
    core_dir = Path(kiln.__file__).parent
    sources = sorted(core_dir.rglob("*.py")) + [Path(inspect.getfile(importlib.import_module(module_name)))]
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]
