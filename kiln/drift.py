"""Has the data changed since the production model was trained? New samples, label mix, brightness and contrast.

Compares two datasets by their samples.csv tables (one row per image: split, label, mean, std, content_hash, ...):

- new / removed training samples: content hashes present in one training split and not in the other;
- label distribution: Jensen-Shannon distance (base 2, 0 = identical, 1 = disjoint) between the training splits'
  class frequencies, matched by class name;
- brightness and contrast: the two-sample Kolmogorov-Smirnov test of per-image pixel mean (brightness) and per-image
  pixel standard deviation (contrast), over all channels and, when the training images are given, per channel
  (`ChannelStats`; a red-only colour cast moves only the red channel). The statistic D (the largest gap between the
  two empirical distributions, 0..1) is the threshold, not the p-value: with tens of thousands of images any tiny
  shift is "significant", and a retrain should follow a shift of a size that matters. The reported D is the largest
  over all channels and the whole image.

`compare_dataset_dirs` compares two download outputs; the validate stage and the retrain flow both use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from kiln.config import DriftLimits, RetrainPolicy
from kiln.dataset import read_info, read_samples, read_split

_STATS_CHUNK = 4096  # images converted to float at a time


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
    channel_brightness_ks: list[float] = field(default_factory=list)  # per channel; empty when not compared
    channel_contrast_ks: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    summary: str
    reasons: list[str] = field(default_factory=list)
    comparison: DataComparison | None = None


@dataclass(frozen=True)
class ChannelStats:
    """Per-image, per-channel pixel mean and standard deviation of a split (0..255 scale): [N, C] each."""

    means: np.ndarray
    stds: np.ndarray

    @classmethod
    def of(cls, images: np.ndarray) -> ChannelStats:
        """From uint8 [N, H, W, C] images, a chunk at a time so a large split never becomes one float copy."""
        means, stds = [], []
        for start in range(0, len(images), _STATS_CHUNK):
            chunk = images[start : start + _STATS_CHUNK].astype(np.float32)
            means.append(chunk.mean(axis=(1, 2)))
            stds.append(chunk.std(axis=(1, 2)))
        channels = images.shape[-1]
        empty = np.zeros((0, channels), dtype=np.float32)
        return cls(np.concatenate(means) if means else empty, np.concatenate(stds) if stds else empty)


def compare_dataset_dirs(reference_dir: Path, current_dir: Path) -> DataComparison:
    """Compare the training splits of two download outputs, per channel included."""
    return compare_datasets(
        read_samples(reference_dir), read_info(reference_dir).classes,
        read_samples(current_dir), read_info(current_dir).classes,
        ChannelStats.of(read_split(reference_dir, "train")[0]), ChannelStats.of(read_split(current_dir, "train")[0]),
    )  # fmt: skip


def compare_datasets(
    reference: pd.DataFrame,
    reference_classes: list[str],
    current: pd.DataFrame,
    current_classes: list[str],
    reference_channels: ChannelStats | None = None,
    current_channels: ChannelStats | None = None,
) -> DataComparison:
    """Compare the training splits of two samples.csv tables (see the module docstring); per channel when both
    ChannelStats are given and have the same number of channels."""
    old, new = reference[reference["split"] == "train"], current[current["split"] == "train"]
    old_hashes, new_hashes = set(old["content_hash"]), set(new["content_hash"])
    brightness, contrast = ks_2samp(old["mean"], new["mean"]), ks_2samp(old["std"], new["std"])
    channel_brightness: list[Any] = []
    channel_contrast: list[Any] = []
    if reference_channels is not None and current_channels is not None:
        if reference_channels.means.shape[1] == current_channels.means.shape[1]:
            channels = range(reference_channels.means.shape[1])
            channel_brightness = [ks_2samp(reference_channels.means[:, c], current_channels.means[:, c]) for c in channels]
            channel_contrast = [ks_2samp(reference_channels.stds[:, c], current_channels.stds[:, c]) for c in channels]
    brightness = max([brightness, *channel_brightness], key=lambda result: result.statistic)
    contrast = max([contrast, *channel_contrast], key=lambda result: result.statistic)
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
        channel_brightness_ks=[round(float(result.statistic), 6) for result in channel_brightness],
        channel_contrast_ks=[round(float(result.statistic), 6) for result in channel_contrast],
    )


def _label_distance(old: pd.DataFrame, old_classes: list[str], new: pd.DataFrame, new_classes: list[str]) -> float:
    names = sorted(set(old_classes) | set(new_classes))

    def frequencies(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
        counts = frame["label"].map(lambda index: classes[int(index)]).value_counts()
        return np.asarray([counts.get(name, 0) for name in names], dtype=np.float64)

    distance = jensenshannon(frequencies(old, old_classes), frequencies(new, new_classes), base=2)
    return float(0.0 if np.isnan(distance) else distance)


def comparison_rows(comparison: DataComparison) -> list[tuple[str, str]]:
    """(measure, value) pairs for a report table."""
    c = comparison
    rows = [
        ("training images (reference → now)", f"{c.reference_train_samples} → {c.train_samples}"),
        ("new / removed training images", f"{c.new_samples} / {c.removed_samples}"),
        ("classes changed", "yes" if c.classes_changed else "no"),
        ("label distribution (Jensen-Shannon distance)", f"{c.label_js_distance:.4f}"),
        ("brightness (largest KS statistic, p)", f"{c.brightness_ks:.4f}, p = {c.brightness_p:.3g}"),
        ("contrast (largest KS statistic, p)", f"{c.contrast_ks:.4f}, p = {c.contrast_p:.3g}"),
    ]
    if c.channel_brightness_ks:
        rows.append(("brightness KS per channel", ", ".join(f"{value:.4f}" for value in c.channel_brightness_ks)))
        rows.append(("contrast KS per channel", ", ".join(f"{value:.4f}" for value in c.channel_contrast_ks)))
    return rows


def drift_findings(comparison: DataComparison, limits: DriftLimits) -> list[str]:
    """One line per drift measure past its limit in `limits` (empty: within every limit)."""
    checks = [
        ("label distribution", "Jensen-Shannon distance", comparison.label_js_distance, limits.max_label_js_distance),
        ("brightness", "KS statistic", comparison.brightness_ks, limits.max_brightness_ks),
        ("contrast", "KS statistic", comparison.contrast_ks, limits.max_contrast_ks),
    ]
    return [f"{what} drifted: {measure} {value:.3f} > {limit}" for what, measure, value, limit in checks if value > limit]


def decide_retrain(comparison: DataComparison, policy: RetrainPolicy) -> RetrainDecision:
    """For data whose content differs from the reference: retrain when the classes changed or any measure passes
    its threshold in `policy`."""
    reasons = []
    if comparison.classes_changed:
        reasons.append("the class list changed")
    if comparison.new_samples >= policy.min_new_samples:
        reasons.append(f"{comparison.new_samples} new training images (threshold {policy.min_new_samples})")
    reasons += drift_findings(comparison, policy)
    if reasons:
        return RetrainDecision(True, "retrain: " + "; ".join(reasons), reasons, comparison)
    return RetrainDecision(
        False,
        f"no retrain: the data changed ({comparison.new_samples} new, {comparison.removed_samples} removed training "
        "images) but every measure is within its threshold",
        comparison=comparison,
    )
