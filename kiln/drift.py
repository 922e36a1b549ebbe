"""Has the data changed since the production model was trained? New samples, label mix, brightness and contrast.

Compares two datasets by their samples.csv tables (one row per image: split, label, mean, std, content_hash, ...):

- new / removed training samples: content hashes present in one training split and not in the other;
- label distribution: Jensen-Shannon distance (base 2, 0 = identical, 1 = disjoint) between the training splits'
  class frequencies, matched by class name;
- brightness and contrast: the two-sample Kolmogorov-Smirnov statistic D (the largest gap between the two empirical
  distributions, 0..1) of per-image pixel mean and per-image pixel standard deviation, with its p-value. D is the
  threshold, not the p-value: with tens of thousands of images any tiny shift is "significant", and a retrain
  should follow a shift of a size that matters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from kiln.config import RetrainPolicy


@dataclass(frozen=True)
class DataComparison:
    classes_changed: bool
    train_samples: int
    reference_train_samples: int
    new_samples: int
    removed_samples: int
    label_js_distance: float
    brightness_ks: float
    brightness_p: float
    contrast_ks: float
    contrast_p: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    summary: str
    reasons: list[str] = field(default_factory=list)
    comparison: DataComparison | None = None


def compare_datasets(
    reference: pd.DataFrame, reference_classes: list[str], current: pd.DataFrame, current_classes: list[str]
) -> DataComparison:
    """Compare the training splits of two samples.csv tables (see the module docstring)."""
    old, new = reference[reference["split"] == "train"], current[current["split"] == "train"]
    old_hashes, new_hashes = set(old["content_hash"]), set(new["content_hash"])
    brightness, contrast = ks_2samp(old["mean"], new["mean"]), ks_2samp(old["std"], new["std"])
    return DataComparison(
        classes_changed=list(reference_classes) != list(current_classes),
        train_samples=len(new),
        reference_train_samples=len(old),
        new_samples=int(sum(1 for value in new["content_hash"] if value not in old_hashes)),
        removed_samples=int(sum(1 for value in old["content_hash"] if value not in new_hashes)),
        label_js_distance=_label_distance(old, reference_classes, new, current_classes),
        brightness_ks=float(brightness.statistic),
        brightness_p=float(brightness.pvalue),
        contrast_ks=float(contrast.statistic),
        contrast_p=float(contrast.pvalue),
    )


def _label_distance(old: pd.DataFrame, old_classes: list[str], new: pd.DataFrame, new_classes: list[str]) -> float:
    names = sorted(set(old_classes) | set(new_classes))

    def frequencies(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
        counts = frame["label"].map(lambda index: classes[int(index)]).value_counts()
        return np.asarray([counts.get(name, 0) for name in names], dtype=np.float64)

    distance = jensenshannon(frequencies(old, old_classes), frequencies(new, new_classes), base=2)
    return float(0.0 if np.isnan(distance) else distance)


def decide_retrain(comparison: DataComparison, policy: RetrainPolicy) -> RetrainDecision:
    """For data whose content differs from the reference: retrain when the classes changed or any measure passes
    its threshold in `policy`."""
    reasons = []
    if comparison.classes_changed:
        reasons.append("the class list changed")
    if comparison.new_samples >= policy.min_new_samples:
        reasons.append(f"{comparison.new_samples} new training images (threshold {policy.min_new_samples})")
    checks = [
        ("label distribution", "Jensen-Shannon distance", comparison.label_js_distance, policy.max_label_js_distance),
        ("brightness", "KS statistic", comparison.brightness_ks, policy.max_brightness_ks),
        ("contrast", "KS statistic", comparison.contrast_ks, policy.max_contrast_ks),
    ]
    reasons += [f"{what} drifted: {measure} {value:.3f} > {limit}" for what, measure, value, limit in checks if value > limit]
    if reasons:
        return RetrainDecision(True, "retrain: " + "; ".join(reasons), reasons, comparison)
    return RetrainDecision(
        False,
        f"no retrain: the data changed ({comparison.new_samples} new, {comparison.removed_samples} removed training "
        "images) but every measure is within its threshold",
        comparison=comparison,
    )
