"""Stage validate: Great Expectations checks on the dataset's samples.csv before anything trains on it.

    from kiln.config import ValidateConfig
    validate(ValidateConfig(), dataset_ref, ArtifactStore("artifacts"))  # -> ref of artifacts/validate/<key>/

The checks themselves (Great Expectations suites, results, Data Docs) are in kiln/data_checks.py. Output files:

    results.json   one entry per expectation per split (split "all" for table-level ones), GX's and kiln's
    summary.json   success, counts, per-class counts, quarantined files, leakage, drift, where the Data Docs are
    quarantine.csv files in class folders that could not be decoded (source, reason): left out of the dataset by
                   the download stage, listed here; with validate.on_bad_sample=fail any of them fails the stage
    drift.json     when a reference dataset is given (production's): the comparison (kiln/drift.py) and findings
    data_docs/     GX Data Docs (index.html, one page per split); static HTML, styled by CDN assets when online

The reference is the dataset the registry's production model was trained on (`find_reference_data`); it is an
input of the stage, so a new production model means a new validation, and the same one means a reuse.

Any failed check raises ValidationFailed listing every failure with a fix, and nothing is published: the results
and Data Docs of a failed run are kept in the store's scratch area (.scratch/validate/<key>/), named in the error.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from kiln.config import PackageConfig, StoreConfig, ValidateConfig
from kiln.data_checks import DOCS_DIR, check_samples, describe_failures, summarize
from kiln.dataset import SPLITS, UNREADABLE, read_info, read_samples, read_skipped
from kiln.drift import compare_dataset_dirs, comparison_rows, drift_findings
from kiln.errors import ValidationFailed
from kiln.registry import production_version, trained_on
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json, write_json
from tasks._task import report, report_table, stage_task

STAGE = Stage("validate", __name__)
LOGGER = logging.getLogger("kiln")


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------
def validate(
    config: ValidateConfig, dataset: ArtifactRef, store: ArtifactStore, reference: ArtifactRef | None = None
) -> ArtifactRef:
    """Check `dataset`'s samples.csv against dataset.json (and its drift from `reference`, a download output, when
    given); returns the ref of the validate output.

    Raises ValidationFailed (and publishes nothing) when any expectation or kiln check fails.
    """
    inputs = {"dataset": dataset, **({"reference": reference} if reference is not None else {})}
    key = STAGE.key(config, inputs)

    def build(out_dir: Path) -> dict[str, Any]:
        directory = store.materialize(dataset)
        samples, info, skipped = read_samples(directory), read_info(directory), read_skipped(directory)
        drift = compare_dataset_dirs(store.materialize(reference), directory) if reference is not None else None
        results = check_samples(samples, info, config, out_dir / DOCS_DIR, skipped, drift)
        summary = summarize(samples, info, results, out_dir / DOCS_DIR)
        quarantined = skipped[skipped["kind"] == UNREADABLE][["source", "reason"]]
        quarantined.to_csv(out_dir / "quarantine.csv", index=False)
        summary["quarantined_files"] = len(quarantined)
        summary["leaked_test_samples"] = _unexpected(results, "kiln_no_train_test_leakage")
        if drift is not None:
            findings = drift_findings(drift, config)
            write_json(out_dir / "drift.json", {"reference": reference.model_dump(mode="json"),
                                                "comparison": drift.as_dict(), "findings": findings})  # fmt: skip
            summary["drift"] = {"reference": reference.uri, "findings": findings, "rows": comparison_rows(drift)}
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
            "quarantined_files": summary["quarantined_files"],
            "leaked_test_samples": summary["leaked_test_samples"],
            "drift_findings": len(summary.get("drift", {}).get("findings", [])),
        }

    return STAGE.produce(store, config, inputs, build)


def find_reference_data(store: ArtifactStore, package: PackageConfig, dataset: ArtifactRef) -> ArtifactRef | None:
    """The dataset `package.model_name`'s production version was trained on, if the registry is on, has one, the
    store still holds its data, and it is not `dataset` itself (which cannot drift from itself: validating it
    without a reference keeps the validate output of the run that trained production)."""
    if not package.registry:
        return None
    production = production_version(store, package.model_name)
    reference = trained_on(store, production) if production is not None else None
    return reference if reference is not None and reference.digest != dataset.digest else None


def _unexpected(results: list[dict[str, Any]], expectation: str) -> int:
    return sum(entry["unexpected_count"] or 0 for entry in results if entry["expectation"] == expectation)


# ----------------------------------------------------------------------------------------------------------------
# The Prefect task
# ----------------------------------------------------------------------------------------------------------------
@task(name="find-reference-data", cache_policy=NO_CACHE, persist_result=False)
def find_reference_data_task(package: PackageConfig, dataset: ArtifactRef, store: StoreConfig) -> ArtifactRef | None:
    """Production's training data, to measure drift against (not cached: it follows the registry)."""
    return find_reference_data(ArtifactStore(store.root, store.on_corrupt), package, dataset)


@stage_task(STAGE)
def validate_task(
    config: ValidateConfig, dataset: ArtifactRef, store: StoreConfig, reference: ArtifactRef | None = None
) -> ArtifactRef:
    """Validate the dataset with Great Expectations; fails the run with ValidationFailed on any failed check."""
    artifact_store = ArtifactStore(store.root, store.on_corrupt)
    ref = validate(config, dataset, artifact_store, reference)
    directory = artifact_store.materialize(ref)
    summary, results = read_json(directory / "summary.json"), read_json(directory / "results.json")
    for finding in summary.get("drift", {}).get("findings", []):
        LOGGER.warning(f"validate: {finding} against production's data (validate.on_drift={config.on_drift})")
    if summary["quarantined_files"]:
        LOGGER.warning(f"validate: {summary['quarantined_files']} unreadable files were left out; see {ref.uri}/quarantine.csv")
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
    lines.append(f"- unreadable files quarantined (left out, listed in quarantine.csv): {summary['quarantined_files']}")
    lines.append(f"- test images also in train (leakage): {summary['leaked_test_samples']}")
    drift = summary.get("drift")
    if drift is None:
        lines.append("- drift: not measured (no production model, or this is the data it was trained on)")
    else:
        verdict = "; ".join(drift["findings"]) or "within every limit"
        lines += [f"- drift against production's data (`{drift['reference']}`): **{verdict}**", "",
                  "  | measure | value |", "  |---|---|"]  # fmt: skip
        lines += [f"  | {measure} | {value} |" for measure, value in drift["rows"]]
        lines.append("")
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
