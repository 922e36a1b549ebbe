"""Download stage: read the configured data source and write it in kiln's canonical dataset format.

    from kiln.config import DataConfig
    from kiln.store import ArtifactStore
    from tasks.download import download
    ref = download(DataConfig(source="digits"), ArtifactStore("artifacts"))

Sources: scikit-learn digits (offline), torchvision's cifar10/mnist/fashion-mnist (md5-checked), or an image folder
(local folder, archive, or http(s) URL of an archive). Files that could not be used are listed in skipped.csv.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext

from kiln.config import DataConfig, StoreConfig
from kiln.dataset import write_dataset
from kiln.errors import DownloadError
from kiln.progress import ProgressCallback, ignore_progress
from kiln.sources import load_source, source_fingerprint
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore
from tasks._task import Progress, report, stage_task

STAGE = Stage("download", __name__, source_fingerprint=source_fingerprint)


def download(
    config: DataConfig, store: ArtifactStore, on_progress: ProgressCallback = ignore_progress
) -> ArtifactRef:
    """Load `config.source` and publish it as the download stage's output (reused if the store has it).

    `on_progress` hears long downloads and decodes. Raises DataError for data that is missing, unsafe or unusable,
    DownloadError for transient network failures.
    """

    def build(out_dir: Path) -> dict[str, Any]:
        loaded = load_source(config, on_progress)
        metrics = write_dataset(out_dir, loaded.dataset, loaded.skipped)
        return {**metrics, "dataset": loaded.dataset.name, "classes": list(loaded.dataset.classes)}

    return STAGE.produce(store, config, {}, build)


def retry_on_download_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry transient network failures (DownloadError) only, never bad data."""
    return isinstance(state.data, DownloadError)  # a task that raised fails with the exception as its data


@stage_task(STAGE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_download_error)
def download_task(config: DataConfig, store: StoreConfig) -> ArtifactRef:
    """Download and publish the dataset; retried on transient network failures."""
    artifact_store = ArtifactStore(store.root, store.on_corrupt)
    progress = Progress("kiln-download-progress", f"Reading {config.source} {config.uri or ''}".strip())
    try:
        ref = download(config, artifact_store, progress.report)
    except DownloadError as error:
        context = TaskRunContext.get()
        if context is not None and context.task_run.run_count > context.task.retries:
            raise DownloadError(
                f"{error}. Gave up after {context.task_run.run_count} attempts: try again later, or point data.uri at "
                "another mirror"
            ) from None
        raise
    progress.update(1.0, f"{config.source}: {'reused from the store' if ref.reused else 'read and published'}", "done")
    metrics = artifact_store.manifest(ref).metrics
    classes = metrics.get("classes", [])
    report(
        ref,
        store,
        "Download",
        [
            f"- dataset: `{metrics.get('dataset')}` (source `{config.source}`), images {metrics.get('image_shape')}",
            f"- samples: {metrics.get('train_samples')} train, {metrics.get('test_samples')} test",
            f"- classes ({len(classes)}): {', '.join(classes[:20])}{' …' if len(classes) > 20 else ''}",
            f"- skipped files: {metrics.get('skipped_files', 0)} (listed in skipped.csv)",
        ],
    )
    return ref
