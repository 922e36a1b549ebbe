import json
import time
from pathlib import Path

import pytest

from kiln.config import AugmentConfig
from kiln.errors import ConfigError, IntegrityError
from kiln.stage import Stage
from kiln.store import ArtifactStore

STAGE = Stage("demo", __name__)


def build_two_files(out_dir):
    (out_dir / "a.txt").write_text("alpha")
    (out_dir / "nested").mkdir()
    (out_dir / "nested" / "b.bin").write_bytes(b"\x00\x01")
    return {"score": 0.5}


@pytest.mark.parametrize("root_kind", ["local", "memory"])
def test_publish_then_reuse_then_verify(tmp_path, root_kind):
    root = tmp_path / "store" if root_kind == "local" else f"memory://kiln-test-{tmp_path.name}"
    store = ArtifactStore(root)
    first = STAGE.produce(store, AugmentConfig(), {}, build_two_files)
    assert not first.reused
    manifest = store.manifest(first)
    assert manifest.stage == "demo" and manifest.metrics == {"score": 0.5}
    assert {entry.path for entry in manifest.files} == {"a.txt", "nested/b.bin"}
    assert all(len(entry.sha256) == 64 for entry in manifest.files)
    assert manifest.config == AugmentConfig().model_dump(mode="json")
    assert "torch" in manifest.versions and manifest.code_version

    second = STAGE.produce(store, AugmentConfig(), {}, lambda out: pytest.fail("must not rebuild"))
    assert second.reused and second.key == first.key and second.digest == first.digest
    local = store.materialize(second, cache_dir=tmp_path / "cache")
    assert (local / "nested" / "b.bin").read_bytes() == b"\x00\x01"


def test_an_unknown_filesystem_is_a_config_error():
    with pytest.raises(ConfigError, match="store.root 'nosuchfs://bucket/x' cannot be opened"):
        ArtifactStore("nosuchfs://bucket/x")


def test_key_changes_with_config_and_inputs(store):
    base = STAGE.produce(store, AugmentConfig(), {}, build_two_files)
    other_config = STAGE.key(AugmentConfig(crop_padding=2), {})
    other_input = STAGE.key(AugmentConfig(), {"upstream": base})
    assert len({base.key, other_config, other_input}) == 3


def test_corrupted_file_is_detected_and_named(store):
    ref = STAGE.produce(store, AugmentConfig(), {}, build_two_files)
    path = store.materialize(ref) / "nested" / "b.bin"
    path.write_bytes(b"\x00\x02")
    with pytest.raises(IntegrityError, match=r"nested/b.bin is corrupted: sha256 .* differs"):
        store.materialize(ref)


def test_failed_build_leaves_nothing_behind(store):
    def explode(out_dir):
        (out_dir / "half.txt").write_text("half-written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        STAGE.produce(store, AugmentConfig(), {}, explode)
    assert list(Path(store.root).rglob("*.txt")) == []
    assert store.lookup("demo", STAGE.key(AugmentConfig(), {})) is None


def test_bad_manifest_is_an_integrity_error(store):
    ref = STAGE.produce(store, AugmentConfig(), {}, build_two_files)
    manifest_path = store.materialize(ref) / "manifest.json"
    manifest_path.write_text(json.dumps({"not": "a manifest"}))
    with pytest.raises(IntegrityError, match="not a valid kiln manifest"):
        store.lookup("demo", ref.key)


def test_racing_publishers_keep_one_output(store):
    """Two writers of the same key: the second publish finds the first's output and keeps it."""
    key = STAGE.key(AugmentConfig(), {})


    with store.staging("demo") as first_dir, store.staging("demo") as second_dir:
        build_two_files(first_dir)
        build_two_files(second_dir)
        common = dict(code_version="x", inputs={}, config={}, metrics={}, started_at=time.time())
        first = store.publish("demo", key, first_dir, **common)
        second = store.publish("demo", key, second_dir, **common)
    assert first.digest == second.digest
    assert [path.name for path in (Path(store.root) / "demo").iterdir()] == [key]
