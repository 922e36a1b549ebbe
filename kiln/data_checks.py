"""Data checks on the sample table with Great Expectations 1.x, and their results in plain, readable form.

One table-level suite runs on the whole table (schema, no nulls, split values) and one per-split suite on each of
train and test (labels, image shape, pixel statistics, every class present, exact duplicates); kiln/dataset_checks.py
adds the checks GX 1.x has no expectation for (per-class counts, balance, train/test leakage, unreadable files,
drift against production's data). GX runs in an ephemeral, in-memory context: it writes nothing outside
the Data Docs folder it is given and sends nothing over the network. It is imported lazily (it takes seconds).
No Prefect here: tasks/validate.py wires this into the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kiln.config import ValidateConfig
from kiln.dataset import SAMPLE_COLUMNS, SPLITS, DatasetInfo
from kiln.dataset_checks import EXAMPLES_PER_CHECK, kiln_checks, samples_per_class
from kiln.drift import DataComparison
from kiln.store import ArtifactRef

DOCS_DIR = "data_docs"  # where a validate output keeps its Data Docs
_TABLE_SUITE, _SPLIT_SUITE = "samples_table", "samples_per_split"


def check_samples(
    samples: pd.DataFrame,
    info: DatasetInfo,
    config: ValidateConfig,
    docs_dir: Path,
    skipped: pd.DataFrame,
    drift: DataComparison | None = None,
) -> list[dict[str, Any]]:
    """Run every check on the sample table (and on `skipped`, the files download left out, and `drift`, the
    comparison with the reference data) and build GX Data Docs in `docs_dir`; returns one entry per check."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    context = gx.get_context(
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),  # suites and results live in memory only
            data_docs_sites={
                "kiln": {
                    "class_name": "SiteBuilder",
                    "show_how_to_buttons": False,
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                }
            },
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        ),
        mode="ephemeral",
    )
    batch = context.data_sources.add_pandas("samples").add_dataframe_asset("samples_csv")
    whole_frame = batch.add_batch_definition_whole_dataframe("whole_frame")
    per_split = {split: samples[samples["split"] == split] for split in SPLITS} if "split" in samples else {}
    runs = [
        (_TABLE_SUITE, table_expectations(), {"all": samples}),
        (_SPLIT_SUITE, split_expectations(info, config), per_split),
    ]
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": EXAMPLES_PER_CHECK,
        "unexpected_index_column_names": ["source"] if "source" in samples else [],
    }
    results: list[dict[str, Any]] = []
    for suite_name, expectations, frames in runs:
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=whole_frame, suite=suite)
        )
        for split, frame in frames.items():
            outcome = definition.run(
                batch_parameters={"dataframe": frame}, result_format=result_format, run_id=RunIdentifier(run_name=split)
            )
            results += [_gx_entry(split, result) for result in outcome.results]
    context.build_data_docs()
    _prune_unreferenced_assets(docs_dir)
    return results + kiln_checks(samples, info, config, skipped, drift)


# ----------------------------------------------------------------------------------------------------------------
# What is expected
# ----------------------------------------------------------------------------------------------------------------
def table_expectations() -> list:
    """Checks on the whole table: the canonical columns in order, and only train/test rows."""
    import great_expectations as gx

    return [
        gx.expectations.ExpectTableColumnsToMatchOrderedList(column_list=list(SAMPLE_COLUMNS)),
        *[gx.expectations.ExpectColumnValuesToNotBeNull(column=column) for column in SAMPLE_COLUMNS],
        gx.expectations.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
    ]


def split_expectations(info: DatasetInfo, config: ValidateConfig) -> list:
    """Checks run on each split: labels index the classes, all of which appear; one image shape; sane pixels."""
    import great_expectations as gx

    expect = gx.expectations
    class_indices = list(range(info.num_classes))
    height, width, channels = info.image_shape
    return [
        expect.ExpectColumnValuesToBeInSet(column="label", value_set=class_indices),
        # "contain" (not "equal"): extra labels are already caught above, and GX 1.24 cannot render a failed
        # expect_column_distinct_values_to_equal_set in Data Docs.
        expect.ExpectColumnDistinctValuesToContainSet(column="label", value_set=class_indices),
        expect.ExpectColumnValuesToBeInSet(column="height", value_set=[height]),
        expect.ExpectColumnValuesToBeInSet(column="width", value_set=[width]),
        expect.ExpectColumnValuesToBeInSet(column="channels", value_set=[channels]),
        expect.ExpectColumnValuesToBeBetween(column="mean", min_value=0, max_value=255),
        # uint8 pixels are always within 0..255; data that never gets bright was stored on another scale
        expect.ExpectColumnMaxToBeBetween(column="max", min_value=config.min_peak_pixel, max_value=255),
        expect.ExpectColumnValuesToBeBetween(
            column="std", min_value=config.min_pixel_std, max_value=255, mostly=config.mostly
        ),
        # An image and its exact copy both count as not unique, so this bounds the share of images that have a copy.
        expect.ExpectColumnValuesToBeUnique(column="content_hash", mostly=1 - config.max_duplicate_fraction),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Reading results back
# ----------------------------------------------------------------------------------------------------------------
def _gx_entry(split: str, validation_result: Any) -> dict[str, Any]:
    from great_expectations.util import convert_to_json_serializable

    raw = validation_result.to_json_dict()
    kwargs = {key: value for key, value in raw["expectation_config"]["kwargs"].items() if key != "batch_id"}
    result = raw.get("result") or {}
    entry = {
        "split": split,
        "checker": "great_expectations",
        "expectation": raw["expectation_config"]["type"],
        "column": kwargs.pop("column", None),
        "kwargs": kwargs,
        "success": bool(raw["success"]),
        "observed_value": result.get("observed_value"),
        "unexpected_count": result.get("unexpected_count"),
        "unexpected_percent": result.get("unexpected_percent"),
        "examples": result.get("partial_unexpected_index_list") or result.get("partial_unexpected_list") or [],
        "missing_values": result.get("partial_missing_list") or [],
        "error": _exception_message(raw.get("exception_info") or {}),
    }
    return json.loads(json.dumps(convert_to_json_serializable(entry)))  # numpy scalars -> plain Python


def _exception_message(info: dict[str, Any]) -> str | None:
    # GX reports an expectation's own error flat, and errors computing its metrics keyed by metric id.
    if "raised_exception" in info:
        return info["exception_message"] if info["raised_exception"] else None
    messages = {detail.get("exception_message") for detail in info.values() if isinstance(detail, dict)}
    return "; ".join(sorted(message for message in messages if message)) or None


def describe_failures(failed: list[dict[str, Any]], evaluated: int, info: DatasetInfo, dataset: ArtifactRef) -> str:
    """A message naming each failed check (split, expectation, column, what was seen) and how to fix it."""
    lines = [f"{len(failed)} of {evaluated} data checks failed on {dataset} (nothing was published):"]
    for entry in failed:
        lines.append(f"  - {entry['split']}: {entry['expectation']}({entry['column'] or ''}): {_observed(entry, info)}")
        lines.append(f"    fix: {_hint(entry)}")
    return "\n".join(lines)


def _observed(entry: dict[str, Any], info: DatasetInfo) -> str:
    if entry["error"]:
        return f"could not be evaluated: {entry['error']}"
    if entry["expectation"] in _KILN_OBSERVED:
        return _KILN_OBSERVED[entry["expectation"]](entry)
    if entry["missing_values"]:
        is_label = entry["column"] == "label"
        named = [_class_name(value, info) if is_label else repr(value) for value in entry["missing_values"]]
        return f"missing values: {', '.join(named)}"
    if entry["unexpected_count"]:
        percent = f" ({entry['unexpected_percent']:.2f}% of rows)" if entry["unexpected_percent"] is not None else ""
        return f"{entry['unexpected_count']} unexpected rows{percent}{_kwargs_text(entry)}; e.g. {entry['examples']}"
    return f"observed {entry['observed_value']!r}{_kwargs_text(entry)}"


def _counts(entry: dict[str, Any]) -> str:
    return ", ".join(f"{item['class']}: {item['count']}" for item in entry["examples"])


_KILN_OBSERVED = {
    "kiln_min_samples_per_class": lambda e: f"classes with fewer than {e['kwargs']['min_value']} samples: {_counts(e)}",
    "kiln_class_balance": lambda e: (
        f"the largest class has {e['observed_value']}x the samples of the smallest (limit {e['kwargs']['max_value']}); "
        f"smallest and largest: {_counts(e)}"
    ),
    "kiln_no_train_test_leakage": lambda e: (
        f"{e['unexpected_count']} test images ({e['observed_value']:.2%}) are exact copies of training images "
        f"(limit {e['kwargs']['max_value']:.2%}); e.g. "
        + ", ".join(f"{item['test']} = {item['train']}" for item in e["examples"])
    ),
    "kiln_no_unreadable_files": lambda e: (
        f"{e['unexpected_count']} files in class folders could not be decoded; e.g. "
        + "; ".join(f"{item['source']}: {item['reason']}" for item in e["examples"])
    ),
    "kiln_drift_vs_reference": lambda e: f"against production's data: {e['observed_value']}",
}


def _class_name(index: Any, info: DatasetInfo) -> str:
    in_range = isinstance(index, int) and 0 <= index < info.num_classes
    return f"{index} ({info.classes[index]})" if in_range else repr(index)


def _kwargs_text(entry: dict[str, Any]) -> str:
    shown = [key for key in ("column_list", "value_set", "min_value", "max_value", "mostly") if key in entry["kwargs"]]
    return "; expected " + ", ".join(f"{key}={entry['kwargs'][key]}" for key in shown) if shown else ""


_FIXES = {
    "split": "samples.csv may only hold train and test rows; re-run the download stage",
    "label": "labels must index dataset.json's classes; check the source's class folders or the loader's mapping",
    "content_hash": "samples.csv is incomplete; re-run the download stage",
    "height": "all images must have one shape; set data.image_size to resize imagefolder images",
    "mean": "pixel means outside 0..255 mean samples.csv is corrupt; re-run the download stage",
    "std": "remove blank (constant) images from the source, or lower validate.min_pixel_std or validate.mostly",
}
_FIXES |= {"width": _FIXES["height"], "channels": _FIXES["height"]}
_CLASS_PRESENCE_FIX = (
    "every class needs samples in both splits; add images of those classes, or raise data.test_fraction "
    "or data.max_*_samples"
)


_KILN_FIXES = {
    "kiln_min_samples_per_class": f"{_CLASS_PRESENCE_FIX}, or lower validate.min_samples_per_class",
    "kiln_class_balance": "add images of the small classes, drop some of the large ones, or raise validate.max_class_ratio",
    "kiln_no_train_test_leakage": (
        "remove those images from the test split (or from train) so the test score measures unseen data, or raise "
        "validate.max_leaked_fraction"
    ),
    "kiln_no_unreadable_files": (
        "replace or delete the listed files, or set validate.on_bad_sample=quarantine to train without them"
    ),
    "kiln_drift_vs_reference": (
        "check the new data against production's (the validate report has the measures); if the change is expected, "
        "set validate.on_drift=warn or raise the validate.max_* drift limits"
    ),
}


def _hint(entry: dict[str, Any]) -> str:
    if entry["expectation"] == "expect_column_distinct_values_to_contain_set":
        return _CLASS_PRESENCE_FIX
    if entry["expectation"] in _KILN_FIXES:
        return _KILN_FIXES[entry["expectation"]]
    if entry["expectation"] == "expect_column_values_to_be_unique":
        return (
            "remove the duplicated images from the source (the examples name some), or raise "
            "validate.max_duplicate_fraction"
        )
    if entry["column"] is None or entry["error"]:  # table-level, or a column missing or of the wrong type
        return "samples.csv is not in kiln's canonical format; re-run the download stage with this kiln version"
    return _FIXES.get(entry["column"], "fix the source data and re-run the download stage")


def summarize(samples: pd.DataFrame, info: DatasetInfo, results: list[dict[str, Any]], docs_dir: Path) -> dict[str, Any]:
    per_class = samples_per_class(samples, info)
    return {
        "success": all(entry["success"] for entry in results),
        "expectations_evaluated": len(results),
        "expectations_failed": sum(not entry["success"] for entry in results),
        "counts": {split: int(samples["split"].eq(split).sum()) for split in SPLITS},
        "samples_per_class": per_class,
        "smallest_class_size": {split: min(counts.values()) for split, counts in per_class.items()},
        "data_docs": {
            "index": f"{DOCS_DIR}/index.html",
            "pages": {split: _page_of(docs_dir, split) for split in ("all", *SPLITS)},
        },
    }


def _page_of(docs_dir: Path, run_name: str) -> str | None:
    suite = _TABLE_SUITE if run_name == "all" else _SPLIT_SUITE
    pages = sorted((docs_dir / "validations" / suite / run_name).rglob("*.html"))
    return pages[0].relative_to(docs_dir.parent).as_posix() if pages else None


def _prune_unreferenced_assets(docs_dir: Path) -> None:
    # GX copies ~4 MB of fonts and tutorial GIFs into every site; its pages reference only the favicon.
    pages = "\n".join(page.read_text() for page in docs_dir.rglob("*.html"))
    for asset in sorted((docs_dir / "static").rglob("*"), reverse=True):  # children before their folders
        if asset.is_file() and asset.relative_to(docs_dir).as_posix() not in pages:
            asset.unlink()
        elif asset.is_dir() and not any(asset.iterdir()):
            asset.rmdir()
