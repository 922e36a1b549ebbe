"""The retrain flow's change detection against the registry's production model."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from kiln.config import PackageConfig, RetrainPolicy
from kiln.dataset import publish_dataset
from kiln.store import ArtifactStore
from tasks.detect_change import decision_markdown, detect_change
from tasks.register import register
from tests.conftest import make_blobs_dataset
from tests.kiln.test_registry import TinyBundles, tiny_bundles

PACKAGE = PackageConfig()


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> TinyBundles:
    return tiny_bundles(tmp_path_factory)


@pytest.fixture
def store(bundles, tmp_path) -> ArtifactStore:
    return ArtifactStore(shutil.copytree(bundles.store.root, tmp_path / "store"))


def promote_good(store: ArtifactStore, bundles: TinyBundles):
    good = bundles.good
    mine = [store.lookup(ref.stage, ref.key) for ref in (good.dataset, good.package, good.evaluation)]
    register(PACKAGE, *mine, store)
    return mine[0]


def test_without_production_the_decision_is_to_train(store, bundles):
    decision = detect_change(RetrainPolicy(), PACKAGE, store.lookup("download", bundles.good.dataset.key), store)
    assert decision.retrain and "no production version yet" in decision.summary


def test_the_data_production_was_trained_on_is_no_change(store, bundles):
    dataset = promote_good(store, bundles)
    decision = detect_change(RetrainPolicy(), PACKAGE, dataset, store)
    assert not decision.retrain and decision.summary.startswith("no change")


def test_more_and_darker_images_are_measured_and_trigger_a_retrain(store, bundles):
    promote_good(store, bundles)
    grown = make_blobs_dataset(per_class_train=40, seed=7)
    grown = replace(grown, train_images=grown.train_images // 2)  # darker
    decision = detect_change(RetrainPolicy(), PACKAGE, publish_dataset(store, grown), store)
    assert decision.retrain
    comparison = decision.comparison
    assert comparison.train_samples == 120 and comparison.new_samples == 120 and not comparison.classes_changed
    assert comparison.brightness_ks > 0.5
    text = decision_markdown(decision, store.lookup("download", bundles.good.dataset.key))
    assert "| new / removed training images | 120 / 72 |" in text and "brightness (largest KS statistic" in text
    assert "| brightness KS per channel | 1.0000, 1.0000, 1.0000 |" in text


def test_with_the_registry_off_there_is_nothing_to_compare(store, bundles):
    dataset = promote_good(store, bundles)
    off = PackageConfig(registry=False)
    assert detect_change(RetrainPolicy(), off, dataset, store).retrain


def test_validate_measures_drift_against_the_data_production_was_trained_on(store, bundles):
    from tasks.validate import find_reference_data

    current = publish_dataset(store, make_blobs_dataset(per_class_train=30, seed=3))
    assert find_reference_data(store, PACKAGE, current) is None  # nothing in production yet
    dataset = promote_good(store, bundles)
    assert find_reference_data(store, PACKAGE, current) == dataset
    assert find_reference_data(store, PACKAGE, dataset) is None  # production's own data: nothing to drift from
    assert find_reference_data(store, PackageConfig(registry=False), current) is None
    assert find_reference_data(store, PackageConfig(model_name="another-model"), current) is None
