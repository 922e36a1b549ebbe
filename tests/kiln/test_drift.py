"""Data comparison for retraining: new samples, label mix (Jensen-Shannon) and brightness/contrast (KS)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kiln.config import RetrainPolicy
from kiln.drift import ChannelStats, compare_datasets, decide_retrain, drift_findings

CLASSES = ["cat", "dog"]


def samples(labels: list[int], means: np.ndarray, stds: np.ndarray, hashes: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"split": "train", "label": labels, "mean": means, "std": stds, "content_hash": hashes})


def reference(count: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return samples([index % 2 for index in range(count)], rng.normal(120, 20, count), rng.normal(50, 5, count),
                   [f"h{index}" for index in range(count)])  # fmt: skip


def test_identical_tables_show_no_drift_and_no_reason_to_retrain():
    table = reference()
    comparison = compare_datasets(table, CLASSES, table, CLASSES)
    assert (comparison.new_samples, comparison.removed_samples, comparison.classes_changed) == (0, 0, False)
    assert comparison.label_js_distance == pytest.approx(0) and comparison.brightness_ks == 0
    decision = decide_retrain(comparison, RetrainPolicy())
    assert not decision.retrain and "within its threshold" in decision.summary


def test_new_images_are_counted_by_content_hash_and_trigger_a_retrain():
    old = reference()
    new = pd.concat([old, samples([0, 1, 0], np.full(3, 120.0), np.full(3, 50.0), ["n1", "n2", "n3"])])
    decision = decide_retrain(compare_datasets(old, CLASSES, new, CLASSES), RetrainPolicy(min_new_samples=3))
    assert decision.retrain and decision.comparison.new_samples == 3
    assert "3 new training images (threshold 3)" in decision.summary
    assert not decide_retrain(compare_datasets(old, CLASSES, new, CLASSES), RetrainPolicy(min_new_samples=4)).retrain


def test_a_shift_in_the_label_mix_is_measured_by_jensen_shannon_distance():
    old = reference()
    skewed = old.copy()
    skewed.loc[skewed.index[:150], "label"] = 0  # 75 % cats instead of 50 %
    comparison = compare_datasets(old, CLASSES, skewed, CLASSES)
    assert 0.1 < comparison.label_js_distance < 0.3
    decision = decide_retrain(comparison, RetrainPolicy(min_new_samples=10_000))
    assert decision.retrain and "label distribution drifted: Jensen-Shannon distance" in decision.summary


def test_a_brightness_shift_is_caught_by_the_ks_statistic_and_a_small_one_is_not():
    old = reference(seed=0)
    darker = old.assign(mean=old["mean"] - 30, content_hash=[f"d{index}" for index in range(len(old))])
    policy = RetrainPolicy(min_new_samples=10_000)
    comparison = compare_datasets(old, CLASSES, darker, CLASSES)
    assert comparison.brightness_ks > 0.4 and comparison.brightness_p < 1e-6
    assert decide_retrain(comparison, policy).reasons == [f"brightness drifted: KS statistic {comparison.brightness_ks:.3f} > 0.1"]
    same_distribution = reference(seed=1).assign(content_hash=[f"s{index}" for index in range(400)])
    assert not decide_retrain(compare_datasets(old, CLASSES, same_distribution, CLASSES), policy).retrain


def test_renamed_classes_are_a_reason_to_retrain():
    old = reference()
    comparison = compare_datasets(old, CLASSES, old, ["cat", "fox"])
    assert comparison.classes_changed and comparison.label_js_distance > 0.5
    assert "the class list changed" in decide_retrain(comparison, RetrainPolicy()).reasons


def test_a_colour_cast_in_one_channel_is_caught_per_channel_where_the_image_mean_hides_it():
    rng = np.random.default_rng(0)
    images = rng.integers(40, 200, size=(300, 4, 4, 3), dtype=np.uint8)
    cast = images.copy()
    cast[..., 0] = np.clip(cast[..., 0].astype(int) + 40, 0, 255).astype(np.uint8)  # redder
    cast[..., 2] = np.clip(cast[..., 2].astype(int) - 40, 0, 255).astype(np.uint8)  # and less blue: same mean
    old = reference(300)
    new = old.assign(content_hash=[f"c{index}" for index in range(300)])
    whole_image_only = compare_datasets(old, CLASSES, new, CLASSES)
    per_channel = compare_datasets(old, CLASSES, new, CLASSES, ChannelStats.of(images), ChannelStats.of(cast))
    assert whole_image_only.brightness_ks == 0
    assert per_channel.channel_brightness_ks[0] > 0.5 and per_channel.channel_brightness_ks[2] > 0.5
    assert per_channel.channel_brightness_ks[1] == 0 and per_channel.brightness_ks > 0.5
    assert drift_findings(per_channel, RetrainPolicy())[0].startswith("brightness drifted: KS statistic")
