"""Stage validate: Great Expectations checks on the dataset's samples.csv before anything trains on it.

    from kiln.config import ValidateConfig
    validate(ValidateConfig(), dataset_ref, ArtifactStore("artifacts"))  # -> ref of artifacts/validate/<key>/

The checks themselves (Great Expectations suites, results, Data Docs) are in kiln/data_checks.py. Output files:

    results.json   one entry per expectation per split (split "all" for table-level ones)
    summary.json   success, counts, per-class counts, where the Data Docs pages are
    data_docs/     GX Data Docs (index.html, one page per split); static HTML, styled by CDN assets when online

Any failed check raises ValidationFailed listing every failure with a fix, and nothing is published: the results
and Data Docs of a failed run are kept in the store's scratch area (.scratch/validate/<key>/), named in the error.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kiln.config import StoreConfig, ValidateConfig
from kiln.data_checks import DOCS_DIR, check_samples, describe_failures, summarize
from kiln.dataset import SPLITS, read_info, read_samples
from kiln.errors import ValidationFailed
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json, write_json
from tasks._task import report, report_table, stage_task

STAGE = Stage("validate", __name__)


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------
def validate(config: ValidateConfig, dataset: ArtifactRef, store: ArtifactStore) -> ArtifactRef:
    """Check `dataset`'s samples.csv against dataset.json; returns the ref of the validate output.

    Raises ValidationFailed (and publishes nothing) when any expectation or kiln check fails.
    """

    key = STAGE.key(config, {"dataset": dataset})

    def build(out_dir: Path) -> dict[str, Any]:
        directory = store.materialize(dataset)
        samples, info = read_samples(directory), read_info(directory)
        results = check_samples(samples, info, config, out_dir / DOCS_DIR)
        summary = summarize(samples, info, results, out_dir / DOCS_DIR)
        write_json(out_dir / "results.json", results)
        write_json(out_dir / "summary.json", summary)
        failed = [entry for entry in results if not entry["success"]]
        if failed:
            # Not published (nothing downstream may use this data), but kept for the person fixing it.
            kept = store.scratch_dir(STAGE.name, key)
            shutil.rmtree(kept)
            shutil.copytree(out_dir, kept)
            report_path = kept / DOCS_DIR / "index.html"
            raise ValidationFailed(
                describe_failures(failed, len(results), info, dataset)
                + f"\nFull results: {kept / 'results.json'}; Data Docs: {report_path.as_uri()}"
            )
        return {
            "expectations_evaluated": summary["expectations_evaluated"],
            "expectations_failed": 0,
            **{f"{split}_samples": count for split, count in summary["counts"].items()},
            "smallest_class_size": summary["smallest_class_size"],
        }

    return STAGE.produce(store, config, {"dataset": dataset}, build)


# ----------------------------------------------------------------------------------------------------------------
# The Prefect task
# ----------------------------------------------------------------------------------------------------------------
@stage_task(STAGE)
def validate_task(config: ValidateConfig, dataset: ArtifactRef, store: StoreConfig) -> ArtifactRef:
    """Validate the dataset with Great Expectations; fails the run with ValidationFailed on any failed check."""
    artifact_store = ArtifactStore(store.root)
    ref = validate(config, dataset, artifact_store)
    directory = artifact_store.materialize(ref)
    summary, results = read_json(directory / "summary.json"), read_json(directory / "results.json")
    report(ref, store, "Data validation", _report_lines(summary, artifact_store, ref))
    report_table("kiln-validate-results", [_table_row(entry) for entry in results], "Data checks per split")
    return ref


def _report_lines(summary: dict[str, Any], store: ArtifactStore, ref: ArtifactRef) -> list[str]:
    passed = summary["expectations_evaluated"] - summary["expectations_failed"]
    index = _docs_link(store, ref, summary["data_docs"]["index"])
    lines = [f"- checks: {passed} passed, {summary['expectations_failed']} failed"]
    lines += [
        f"- {split}: {summary['counts'][split]} samples, at least {summary['smallest_class_size'][split]} per class"
        for split in SPLITS
    ]
    lines.append(f"- Data Docs: [{index}]({index})")
    lines += [  # direct links: the index page lists them with CDN JavaScript, which needs a network
        f"  - {run}: [{page}]({_docs_link(store, ref, page)})"
        for run in ("all", *SPLITS)
        if (page := summary["data_docs"]["pages"].get(run))
    ]
    return lines


def _table_row(entry: dict[str, Any]) -> dict[str, Any]:
    if entry["observed_value"] is not None:
        observed = str(entry["observed_value"])
    elif entry["missing_values"]:
        observed = f"missing {entry['missing_values']}"
    else:
        observed = f"{entry['unexpected_count'] or 0} unexpected"
    return {
        "split": entry["split"],
        "check": entry["expectation"],
        "column": entry["column"] or "",
        "success": entry["success"],
        "observed": observed,
    }


def _docs_link(store: ArtifactStore, ref: ArtifactRef, relative: str) -> str:
    # A local store gets a file:// URI a browser opens directly; a remote one keeps its fsspec URL.
    location = f"{ref.uri}/{relative}"
    return Path(location).as_uri() if store.is_local else location
