"""The artifact store on a real S3-compatible server (moto's, started on 127.0.0.1 by tests/support/s3.py).

The server is reached the way a user reaches theirs: store.root=s3://bucket/prefix, with the endpoint in
AWS_ENDPOINT_URL_S3 and credentials in the usual AWS_* variables (botocore reads them, so s3fs does).

What is proven: a real stage's output round-trips (publish, lookup, materialize, reuse); a reader sees nothing before
the manifest; writers racing on one key (threads, and two processes) publish exactly one output whose manifest and
files come from the same writer, every writer gets that output's ref, and the losers' files are gone; a corrupt
file on S3 is caught and recomputed, or stops the run; setting an output aside moves only what its manifest lists.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from kiln.config import AugmentConfig
from kiln.errors import IntegrityError
from kiln.stage import Stage
from kiln.store import CORRUPT_DIR, MANIFEST_NAME, WRITER_PREFIX, ArtifactRef, ArtifactStore
from tests.bad_inputs.conftest import DOWNLOAD_FILES, imagefolder, two_classes, write_tree

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGE = Stage("demo", __name__)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "pets", two_classes(per_class=4))


def writer_folders(store: ArtifactStore, stage: str, key: str) -> list[str]:
    """The writer folders (w-<id>) under an output's directory, listed afresh from the server."""
    listing = store.fs.ls(store.output_path(stage, key), detail=False, refresh=True)
    return sorted(name for name in (path.rsplit("/", 1)[-1] for path in listing) if name.startswith(WRITER_PREFIX))


def build_as(label: str):
    """A build whose bytes differ from writer to writer, as GPU training's do."""

    def build(out_dir: Path) -> dict[str, str]:
        (out_dir / "weights.bin").write_bytes(os.urandom(4096))
        (out_dir / "nested").mkdir()
        (out_dir / "nested" / "writer.txt").write_text(label)
        return {"writer": label}

    return build


def assert_one_output(store: ArtifactStore, stage: str, key: str, refs: list, labels: list[str], cache: Path):
    """Every writer got the same ref; one writer folder is left, the one the manifest names; its files verify and
    are the files of the writer the manifest's metrics name (no mix of two writers)."""
    assert len({(ref.uri, ref.digest) for ref in refs}) == 1, refs
    published = store.lookup(stage, key)
    assert published is not None and (published.uri, published.digest) == (refs[0].uri, refs[0].digest)
    manifest = store.manifest(published)
    assert writer_folders(store, stage, key) == [manifest.files_prefix]
    assert published.uri == f"{store.url}/{stage}/{key}/{manifest.files_prefix}"
    store.verify(published)
    winner = (store.materialize(published, cache_dir=cache) / "nested" / "writer.txt").read_text()
    assert winner in labels and manifest.metrics == {"writer": winner}


# --- a real stage on S3 -------------------------------------------------------------------------------------------
def test_a_stage_output_round_trips_through_s3(s3_root, folder, tmp_path):
    from kiln.dataset import read_dataset
    from tasks.download import download

    store = ArtifactStore(s3_root)
    ref = download(imagefolder(folder), store)

    assert not ref.reused and ref.uri.startswith(f"{s3_root}/download/{ref.key}/{WRITER_PREFIX}")
    raw = json.loads(store.fs.cat_file(f"{s3_root}/download/{ref.key}/{MANIFEST_NAME}"))
    assert raw["files_prefix"] == ref.uri.rsplit("/", 1)[-1]
    assert {entry["path"] for entry in raw["files"]} == DOWNLOAD_FILES
    assert all(store.fs.exists(f"{ref.uri}/{entry['path']}") for entry in raw["files"])
    assert store.lookup("download", ref.key) == ref

    local = store.materialize(ref, cache_dir=tmp_path / "cache")
    dataset = read_dataset(local)
    assert len(dataset.train_labels) + len(dataset.test_labels) == 8 and sorted(dataset.classes) == ["cat", "dog"]

    again = download(imagefolder(folder), ArtifactStore(s3_root))  # another run, same store: reused, not rebuilt
    assert again.reused and (again.uri, again.digest) == (ref.uri, ref.digest)


def test_a_reader_sees_nothing_until_the_manifest_is_published(s3_root):
    store = ArtifactStore(s3_root)
    key = STAGE.key(AugmentConfig(), {})
    publish_manifest, seen = store._create_only, {}

    def observe_then_publish(path: str, data: bytes) -> None:
        files_prefix = json.loads(data)["files_prefix"]
        seen["uploaded"] = sorted(store.fs.find(store.output_path("demo", key) + f"/{files_prefix}"))
        seen["lookup"] = ArtifactStore(s3_root).lookup("demo", key)  # what another run would find right now
        publish_manifest(path, data)

    store._create_only = observe_then_publish
    ref = STAGE.produce(store, AugmentConfig(), {}, build_as("only"))

    assert seen["lookup"] is None  # every file was uploaded, and still no reader could see the output
    assert [path.rsplit("/", 1)[-1] for path in seen["uploaded"]] == ["writer.txt", "weights.bin"]
    assert ArtifactStore(s3_root).lookup("demo", key) == ref


# --- racing writers -----------------------------------------------------------------------------------------------
def test_writers_racing_in_threads_publish_exactly_one_output(s3_root, tmp_path):
    labels = ["a", "b", "c", "d"]
    key = STAGE.key(AugmentConfig(), {})
    everyone_uploaded = threading.Barrier(len(labels), timeout=30)

    def writer(label: str) -> ArtifactRef:
        store = ArtifactStore(s3_root)  # one per writer, as separate runs would have
        # ... on separate hosts: each its own scratch area and build lock (runs on one host build once, in turn).
        store._host_scratch_base = lambda: tmp_path / "hosts" / label
        publish_manifest = store._create_only

        def publish_together(path: str, data: bytes) -> None:
            everyone_uploaded.wait()  # all files of all writers are up: the manifests race
            publish_manifest(path, data)

        store._create_only = publish_together
        return STAGE.produce(store, AugmentConfig(), {}, build_as(label))

    results: dict[str, ArtifactRef | BaseException] = {}

    def run(label: str) -> None:
        try:
            results[label] = writer(label)
        except BaseException as error:  # surfaced below
            results[label] = error

    threads = [threading.Thread(target=run, args=(label,)) for label in labels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    refs = [results[label] for label in labels]
    assert not [ref for ref in refs if isinstance(ref, BaseException)], refs
    assert_one_output(ArtifactStore(s3_root), "demo", key, refs, labels, tmp_path)


CHILD_WRITER = r"""
import os, sys, time
from pathlib import Path
from kiln.store import ArtifactStore

root, key, label, ready = sys.argv[1:5]
store = ArtifactStore(root)
publish_manifest = store._create_only

def publish_together(path, data):
    Path(ready, label).touch()
    deadline = time.time() + 30
    while len(os.listdir(ready)) < 2 and time.time() < deadline:
        time.sleep(0.005)
    publish_manifest(path, data)

store._create_only = publish_together
with store.staging("race") as out:
    (out / "weights.bin").write_bytes(os.urandom(4096))
    (out / "nested").mkdir()
    (out / "nested" / "writer.txt").write_text(label)
    ref = store.publish("race", key, out, code_version="x", inputs={}, config={}, metrics={"writer": label},
                        started_at=time.time())
print(ref.model_dump_json())
"""


def test_writers_racing_in_two_processes_publish_exactly_one_output(s3_root, tmp_path):
    key, labels, ready = uuid.uuid4().hex, ["first", "second"], tmp_path / "ready"
    ready.mkdir()
    writers = [
        subprocess.Popen([sys.executable, "-c", CHILD_WRITER, s3_root, key, label, str(ready)], cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for label in labels
    ]
    outputs = [writer.communicate(timeout=90) for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], [err for _, err in outputs]
    refs = [ArtifactRef.model_validate_json(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert_one_output(ArtifactStore(s3_root), "race", key, refs, labels, tmp_path)


def test_without_a_create_only_write_overlapping_writers_still_agree_on_one_output(monkeypatch, tmp_path):
    """The fallback's window (memory:// stands for gs://, az://...: a manifest that is checked, then written): both
    writers write their manifest; whoever reads back the other's deletes its own files and returns that output."""
    root = f"memory://kiln-remote-{uuid.uuid4().hex[:8]}/store"
    key, labels = STAGE.key(AugmentConfig(), {}), ["a", "b"]
    both_checked, both_wrote = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)

    def check_then_write(self: ArtifactStore, path: str, data: bytes) -> None:
        both_checked.wait()  # both found no manifest...
        self.fs.pipe_file(path, data)  # ...and both write one: the second replaces the first
        both_wrote.wait()

    monkeypatch.setattr(ArtifactStore, "_create_only", check_then_write)
    results: dict[str, ArtifactRef] = {}

    def writer(label: str) -> None:
        store = ArtifactStore(root)
        store._host_scratch_base = lambda: tmp_path / "hosts" / label  # as if on separate hosts (see above)
        results[label] = STAGE.produce(store, AugmentConfig(), {}, build_as(label))

    threads = [threading.Thread(target=writer, args=(label,)) for label in labels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert_one_output(ArtifactStore(root), "demo", key, [results[label] for label in labels], labels, tmp_path)


def test_runs_on_one_host_build_a_remote_output_once(s3_root, tmp_path):
    """Two runs on the same host take turns (an flock in the host's scratch area): the second finds the first's
    output and reuses it, instead of building beside it and resuming from its half-written checkpoints."""
    builds: list[str] = []
    first_building, results = threading.Event(), {}

    def build(label: str):
        def build_output(out_dir: Path) -> dict[str, str]:
            builds.append(label)
            first_building.set()
            time.sleep(0.5)  # long enough for the other run to arrive and wait
            return build_as(label)(out_dir)

        return build_output

    def run(label: str) -> None:
        if label == "second":
            first_building.wait(timeout=30)
        results[label] = STAGE.produce(ArtifactStore(s3_root), AugmentConfig(), {}, build(label))

    threads = [threading.Thread(target=run, args=(label,)) for label in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert builds == ["first"]
    assert results["second"].reused and results["second"].digest == results["first"].digest


# --- corruption and setting aside ---------------------------------------------------------------------------------
def test_a_corrupt_file_on_s3_is_caught_then_recomputed_or_stops_the_run(s3_root, folder, caplog):
    from tasks.download import download

    store = ArtifactStore(s3_root)
    first = download(imagefolder(folder), store)
    store.fs.pipe_file(f"{first.uri}/train_labels.npy", b"not the labels")
    with pytest.raises(IntegrityError, match=f"{first.uri}/train_labels.npy is corrupted: sha256"):
        store.verify(first)

    with pytest.raises(IntegrityError, match="store.on_corrupt is 'stop'.*train_labels.npy is corrupted"):
        download(imagefolder(folder), ArtifactStore(s3_root, on_corrupt="stop"))
    assert store.lookup("download", first.key) == first  # "stop" leaves it where it is, for whoever investigates

    with caplog.at_level(logging.WARNING, logger="kiln"):
        again = download(imagefolder(folder), store)  # on_corrupt="recompute", the default
    assert not again.reused and again.digest == first.digest and again.uri != first.uri
    store.verify(again)
    assert writer_folders(store, "download", first.key) == [again.uri.rsplit("/", 1)[-1]]
    [aside] = store.fs.ls(f"{s3_root}/{CORRUPT_DIR}", detail=False, refresh=True)
    assert aside.rsplit("/", 1)[-1].startswith(f"download-{first.key}-")
    assert store.fs.cat_file(f"{aside}/train_labels.npy") == b"not the labels"
    assert "train_labels.npy is corrupted" in caplog.text and f"moved to s3://{aside}" in caplog.text


def test_set_aside_on_s3_moves_the_published_output_and_nothing_else(s3_root):
    store = ArtifactStore(s3_root)
    ref = STAGE.produce(store, AugmentConfig(), {}, build_as("published"))
    in_progress = f"{store.output_path('demo', ref.key)}/{WRITER_PREFIX}inprogress/weights.bin"
    store.fs.pipe_file(in_progress, b"another writer, still uploading")

    where = store.set_aside(ref)

    assert store.lookup("demo", ref.key) is None
    assert store.fs.cat_file(in_progress) == b"another writer, still uploading"
    assert writer_folders(store, "demo", ref.key) == [f"{WRITER_PREFIX}inprogress"]
    moved = sorted(path.rsplit(f"{CORRUPT_DIR}/", 1)[-1] for path in store.fs.find(where))
    name = where.rsplit("/", 1)[-1]
    assert moved == [f"{name}/{MANIFEST_NAME}", f"{name}/nested/writer.txt", f"{name}/weights.bin"]

    # A second run that found the same corrupt output, setting it aside after the first run rebuilt it, leaves the
    # rebuilt output alone.
    rebuilt = STAGE.produce(store, AugmentConfig(), {}, build_as("rebuilt"))
    store.set_aside(ref)
    assert store.lookup("demo", ref.key) == rebuilt
    store.verify(rebuilt)


def test_an_output_published_with_files_beside_its_manifest_is_still_read(s3_root, tmp_path):
    """Outputs published before files_prefix existed (files beside manifest.json) stay readable."""
    store, local_store = ArtifactStore(s3_root), ArtifactStore(tmp_path / "local")
    with local_store.staging("demo") as out:
        build_as("old")(out)
        ref = local_store.publish("demo", "oldkey", out, code_version="x", inputs={}, config={}, metrics={},
                                  started_at=time.time())  # fmt: skip
    local_dir = Path(ref.uri)
    assert "files_prefix" not in json.loads((local_dir / MANIFEST_NAME).read_text())
    store.fs.put(str(local_dir) + "/", store.output_path("demo", "oldkey"), recursive=True)

    old = store.lookup("demo", "oldkey")
    assert old is not None and old.uri == f"{s3_root}/demo/oldkey" and old.digest == ref.digest
    store.verify(old)
    assert (store.materialize(old, cache_dir=tmp_path / "cache") / "nested" / "writer.txt").read_text() == "old"
