"""The retrain flow's first decision: has the data changed enough since production was trained to retrain?

Reads the production model's registration (which dataset it was trained and evaluated on) from the registry and
compares that dataset with the one the download stage just produced (kiln/drift.py). Not cached: the answer
depends on the registry's current state. Every decision is logged and published as a markdown artifact.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from kiln.config import PackageConfig, RetrainPolicy, StoreConfig
from kiln.drift import RetrainDecision, compare_dataset_dirs, comparison_rows, decide_retrain
from kiln.registry import production_version, trained_on
from kiln.store import ArtifactRef, ArtifactStore
from tasks._task import forward_kiln_logs, in_prefect_run

LOGGER = logging.getLogger("kiln")


def detect_change(
    policy: RetrainPolicy, package: PackageConfig, dataset: ArtifactRef, store: ArtifactStore
) -> RetrainDecision:
    """Compare `dataset` (a download output) with the data of `package.model_name`'s production version."""
    if not package.registry:
        return RetrainDecision(True, "retrain: package.registry is off, so there is no production model to compare")
    production = production_version(store, package.model_name)
    if production is None:
        return RetrainDecision(True, f"retrain: {package.model_name} has no production version yet")
    reference = production.registration.get("dataset", {})
    if reference.get("digest") == dataset.digest:
        return RetrainDecision(
            False, f"no change: the data is exactly what production ({production.version}) was evaluated on"
        )
    reference_ref = trained_on(store, production)
    if reference_ref is None:
        return RetrainDecision(
            True, f"retrain: the data changed and production's dataset ({reference.get('uri')}) is no longer in the "
            "store to measure by how much",
        )  # fmt: skip
    comparison = compare_dataset_dirs(store.materialize(reference_ref), store.materialize(dataset))
    return decide_retrain(comparison, policy)


@task(name="detect-change", cache_policy=NO_CACHE, persist_result=False)
@forward_kiln_logs
def detect_change_task(
    policy: RetrainPolicy, package: PackageConfig, dataset: ArtifactRef, store: StoreConfig
) -> dict[str, Any]:
    """Decide whether to retrain; publish the decision."""
    decision = detect_change(policy, package, dataset, ArtifactStore(store.root, store.on_corrupt))
    LOGGER.info(f"retrain decision: {decision.summary}")
    if in_prefect_run():
        create_markdown_artifact(markdown=decision_markdown(decision, dataset), key="kiln-retrain-decision",
                                 description="Retrain decision")  # fmt: skip
    comparison = decision.comparison.as_dict() if decision.comparison else None
    return {"retrain": decision.retrain, "summary": decision.summary, "reasons": decision.reasons,
            "comparison": comparison}  # fmt: skip


def decision_markdown(decision: RetrainDecision, dataset: ArtifactRef) -> str:
    lines = ["## Retrain decision", "", f"**{decision.summary}**", "", f"- data: `{dataset.uri}` "
             f"(digest `{dataset.digest[:16]}`)"]  # fmt: skip
    if decision.comparison is not None:
        lines += ["", "| measure | value |", "|---|---|"]
        lines += [f"| {measure} | {value} |" for measure, value in comparison_rows(decision.comparison)]
    return "\n".join(lines)
