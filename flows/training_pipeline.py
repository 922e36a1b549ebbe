"""The training pipeline: raw data to a deployable bundle, one line per stage.

    kiln run --profile quickstart            # or: python -m flows.training_pipeline

Export runs before compress because int8 quantization works on the exported ONNX graph and re-evaluates it with
onnxruntime, the same runtime the bundle ships with.
"""

from __future__ import annotations

from prefect import flow

from flows.hooks import publish_failure_summary
from flows.results import results_in_store
from kiln.config import PipelineConfig, load_config
from kiln.store import ArtifactRef
from tasks.augment import augment_task
from tasks.compress import compress_task
from tasks.download import download_task
from tasks.evaluate import evaluate_task, gate_task
from tasks.export import export_task
from tasks.package import package_task
from tasks.register import register_task
from tasks.train import train_task
from tasks.validate import find_reference_data_task, validate_task


@flow(
    name="training-pipeline",
    flow_run_name="{config.profile}-{config.data.source}",
    on_failure=[publish_failure_summary],
    log_prints=False,
)
def training_pipeline(config: PipelineConfig = load_config("quickstart")) -> dict[str, ArtifactRef]:
    """Download → validate → augment → train → evaluate (gate) → export → compress → package → register.

    The last step adds the bundle to the model registry and moves `production` to it only if it passed the gate
    and is not worse than the current production model on this test set (champion/challenger).
    """
    store = config.store
    with results_in_store(store):  # Prefect results and cache records next to the outputs (flows/results.py)
        dataset = download_task(config.data, store)
        # production's data, to measure drift against
        reference = find_reference_data_task(config.package, dataset, store)
        validation = validate_task(config.validation, dataset, store, reference)
        policy = augment_task(config.augment, dataset, store)
        model = train_task(config.train, dataset, policy, store)
        evaluation = evaluate_task(config.evaluate, model, dataset, store)
        gate_task(config.evaluate, evaluation, store)
        exported = export_task(config.export, model, dataset, store)
        compressed = compress_task(config.compress, exported, dataset, store, model=model)
        bundle = package_task(config.package, dataset, model, evaluation, exported, compressed, store)
        register_task(config.package, dataset, bundle, evaluation, store)
        return {"download": dataset, "validate": validation, "augment": policy, "train": model, "evaluate": evaluation,
                "export": exported, "compress": compressed, "package": bundle}  # fmt: skip


if __name__ == "__main__":
    training_pipeline()
