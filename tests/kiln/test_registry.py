"""The model registry: immutable versions, atomic and locked alias moves, rollback, and the promotion rule.

The bundles are real: tiny models trained, exported and packaged by the stages themselves (see `tiny_bundles`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.bundle import load_bundle
from kiln.config import AugmentConfig, CompressConfig, EvaluateConfig, ExportConfig, PackageConfig, TrainConfig
from kiln.dataset import publish_dataset
from kiln.errors import BundleError, ConfigError, KilnError
from kiln.registry import (
    ALIASES_FILE,
    HISTORY_FILE,
    REGISTRATION_FILE,
    AliasConflict,
    ChampionResult,
    Decision,
    ModelRegistry,
    decide_promotion,
    registry_root,
)
from kiln.store import ArtifactRef, ArtifactStore
from tests.conftest import make_blobs_dataset

MODEL = "kiln-classifier"


# --- real tiny bundles, built once per test session and shared by the registry test modules -------------------
@dataclass(frozen=True)
class Packaged:
    """One package output with the dataset and evaluation it was made from."""

    dataset: ArtifactRef
    evaluation: ArtifactRef
    package: ArtifactRef


@dataclass(frozen=True)
class TinyBundles:
    store: ArtifactStore
    good: Packaged  # trained well: test accuracy 1.0, blessed
    bad: Packaged  # barely trained: far lower accuracy, blessed (the gate is 0)
    unblessed: Packaged  # the bad model under a gate of 0.9: not blessed

    def bundle_dir(self, packaged: Packaged) -> Path:
        bundle = self.store.manifest(packaged.package).metrics["bundle"]
        return self.store.materialize(packaged.package) / bundle


_BUILT: dict[str, TinyBundles] = {}


def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> TinyBundles:
    """Build (once per session) the bundles in `TinyBundles` with the real stages, on the 8x8 blobs set.

    Shared through this module-level cache rather than conftest, so that the three registry test modules build the
    bundles (two ONNX exports: the bulk of these tests' time) once. Tests must not change these outputs: copy them (`private_copy`) first.
    """
    if "bundles" not in _BUILT:
        from tasks.augment import augment
        from tasks.compress import compress
        from tasks.evaluate import evaluate
        from tasks.export import export
        from tasks.package import package
        from tasks.train import train

        store = ArtifactStore(tmp_path_factory.mktemp("registry-bundles") / "store")

        def packaged(dataset: ArtifactRef, train_config: TrainConfig, min_accuracy: float = 0.0) -> Packaged:
            policy = augment(AugmentConfig(policy="none"), dataset, store)
            model = train(train_config, dataset, policy, store)
            evaluation = evaluate(EvaluateConfig(min_accuracy=min_accuracy), model, dataset, store)
            exported = export(ExportConfig(parity_samples=16), model, dataset, store)
            compressed = compress(CompressConfig(method="none", latency_runs=1), exported, dataset, store)
            bundle = package(PackageConfig(archive=False), dataset, model, evaluation, exported, compressed, store)
            return Packaged(dataset, evaluation, bundle)

        good = TrainConfig(epochs=6, batch_size=16, device="cpu")
        bad = TrainConfig(epochs=1, batch_size=72, lr=1e-4, validation_fraction=0, device="cpu")
        dataset = publish_dataset(store, make_blobs_dataset())
        _BUILT["bundles"] = TinyBundles(
            store,
            good=packaged(dataset, good),
            bad=packaged(dataset, bad),
            unblessed=packaged(dataset, bad, min_accuracy=0.9),  # reuses the bad model's export: evaluate + package
        )
    return _BUILT["bundles"]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> TinyBundles:
    return tiny_bundles(tmp_path_factory)


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture
def two_versions(registry, bundles) -> ModelRegistry:
    """v1 (the good bundle) and v2 (the bad one) registered, no alias set."""
    registry.register(MODEL, "v1", bundles.bundle_dir(bundles.good), {"metrics": {"test_accuracy": 1.0}})
    registry.register(MODEL, "v2", bundles.bundle_dir(bundles.bad), {"metrics": {"test_accuracy": 0.3}})
    return registry


def leftovers(directory: Path) -> list[str]:
    """Temporary files or folders a write left behind."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob(".tmp-*")) + sorted(
        str(path.relative_to(directory)) for path in directory.rglob(f".{ALIASES_FILE}-*")
    )


# --- registering ----------------------------------------------------------------------------------------------
def test_register_copies_a_verifiable_bundle_with_its_record(registry, bundles):
    source = bundles.bundle_dir(bundles.good)
    record = {"metrics": {"test_accuracy": 1.0}, "dataset": {"digest": "d" * 64}, "source": {"uri": "u"}}
    registered = registry.register(MODEL, "v1", source, record)

    assert registered.name == MODEL and registered.version == "v1" and registered.aliases == ()
    assert registered.path == registry.root / MODEL / "versions" / "v1" / "bundle"
    assert load_bundle(registered.path).labels == ["class_0", "class_1", "class_2"]  # the copy verifies
    assert sorted(path.name for path in source.iterdir()) == sorted(path.name for path in registered.path.iterdir())
    saved = json.loads((registered.path.parent / REGISTRATION_FILE).read_text())
    assert saved == registered.registration
    assert saved["version"] == "v1" and saved["model_name"] == MODEL and saved["metrics"] == {"test_accuracy": 1.0}
    assert saved["dataset"]["digest"] == "d" * 64 and saved["registered_at"].endswith("+00:00")
    assert registry.models() == [MODEL] and [entry.version for entry in registry.versions(MODEL)] == ["v1"]
    assert leftovers(registry.root) == []


def test_registering_again_is_idempotent_but_other_content_under_a_version_is_refused(registry, bundles):
    first = registry.register(MODEL, "v1", bundles.bundle_dir(bundles.good), {"run": 1})
    again = registry.register(MODEL, "v1", bundles.bundle_dir(bundles.good), {"run": 2})
    assert again == first and again.registration == first.registration  # the original record is kept

    with pytest.raises(BundleError, match="already registered with different bundle content.*new package.version"):
        registry.register(MODEL, "v1", bundles.bundle_dir(bundles.bad), {})
    assert [entry.version for entry in registry.versions(MODEL)] == ["v1"]
    assert leftovers(registry.root) == []


def test_a_broken_bundle_is_not_registered(registry, bundles, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundles.bundle_dir(bundles.good), broken)
    (broken / "labels.json").write_text('["x", "y", "z"]\n')
    with pytest.raises(KilnError, match="labels.json is corrupted"):
        registry.register(MODEL, "v1", broken, {})
    assert not (registry.root / MODEL / "versions" / "v1").exists() and leftovers(registry.root) == []


@pytest.mark.parametrize(
    ("model_name", "version", "message"),
    [("../escape", "v1", "model name"), ("Upper", "v1", "model name"), (MODEL, "a/b", "version"),
     (MODEL, "production", "ambiguous")],
)  # fmt: skip
def test_names_that_are_not_plain_folder_names_are_refused(registry, bundles, model_name, version, message):
    with pytest.raises(ConfigError, match=message):
        registry.register(model_name, version, bundles.bundle_dir(bundles.good), {})


def test_versions_sort_by_registration_time(registry, bundles):
    registry.register(MODEL, "zz", bundles.bundle_dir(bundles.good), {})
    registry.register(MODEL, "aa", bundles.bundle_dir(bundles.bad), {})
    assert [entry.version for entry in registry.versions(MODEL)] == ["zz", "aa"]


# --- reading --------------------------------------------------------------------------------------------------
def test_get_resolves_versions_and_aliases_and_names_what_exists_when_unknown(two_versions):
    registry = two_versions
    registry.promote(MODEL, "v1", "first")
    assert registry.get(MODEL, "production").version == "v1"
    assert registry.get(MODEL, "v1").aliases == ("production",)
    assert registry.get(MODEL, "v2").aliases == ()
    with pytest.raises(KilnError, match=r"no version or alias 'v9'; versions: v1, v2; aliases: production -> v1"):
        registry.get(MODEL, "v9")
    with pytest.raises(KilnError, match=r"no version or alias 'staging'"):
        registry.get(MODEL, "staging")
    with pytest.raises(KilnError, match=rf"no model 'other'.*registered models: {MODEL}.*kiln registry list"):
        registry.get("other", "v1")
    with pytest.raises(KilnError, match="no model 'other'"):
        registry.versions("other")


def test_the_registry_needs_a_local_store(tmp_path):
    assert registry_root(ArtifactStore(tmp_path / "store")) == tmp_path / "store" / "registry"
    assert registry_root(ArtifactStore(f"file://{tmp_path}/store")) == tmp_path / "store" / "registry"
    with pytest.raises(ConfigError, match="needs a local store.root.*package.registry=false"):
        registry_root(ArtifactStore("memory://kiln-registry-test"))


# --- moving aliases -------------------------------------------------------------------------------------------
def test_alias_moves_replace_aliases_json_and_append_history(two_versions):
    registry = two_versions
    registry.promote(MODEL, "v1", "first version")
    registry.set_alias(MODEL, "staging", "v2", "gate failed", actor="tester")
    registry.promote(MODEL, "staging", "v2 looks fine", actor="tester")  # an alias names its version
    registry.promote(MODEL, "v2", "again: not a move")

    assert registry.aliases(MODEL) == {"production": "v2", "staging": "v2"}
    moves = [(move["alias"], move["from"], move["to"], move["reason"], move["actor"])
             for move in registry.history(MODEL)]  # fmt: skip
    assert moves == [
        ("production", None, "v1", "first version", "kiln"),
        ("staging", None, "v2", "gate failed", "tester"),
        ("production", "v1", "v2", "v2 looks fine", "tester"),
    ]
    assert registry.get(MODEL, "v2").aliases == ("production", "staging")
    assert leftovers(registry.root) == []
    with pytest.raises(ConfigError, match="unknown alias 'prod'; choose one of: production, staging"):
        registry.set_alias(MODEL, "prod", "v1", "typo")
    with pytest.raises(KilnError, match="no version or alias 'v9'"):
        registry.promote(MODEL, "v9", "no such version")
    assert len(registry.history(MODEL)) == 3


def test_rollback_returns_to_the_previous_version_and_a_second_rollback_undoes_it(two_versions):
    registry = two_versions
    registry.promote(MODEL, "v1", "first")
    with pytest.raises(KilnError, match="no earlier version to roll back to.*kiln registry promote"):
        registry.rollback(MODEL)
    with pytest.raises(KilnError, match="staging has no earlier version.*current: none"):
        registry.rollback(MODEL, alias="staging")
    registry.promote(MODEL, "v2", "better")

    assert registry.rollback(MODEL, reason="v2 misbehaves").version == "v1"
    assert registry.aliases(MODEL)["production"] == "v1"
    last = registry.history(MODEL)[-1]
    assert (last["from"], last["to"], last["reason"]) == ("v2", "v1", "v2 misbehaves")
    assert registry.rollback(MODEL, reason="undo").version == "v2"


def test_rollback_refuses_when_aliases_and_history_disagree(two_versions):
    registry = two_versions
    registry.promote(MODEL, "v1", "first")
    registry.promote(MODEL, "v2", "second")
    (registry.root / MODEL / ALIASES_FILE).write_text(json.dumps({"production": "v1"}))  # moved by hand, unlogged
    with pytest.raises(KilnError, match="last logged move was to v2: the history is incomplete"):
        registry.rollback(MODEL)


def test_concurrent_promoters_in_two_processes_lose_no_move(two_versions):
    """Each process flips production between v1 and v2; under the lock every logged move starts where the one
    before it ended, and aliases.json stays valid JSON for a reader polling it all along."""
    registry = two_versions
    registry.promote(MODEL, "v1", "start")
    flips = 40
    worker = (
        "import sys; from pathlib import Path; from kiln.registry import ModelRegistry\n"
        "registry = ModelRegistry(Path(sys.argv[1]))\n"
        f"for index in range({flips}):\n"
        f"    registry.promote({MODEL!r}, 'v2' if index % 2 == 0 else 'v1', f'{{sys.argv[2]}} {{index}}', "
        "actor=sys.argv[2])\n"
    )
    aliases_path = registry.root / MODEL / ALIASES_FILE
    stop, invalid = threading.Event(), []

    def poll() -> None:
        while not stop.is_set():
            try:
                json.loads(aliases_path.read_text())
            except ValueError as error:
                invalid.append(error)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        workers = [
            subprocess.Popen([sys.executable, "-c", worker, str(registry.root), name], cwd=Path(__file__).parents[2])
            for name in ("a", "b")
        ]
        assert [process.wait(timeout=60) for process in workers] == [0, 0]
    finally:
        stop.set()
        reader.join()

    assert invalid == []
    moves = registry.history(MODEL)
    assert len(moves) > flips  # each process makes at least its own moves when the other is not interleaving
    for before, after in zip(moves, moves[1:]):
        assert after["from"] == before["to"], f"lost update between {before} and {after}"
    assert registry.aliases(MODEL)["production"] == moves[-1]["to"]
    assert leftovers(registry.root) == []
    assert (registry.root / MODEL / HISTORY_FILE).read_text().endswith("\n")


def test_concurrent_promoting_threads_lose_no_move(two_versions):
    registry = two_versions
    registry.promote(MODEL, "v1", "start")
    barrier = threading.Barrier(4)

    def flip(name: str) -> None:
        barrier.wait()
        for index in range(25):
            registry.promote(MODEL, "v2" if index % 2 == 0 else "v1", f"{name} {index}", actor=name)

    threads = [threading.Thread(target=flip, args=(f"t{number}",)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    moves = registry.history(MODEL)
    for before, after in zip(moves, moves[1:]):
        assert after["from"] == before["to"]
    assert registry.aliases(MODEL)["production"] == moves[-1]["to"]


# --- the promotion rule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("accuracy", "blessed", "champion", "budget", "alias", "reason"),
    [
        (0.9, False, None, 0.005, "staging", "gate failed"),
        (0.9, False, ChampionResult("v1", 0.5), 0.005, "staging", "gate failed"),
        (0.9, True, None, 0.005, "production", "first version"),
        (0.99, True, ChampionResult("v1", problem="its classes differ"), 0.005, "staging",
         "production v1 cannot be compared: its classes differ.*kiln registry promote"),
        (0.90, True, ChampionResult("v1", 0.95), 0.005, "staging",
         r"test accuracy 0.9000 vs production v1's 0.9500, regression budget 0.0050"),
        (0.95, True, ChampionResult("v1", 0.95), 0.0, "production", "0.9500 vs production v1's 0.9500"),
        (0.97, True, ChampionResult("v1", 0.95), 0.0, "production", "within the budget"),
        # exactly at the budget: 0.8 - 0.1 is 0.7000000000000001 in floats, yet 0.7 must count as within it
        (0.7, True, ChampionResult("v1", 0.8), 0.1, "production", "0.7000 vs production v1's 0.8000"),
        (0.6999, True, ChampionResult("v1", 0.8), 0.1, "staging", "worse than production beyond the budget"),
        (46 / 50, True, ChampionResult("v1", 47 / 50), 0.02, "production", "within the budget"),
    ],
)  # fmt: skip
def test_decide_promotion(accuracy, blessed, champion, budget, alias, reason):
    decision = decide_promotion(accuracy, blessed, champion, budget)
    assert isinstance(decision, Decision) and decision.alias == alias
    assert re.search(reason, decision.reason), decision.reason


def test_a_move_conditional_on_a_stale_production_is_refused(two_versions):
    registry = two_versions
    registry.promote(MODEL, "v1", "first version")
    with pytest.raises(AliasConflict, match="production is now v1"):
        registry.set_alias(MODEL, "production", "v2", "decided while production was empty", expect={"production": None})
    assert registry.aliases(MODEL) == {"production": "v1"} and len(registry.history(MODEL)) == 1
    registry.set_alias(MODEL, "production", "v2", "decided against v1", expect={"production": "v1"})
    assert registry.aliases(MODEL) == {"production": "v2"}


def test_registered_files_are_readable_by_other_users(two_versions):
    registry = two_versions
    registry.promote(MODEL, "v1", "first version")
    assert (registry.root / MODEL / ALIASES_FILE).stat().st_mode & 0o777 == 0o644
    assert (registry.root / MODEL / "versions" / "v1").stat().st_mode & 0o777 == 0o755
