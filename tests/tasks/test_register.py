"""The register step: real bundles scored against production on the same test set, then production or staging."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.bundle import write_bundle_manifest
from kiln.config import PackageConfig, StoreConfig
from kiln.errors import ConfigError
from kiln.registry import HISTORY_FILE, ModelRegistry
from kiln.store import ArtifactStore
from tasks.register import register, register_task
from tests.kiln.test_registry import Packaged, TinyBundles, tiny_bundles

CONFIG = PackageConfig()
MODEL = CONFIG.model_name


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> TinyBundles:
    return tiny_bundles(tmp_path_factory)


@pytest.fixture
def store(bundles, tmp_path) -> ArtifactStore:
    """A private copy of the shared outputs, so that each test starts with an empty registry of its own."""
    return ArtifactStore(shutil.copytree(bundles.store.root, tmp_path / "store"))


def run(store: ArtifactStore, packaged: Packaged, config: PackageConfig = CONFIG) -> dict:
    mine = [store.lookup(ref.stage, ref.key) for ref in (packaged.dataset, packaged.package, packaged.evaluation)]
    dataset, bundle, evaluation = mine
    return register(config, dataset, bundle, evaluation, store)


def version_of(store: ArtifactStore, packaged: Packaged) -> str:
    return store.manifest(packaged.package).metrics["version"]


def registry_of(store: ArtifactStore) -> ModelRegistry:
    return ModelRegistry(Path(store.root) / "registry")


def test_first_version_becomes_production_with_its_record(store, bundles):
    decision = run(store, bundles.good)
    version = version_of(store, bundles.good)
    assert decision == {
        "model": MODEL, "version": version, "alias": "production", "reason": decision["reason"],
        "challenger_accuracy": 1.0, "champion_version": None, "champion_accuracy": None,
    }  # fmt: skip
    assert decision["reason"].startswith("first version")
    registered = registry_of(store).get(MODEL, "production")
    assert registered.version == version and registered.aliases == ("production",)
    record = registered.registration
    assert record["metrics"]["test_accuracy"] == 1.0 and record["metrics"]["test_samples"] == 24
    assert record["metrics"]["evaluation"]["blessed"] is True and record["blessed"] is True
    assert record["dataset"]["digest"] == bundles.good.dataset.digest
    assert record["source"]["digest"] == bundles.good.package.digest
    assert record["source"]["uri"].startswith(store.url)


def test_a_worse_challenger_goes_to_staging_naming_both_accuracies(store, bundles):
    run(store, bundles.good)
    decision = run(store, bundles.bad)
    worse = decision["challenger_accuracy"]
    assert worse < 1.0 - CONFIG.max_regression
    assert decision["alias"] == "staging" and decision["champion_version"] == version_of(store, bundles.good)
    assert decision["champion_accuracy"] == 1.0
    assert f"test accuracy {worse:.4f} vs production" in decision["reason"] and "1.0000" in decision["reason"]
    assert "regression budget 0.0050" in decision["reason"]
    aliases = registry_of(store).aliases(MODEL)
    assert aliases == {"production": version_of(store, bundles.good), "staging": version_of(store, bundles.bad)}


def test_a_better_challenger_replaces_production_and_can_be_rolled_back(store, bundles):
    assert run(store, bundles.bad)["alias"] == "production"
    decision = run(store, bundles.good)
    assert decision["alias"] == "production" and "within the budget" in decision["reason"]
    registry = registry_of(store)
    assert registry.get(MODEL, "production").version == version_of(store, bundles.good)
    assert registry.rollback(MODEL, reason="test").version == version_of(store, bundles.bad)


def test_a_regression_within_the_budget_is_promoted(store, bundles):
    run(store, bundles.good)
    decision = run(store, bundles.bad, PackageConfig(max_regression=1.0))
    assert decision["alias"] == "production" and "regression budget 1.0000" in decision["reason"]


def test_a_challenger_that_failed_the_gate_goes_to_staging(store, bundles):
    decision = run(store, bundles.unblessed)  # even with no production yet
    assert decision["alias"] == "staging" and "gate failed" in decision["reason"]
    assert registry_of(store).aliases(MODEL) == {"staging": version_of(store, bundles.unblessed)}
    assert registry_of(store).get(MODEL, "staging").registration["blessed"] is False

    run(store, bundles.good)
    assert run(store, bundles.unblessed)["alias"] == "staging"  # already staging: nothing moves
    assert registry_of(store).get(MODEL, "production").version == version_of(store, bundles.good)


def relabelled(bundle_dir: Path, target: Path, classes: list[str]) -> Path:
    """A copy of a bundle whose classes have other names, re-checksummed: a valid bundle of another dataset."""
    shutil.copytree(bundle_dir, target)
    (target / "labels.json").write_text(json.dumps(classes))
    manifest = json.loads((target / "manifest.json").read_text())
    write_bundle_manifest(target, manifest["model_name"], "relabelled", {"classes": classes})
    return target


def test_a_champion_with_other_classes_is_not_comparable(store, bundles, tmp_path):
    other = relabelled(bundles.bundle_dir(bundles.good), tmp_path / "other", ["cat", "dog", "bird"])
    registry_of(store).register(MODEL, "relabelled", other, {})
    registry_of(store).promote(MODEL, "relabelled", "set up by the test")

    decision = run(store, bundles.good)
    assert decision["alias"] == "staging" and decision["champion_version"] == "relabelled"
    assert decision["champion_accuracy"] is None and "cannot be compared" in decision["reason"]
    assert "['cat', 'dog', 'bird'] differ from this dataset's ['class_0', 'class_1', 'class_2']" in decision["reason"]
    assert "kiln registry promote" in decision["reason"]


def test_a_tampered_champion_is_not_comparable_and_the_challenger_waits_in_staging(store, bundles):
    """Documented choice: a registered bundle that no longer verifies does not stop the pipeline; the new version
    goes to staging with the verification error as the reason, for a person to decide."""
    run(store, bundles.bad)
    champion = registry_of(store).get(MODEL, "production")
    labels = champion.path / "labels.json"
    labels.write_text(labels.read_text().replace("class_0", "class_X"))

    decision = run(store, bundles.good)
    assert decision["alias"] == "staging" and decision["champion_version"] == champion.version
    assert "does not load" in decision["reason"] and "labels.json" in decision["reason"]


def test_a_rerun_of_the_same_version_changes_nothing(store, bundles):
    first = run(store, bundles.good)
    again = run(store, bundles.good)
    assert again["alias"] == "production" and "already production" in again["reason"]
    registry = registry_of(store)
    assert [entry.version for entry in registry.versions(MODEL)] == [first["version"]]
    assert len((registry.root / MODEL / HISTORY_FILE).read_text().splitlines()) == 1


def test_registry_off_skips_registration(store, bundles):
    decision = run(store, bundles.good, PackageConfig(registry=False))
    assert decision["alias"] is None and "skipped" in decision["reason"] and "package.registry" in decision["reason"]
    assert not (Path(store.root) / "registry").exists()


def test_a_remote_store_is_refused_with_a_way_out(bundles):
    with pytest.raises(ConfigError, match="local store.root"):
        register(CONFIG, bundles.good.dataset, bundles.good.package, bundles.good.evaluation,
                 ArtifactStore("memory://kiln-register-test"))  # fmt: skip


def test_register_task_wraps_the_step_for_prefect(store, bundles):
    refs = [store.lookup(ref.stage, ref.key) for ref in (bundles.good.dataset, bundles.good.package,
                                                           bundles.good.evaluation)]  # fmt: skip
    decision = register_task.fn(CONFIG, *refs, StoreConfig(root=store.url))
    assert decision["alias"] == "production"
    assert json.loads(json.dumps(decision)) == decision  # a plain JSON-able result


def test_a_production_move_by_a_concurrent_run_makes_the_decision_be_taken_again(store, bundles, monkeypatch):
    """Run 1 scores production = good; meanwhile run 2 promotes bad; run 1 must compare against bad, not good."""
    import tasks.register as register_module

    run(store, bundles.good)
    registry = registry_of(store)
    bad_version = version_of(store, bundles.bad)
    registry.register(MODEL, bad_version, bundles.bundle_dir(bundles.bad), {"metrics": {}})
    real_score = register_module.score_champion
    calls = []

    def score_then_someone_promotes(*args, **kwargs):
        result = real_score(*args, **kwargs)
        if not calls:
            registry.promote(MODEL, bad_version, "a concurrent run")
        calls.append(result.version)
        return result

    monkeypatch.setattr(register_module, "score_champion", score_then_someone_promotes)
    unblessed = run(store, bundles.unblessed)

    assert calls == [version_of(store, bundles.good), bad_version]
    assert unblessed["champion_version"] == bad_version and unblessed["alias"] == "staging"
    assert registry.aliases(MODEL)["production"] == bad_version
