"""Scheduled retraining: fetch the data, compare it with production's, and retrain only when it changed enough.

    prefect deployment run 'retrain/retrain'          # deployed from deployments/prefect.yaml, on a cron schedule

download (reused when the source is unchanged) → detect change (kiln/drift.py, thresholds in RetrainPolicy) →
the whole training pipeline as a subflow, whose register step promotes the new model only if it beats production.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.hooks import publish_failure_summary
from flows.results import results_in_store
from flows.training_pipeline import training_pipeline
from kiln.config import PipelineConfig, RetrainPolicy, load_config
from tasks.detect_change import detect_change_task
from tasks.download import download_task


@flow(
    name="retrain",
    flow_run_name="retrain-{config.profile}-{config.data.source}",
    on_failure=[publish_failure_summary],
    log_prints=False,
)
def retrain(config: PipelineConfig = load_config("quickstart"), policy: RetrainPolicy = RetrainPolicy()) -> dict[str, Any]:
    """Retrain when the data source changed beyond `policy`'s thresholds; otherwise finish and say so."""
    with results_in_store(config.store):  # and the subflow's (flows/results.py)
        dataset = download_task(config.data, config.store)
        decision = detect_change_task(policy, config.package, dataset, config.store)
        if not decision["retrain"]:
            return decision
        outputs = training_pipeline(config)
    return {**decision, "bundle": outputs["package"].uri}


if __name__ == "__main__":
    retrain()
