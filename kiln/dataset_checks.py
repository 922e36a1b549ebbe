"""kiln's own data checks, for what Great Expectations 1.x has no expectation for (or none that scales).

Each returns result entries in the same shape as the GX ones in kiln/data_checks.py (split, expectation, column,
kwargs, success, observed_value, unexpected_count, examples, ...), so that results.json, the failure message and the
Prefect table treat both alike:

- kiln_min_samples_per_class   every class has enough samples in each split
- kiln_class_balance           the largest training class holds at most max_class_ratio times the smallest
- kiln_no_train_test_leakage   test images whose exact pixels are also in train (by content hash), with examples
- kiln_no_unreadable_files     files in class folders that did not decode (download's skipped.csv): quarantined
                               (left out, listed) or a failure, by validate.on_bad_sample
- kiln_drift_vs_reference      label mix and per-channel brightness/contrast against production's data
                               (kiln/drift.py); reported, and a failure only when validate.on_drift is "fail"

Exact duplicates inside a split are a GX expectation (expect_column_values_to_be_unique on content_hash).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from kiln.config import ValidateConfig
from kiln.dataset import SPLITS, UNREADABLE, DatasetInfo
from kiln.drift import DataComparison, drift_findings

EXAMPLES_PER_CHECK = 5  # unexpected values (with their sample's source) kept per failed check


def kiln_checks(
    samples: pd.DataFrame,
    info: DatasetInfo,
    config: ValidateConfig,
    skipped: pd.DataFrame,
    drift: DataComparison | None = None,
) -> list[dict[str, Any]]:
    """Every kiln check on one dataset; `drift` is its comparison with the reference data, when there is one."""
    if not {"split", "label", "content_hash", "source"} <= set(samples.columns):
        return []  # the schema expectation already failed; these checks need those columns
    entries = class_count_checks(samples, info, config)
    entries.append(class_balance_check(samples, info, config))
    entries.append(leakage_check(samples, config))
    entries.append(unreadable_files_check(skipped, config))
    if drift is not None:
        entries.append(drift_check(drift, config))
    return entries


def class_count_checks(samples: pd.DataFrame, info: DatasetInfo, config: ValidateConfig) -> list[dict[str, Any]]:
    """One per split: every class has at least `min_samples_per_class` samples."""
    entries = []
    for split, per_class in samples_per_class(samples, info).items():
        too_few = {name: count for name, count in per_class.items() if count < config.min_samples_per_class}
        entries.append(
            _entry(
                split, "kiln_min_samples_per_class", "label", {"min_value": config.min_samples_per_class},
                success=not too_few, observed=min(per_class.values(), default=0), unexpected=len(too_few),
                examples=[{"class": name, "count": count} for name, count in too_few.items()],
            )
        )  # fmt: skip
    return entries


def class_balance_check(samples: pd.DataFrame, info: DatasetInfo, config: ValidateConfig) -> dict[str, Any]:
    per_class = samples_per_class(samples, info)["train"]
    largest, smallest = max(per_class.values(), default=0), min(per_class.values(), default=0)
    ratio = largest / smallest if smallest else float("inf")
    ranked = sorted(per_class.items(), key=lambda item: item[1])
    return _entry(
        "train", "kiln_class_balance", "label", {"max_value": config.max_class_ratio},
        success=ratio <= config.max_class_ratio, observed=round(ratio, 3) if smallest else None,
        unexpected=0 if ratio <= config.max_class_ratio else 1,
        examples=[{"class": name, "count": count} for name, count in ranked[:2] + ranked[-1:]],
    )  # fmt: skip


def leakage_check(samples: pd.DataFrame, config: ValidateConfig) -> dict[str, Any]:
    """Test images whose decoded pixels equal a training image's: the test score would reward memorising them."""
    train, test = samples[samples["split"] == "train"], samples[samples["split"] == "test"]
    train_source = dict(zip(train["content_hash"], train["source"]))
    leaked = test[test["content_hash"].isin(train_source)]
    fraction = len(leaked) / len(test) if len(test) else 0.0
    return _entry(
        "test", "kiln_no_train_test_leakage", "content_hash", {"max_value": config.max_leaked_fraction},
        success=fraction <= config.max_leaked_fraction, observed=round(fraction, 6), unexpected=len(leaked),
        examples=[{"test": test_source, "train": train_source[digest]}
                  for test_source, digest in zip(leaked["source"], leaked["content_hash"])],
    )  # fmt: skip


def unreadable_files_check(skipped: pd.DataFrame, config: ValidateConfig) -> dict[str, Any]:
    unreadable = skipped[skipped["kind"] == UNREADABLE] if "kind" in skipped else skipped.iloc[0:0]
    return _entry(
        "all", "kiln_no_unreadable_files", "source", {"on_bad_sample": config.on_bad_sample},
        success=unreadable.empty or config.on_bad_sample == "quarantine", observed=len(unreadable),
        unexpected=len(unreadable),
        examples=[{"source": source, "reason": reason} for source, reason in zip(unreadable["source"], unreadable["reason"])],
    )  # fmt: skip


def drift_check(drift: DataComparison, config: ValidateConfig) -> dict[str, Any]:
    findings = drift_findings(drift, config)
    limits = {key: getattr(config, key) for key in ("max_label_js_distance", "max_brightness_ks", "max_contrast_ks")}
    return _entry(
        "train", "kiln_drift_vs_reference", None, {**limits, "on_drift": config.on_drift},
        success=not findings or config.on_drift == "warn", observed="; ".join(findings) or "within every limit",
        unexpected=len(findings), examples=findings,
    )  # fmt: skip


def samples_per_class(samples: pd.DataFrame, info: DatasetInfo) -> dict[str, dict[str, int]]:
    """split -> class name -> number of samples (0 for absent classes)."""
    counts = samples.groupby(["split", "label"]).size()
    return {
        split: {name: int(counts.get((split, index), 0)) for index, name in enumerate(info.classes)}
        for split in SPLITS
    }


def _entry(
    split: str, expectation: str, column: str | None, kwargs: dict[str, Any], *, success: bool, observed: Any,
    unexpected: int, examples: list[Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "split": split,
        "checker": "kiln",
        "expectation": expectation,
        "column": column,
        "kwargs": kwargs,
        "success": bool(success),
        "observed_value": observed,
        "unexpected_count": int(unexpected),
        "unexpected_percent": None,
        "examples": examples[:EXAMPLES_PER_CHECK],
        "missing_values": [],
        "error": None,
    }
