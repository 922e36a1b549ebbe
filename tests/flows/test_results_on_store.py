"""Prefect's task results and cache records kept in the artifact store (flows/results.py), locally and on S3.

"Another machine" is a run whose Prefect local storage path is empty: anything it is served from Prefect's cache
must have come from the store. The S3 test runs the whole quickstart pipeline on moto's server (tests/support/s3.py)
from three such machines: the last is served by the cache records the others left on S3.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.filesystems import LocalFileSystem
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from flows.results import RESULTS_DIR, result_storage, results_in_store
from flows.training_pipeline import training_pipeline
from kiln.config import StoreConfig, load_config
from kiln.store import ArtifactStore
from tests.flows.test_training_pipeline import STAGES, task_run_states

CALLS: list[str] = []


@task(persist_result=True, result_serializer="json", cache_key_fn=lambda _context, parameters: parameters["key"])
def remember(key: str) -> str:
    CALLS.append(key)
    return key.upper()


@flow
def remember_in_store(store: StoreConfig, key: str) -> str:
    with results_in_store(store):
        return remember(key)


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def on_another_machine(tmp_path: Path):
    """Prefect settings of a machine that has never run anything: an empty local result storage."""
    return temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / f"machine-{uuid.uuid4().hex[:6]}"})


def test_results_and_cache_records_are_written_under_the_store_root(harness, tmp_path):
    store, key = StoreConfig(root=str(tmp_path / "store")), f"kiln-demo-{uuid.uuid4().hex}"
    assert remember_in_store(store, key) == key.upper()
    assert (tmp_path / "store" / RESULTS_DIR / key).is_file()
    with on_another_machine(tmp_path):  # served from the store's record: the task body does not run again
        assert remember_in_store(store, key) == key.upper()
    assert CALLS.count(key) == 1


def test_prefect_results_false_leaves_them_to_prefects_settings(harness, tmp_path):
    store = StoreConfig(root=str(tmp_path / "store"), prefect_results=False)
    key = f"kiln-demo-{uuid.uuid4().hex}"
    with on_another_machine(tmp_path):
        assert remember_in_store(store, key) == key.upper()
    assert not (tmp_path / "store" / RESULTS_DIR).exists()
    with on_another_machine(tmp_path):  # nothing shared: this machine computes it again
        remember_in_store(store, key)
    assert CALLS.count(key) == 2


def test_the_storage_is_one_saved_block_per_store(harness, tmp_path):
    store = StoreConfig(root=str(tmp_path / "store"))
    first, second = result_storage(store), result_storage(store)  # the second loads the first's block
    assert isinstance(first, LocalFileSystem) and first.basepath == str(tmp_path / "store" / RESULTS_DIR)
    digest = hashlib.sha256(str(tmp_path / "store").encode()).hexdigest()[:12]
    assert LocalFileSystem.load(f"kiln-results-{digest}").basepath == first.basepath
    assert first._block_document_id is not None and second._block_document_id == first._block_document_id
    assert result_storage(StoreConfig(root=str(tmp_path / "other")))._block_document_id != first._block_document_id


class RunsCodeWhenUnpickled:
    """A pickled result that touches a file when loaded: what a writer with access to the store could plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_record_is_refused_not_loaded_and_rewritten(harness, tmp_path, caplog):
    import json
    import logging

    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    store, key, marker = StoreConfig(root=str(tmp_path / "store")), f"kiln-demo-{uuid.uuid4().hex}", tmp_path / "ran"
    planted = ResultRecord(
        result=RunsCodeWhenUnpickled(marker),
        metadata=ResultRecordMetadata(serializer=PickleSerializer(), storage_key=key),
    )
    (tmp_path / "store" / RESULTS_DIR).mkdir(parents=True)
    (tmp_path / "store" / RESULTS_DIR / key).write_bytes(planted.serialize())
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert remember_in_store(store, key) == key.upper()
    assert not marker.exists()
    assert CALLS.count(key) == 1  # treated as no record: the task ran
    assert f"ignored Prefect result record {tmp_path / 'store' / RESULTS_DIR / key}" in caplog.text
    rewritten = json.loads((tmp_path / "store" / RESULTS_DIR / key).read_bytes())
    assert rewritten["metadata"]["serializer"]["type"] == "json"


@pytest.mark.parametrize(
    "serializer, result, reason",
    [
        ({"type": "pickle", "picklelib": "cloudpickle"}, "gAWVCgAAAAAAAAB9lC4=", "serializer is 'pickle'"),
        ("json-with-another-decoder", '{"a": 1}', "serializer is 'json' with other settings"),
        ("json", '{"__class__": "subprocess.Popen", "data": ["true"]}', "names ['subprocess.Popen']"),
        ("json", '[{"__exc_type__": "os.error", "message": "x"}]', "names ['os.error']"),
    ],
)
def test_records_kiln_did_not_write_are_refused(serializer, result, reason):
    import json

    from prefect.serializers import JSONSerializer

    from flows.results import only_kiln_records

    if serializer == "json":
        serializer = JSONSerializer().model_dump(mode="json")
    elif serializer == "json-with-another-decoder":
        serializer = {**JSONSerializer().model_dump(mode="json"), "object_decoder": "os.system"}
    content = json.dumps({"metadata": {"serializer": serializer}, "result": result}).encode()
    with pytest.raises(ValueError, match=re.escape(reason)):
        only_kiln_records(content, "records/k")
    kiln_record = {"metadata": {"serializer": JSONSerializer().model_dump(mode="json")},
                   "result": '{"__class__": "kiln.store.ArtifactRef", "data": {"stage": "s"}}'}  # fmt: skip
    assert only_kiln_records(json.dumps(kiln_record).encode(), "records/k")


def test_a_root_prefect_cannot_hold_results_in_warns_and_leaves_them_to_prefect(harness, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert result_storage(StoreConfig(root="memory:///kiln-no-location")) is None
    assert "stay in Prefect's own result storage" in caplog.text


def test_outside_a_flow_run_nothing_changes(tmp_path):
    with results_in_store(StoreConfig(root=str(tmp_path))) as storage:
        assert storage is None
    assert not (tmp_path / RESULTS_DIR).exists()


@pytest.mark.slow
def test_the_pipeline_on_s3_is_shared_by_machines_through_s3(harness, s3_root, tmp_path):
    """Machine A computes every stage; machine B reuses A's outputs (its cache key function finds them on S3) and
    leaves Prefect cache records there; machine C is served by those records without running a stage."""
    config = load_config("quickstart", overrides=[f"store.root={s3_root}", "package.registry=false"])
    first = training_pipeline(config)
    assert not any(ref.reused for ref in first.values())
    assert all(ref.uri.startswith(s3_root) for ref in first.values())

    with on_another_machine(tmp_path):
        second = training_pipeline(config)
    assert all(ref.reused for ref in second.values())
    store = ArtifactStore(s3_root)
    records = store.fs.ls(f"{store.root}/{RESULTS_DIR}", detail=False, refresh=True)
    keyed = {path.rsplit("/", 1)[-1].split("-")[1] for path in records if path.rsplit("/", 1)[-1].startswith("kiln-")}
    assert keyed >= set(STAGES)

    with on_another_machine(tmp_path):
        third = training_pipeline(config, return_state=True)
    states = task_run_states(third.state_details.flow_run_id)
    assert {stage: states[stage] for stage in STAGES} == dict.fromkeys(STAGES, "Cached")
    assert {name: ref.digest for name, ref in third.result().items()} == {
        name: ref.digest for name, ref in first.items()
    }
