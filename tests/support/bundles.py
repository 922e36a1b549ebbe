"""Build a real deployment bundle from published fixtures by running the evaluate → package stage functions."""

from __future__ import annotations

from pathlib import Path

from kiln.config import CompressConfig, EvaluateConfig, ExportConfig, PackageConfig
from kiln.store import ArtifactRef, ArtifactStore
from tasks.compress import compress
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.package import bundle_location, package


def build_bundle(
    store: ArtifactStore,
    dataset_ref: ArtifactRef,
    model_ref: ArtifactRef,
    package_config: PackageConfig = PackageConfig(),
    compress_config: CompressConfig = CompressConfig(latency_runs=3),
) -> tuple[ArtifactRef, Path]:
    """The package output's reference and its bundle folder (a local path)."""
    evaluation = evaluate(EvaluateConfig(), model_ref, dataset_ref, store)
    exported = export(ExportConfig(), model_ref, dataset_ref, store)
    compressed = compress(compress_config, exported, dataset_ref, store)
    ref = package(package_config, dataset_ref, model_ref, evaluation, exported, compressed, store)
    bundle_uri, _ = bundle_location(ref, store)
    return ref, Path(bundle_uri)
