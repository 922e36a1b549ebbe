"""The retrain flow under Prefect's test harness: no change → no training; new data → the pipeline runs again."""

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.retrain import retrain
from kiln.config import RetrainPolicy, load_config
from kiln.registry import ModelRegistry, registry_root
from kiln.store import ArtifactStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_retrain_trains_first_then_skips_unchanged_data_then_retrains_on_new_samples(harness, tmp_path):
    gate = "evaluate.min_accuracy=0.5"  # a 600-image model must pass it too
    small = load_config("quickstart", overrides=[f"store.root={tmp_path}", "data.max_train_samples=600", gate])
    first = retrain(small)
    assert first["retrain"] and "no production version yet" in first["summary"] and first["bundle"]

    unchanged = retrain(small)
    assert not unchanged["retrain"] and unchanged["summary"].startswith("no change") and "bundle" not in unchanged

    full = load_config("quickstart", overrides=[f"store.root={tmp_path}", gate])
    grown = retrain(full, RetrainPolicy(min_new_samples=100))
    assert grown["retrain"] and grown["comparison"]["new_samples"] > 500
    assert f"{grown['comparison']['new_samples']} new training images" in grown["summary"]
    registry = ModelRegistry(registry_root(ArtifactStore(full.store.root)))
    assert len(registry.versions(full.package.model_name)) == 2
