"""The last step, register: add the packaged bundle to the model registry and decide which alias it gets.

The challenger (this run's bundle) and the champion (the registry's current production bundle) are scored the same
way, with the bundle runtime on this run's test split, so the comparison is fair whatever the champion was trained
on. The new version becomes production unless the evaluation gate failed, the champion cannot be compared, or it is
worse than the champion by more than package.max_regression; otherwise it becomes staging. See kiln/registry.py.

Not cached: the decision depends on the registry's current state, not only on this step's inputs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from kiln.bundle import Bundle, load_bundle
from kiln.config import PackageConfig, StoreConfig
from kiln.dataset import read_info, read_split
from kiln.errors import DataError, KilnError
from kiln.registry import (
    AliasConflict,
    ChampionResult,
    Decision,
    ModelRegistry,
    decide_promotion,
    registry_root,
)
from kiln.store import ArtifactRef, ArtifactStore, read_json
from tasks._task import forward_kiln_logs, in_prefect_run

LOGGER = logging.getLogger("kiln")
EVAL_CHUNK = 1024  # test images scored at a time, to bound memory on large test sets
DECISION_ATTEMPTS = 3  # re-decisions when a concurrent run moves production in between


def register(
    config: PackageConfig,
    dataset: ArtifactRef,
    bundle: ArtifactRef,
    evaluation: ArtifactRef,
    store: ArtifactStore,
) -> dict[str, Any]:
    """Register `bundle` (a package output) and move production or staging to it; returns the decision."""
    if not config.registry:
        return _decision_dict(config.model_name, None, None, "registration skipped: package.registry is false")
    registry = ModelRegistry(registry_root(store))
    package_metrics = store.manifest(bundle).metrics
    version = str(package_metrics["version"])
    bundle_dir = store.materialize(bundle) / package_metrics["bundle"]
    dataset_dir = store.materialize(dataset)
    classes = read_info(dataset_dir).classes
    images, labels = read_split(dataset_dir, "test")
    evaluation_metrics = read_json(store.materialize(evaluation) / "metrics.json")
    blessed = bool(evaluation_metrics["blessed"])

    challenger_accuracy = bundle_accuracy(load_bundle(bundle_dir), images, labels)
    registration = {
        "metrics": {"test_accuracy": challenger_accuracy, "test_samples": int(len(labels)),
                    "evaluation": evaluation_metrics},
        "blessed": blessed,
        "dataset": {"digest": dataset.digest, "key": dataset.key, "uri": dataset.uri},
        "source": {"uri": bundle.uri, "digest": bundle.digest, "bundle": package_metrics["bundle"]},
    }  # fmt: skip
    registry.register(config.model_name, version, bundle_dir, registration)

    for _attempt in range(DECISION_ATTEMPTS):
        champion = score_champion(registry, config.model_name, classes, images, labels)
        if champion is not None and champion.version == version:
            # A re-run of the same content: comparing the version with itself would only log a pointless move.
            decision = Decision("production", f"version {version} is already production")
        else:
            decision = decide_promotion(challenger_accuracy, blessed, champion, config.max_regression)
        try:
            # Conditional on production being the champion just scored: a concurrent run that promoted meanwhile
            # makes this run compare again instead of overwriting a better model.
            registry.set_alias(config.model_name, decision.alias, version, decision.reason, actor="kiln pipeline",
                               expect={"production": champion.version if champion else None})  # fmt: skip
            break
        except AliasConflict as conflict:
            LOGGER.info(f"registry: {conflict}")
    else:
        raise KilnError(
            f"production of {config.model_name} kept moving while this run compared against it "
            f"({DECISION_ATTEMPTS} tries); version {version} is registered without an alias: promote it with "
            f"`kiln registry promote {config.model_name} {version}` if it should be"
        )
    LOGGER.info(f"registry: {config.model_name} {version} -> {decision.alias}: {decision.reason}")
    return _decision_dict(config.model_name, version, decision.alias, decision.reason, challenger_accuracy, champion)


def score_champion(
    registry: ModelRegistry, model_name: str, classes: list[str], images: np.ndarray, labels: np.ndarray
) -> ChampionResult | None:
    """Production's accuracy on this test set; None when there is no production; a problem when not comparable."""
    if model_name not in registry.models():
        return None
    production = registry.aliases(model_name).get("production")
    if production is None:
        return None
    try:
        champion = load_bundle(registry.get(model_name, production).path)
    except KilnError as error:  # e.g. a file of the registered bundle was changed after registration
        return ChampionResult(production, problem=f"its bundle does not load ({error})")
    if champion.labels != list(classes):
        return ChampionResult(
            production, problem=f"its classes {champion.labels} differ from this dataset's {list(classes)}"
        )
    prep = champion.preprocessing
    expected = tuple(int(size) for size in images.shape[1:])
    if (prep.height, prep.width, prep.channels) != expected:
        return ChampionResult(
            production,
            problem=f"it takes {prep.height}x{prep.width}x{prep.channels} images, this dataset has "
            f"{expected[0]}x{expected[1]}x{expected[2]}",
        )
    return ChampionResult(production, accuracy=bundle_accuracy(champion, images, labels))


def bundle_accuracy(bundle: Bundle, images: np.ndarray, labels: np.ndarray, chunk: int = EVAL_CHUNK) -> float:
    """Top-1 accuracy of `bundle` on uint8 NHWC `images`, scored `chunk` images at a time."""
    if len(labels) == 0:
        raise DataError("the test split is empty: the registry cannot compare models without test images")
    correct = 0
    for start in range(0, len(labels), chunk):
        probabilities = bundle.predict_arrays(images[start : start + chunk])
        correct += int((probabilities.argmax(axis=1) == labels[start : start + chunk]).sum())
    return correct / len(labels)


def _decision_dict(
    model_name: str,
    version: str | None,
    alias: str | None,
    reason: str,
    challenger_accuracy: float | None = None,
    champion: ChampionResult | None = None,
) -> dict[str, Any]:
    return {
        "model": model_name,
        "version": version,
        "alias": alias,
        "reason": reason,
        "challenger_accuracy": challenger_accuracy,
        "champion_version": champion.version if champion else None,
        "champion_accuracy": champion.accuracy if champion else None,
    }


@task(name="register", cache_policy=NO_CACHE, persist_result=False)
@forward_kiln_logs
def register_task(
    config: PackageConfig,
    dataset: ArtifactRef,
    bundle: ArtifactRef,
    evaluation: ArtifactRef,
    store: StoreConfig,
) -> dict[str, Any]:
    """Add the bundle to the model registry and promote it to production or staging."""
    decision = register(config, dataset, bundle, evaluation, ArtifactStore(store.root, store.on_corrupt))
    if in_prefect_run():
        create_markdown_artifact(markdown=_markdown(decision), key="kiln-registry", description="Model registry")
    return decision


def _markdown(decision: dict[str, Any]) -> str:
    if decision["alias"] is None:
        return f"## Model registry\n\n- {decision['reason']}"
    champion = (
        f"{decision['champion_version']} ({_accuracy_text(decision['champion_accuracy'])})"
        if decision["champion_version"] else "none"
    )  # fmt: skip
    return "\n".join([
        "## Model registry",
        "",
        f"- `{decision['model']}` version `{decision['version']}` → **{decision['alias']}**",
        f"- reason: {decision['reason']}",
        f"- test accuracy: {_accuracy_text(decision['challenger_accuracy'])}; production before: {champion}",
    ])  # fmt: skip


def _accuracy_text(value: float | None) -> str:
    return "not comparable" if value is None else f"{value:.4f}"

