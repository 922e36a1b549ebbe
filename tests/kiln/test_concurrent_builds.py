"""Concurrent runs on one store: the same output is built once and reused; different outputs never clobber."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from kiln.config import DataConfig
from kiln.stage import Stage
from kiln.store import ArtifactStore

STAGE = Stage("download", "kiln.dataset")


def slow_build(calls: list[str], label: str):
    def build(out_dir: Path):
        calls.append(label)
        time.sleep(0.5)  # long enough for the other thread to arrive while this one builds
        (out_dir / "data.txt").write_text(label)
        return {"label": label}

    return build


def run_in_threads(*jobs):
    results: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i, job=job: results.__setitem__(i, job())) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return [results[index] for index in range(len(jobs))]


def test_the_same_output_requested_twice_at_once_is_built_once_and_reused(tmp_path: Path):
    store, calls = ArtifactStore(tmp_path / "store"), []
    config = DataConfig(source="digits", seed=1)
    first, second = run_in_threads(
        lambda: STAGE.produce(store, config, {}, slow_build(calls, "a")),
        lambda: STAGE.produce(store, config, {}, slow_build(calls, "b")),
    )
    assert len(calls) == 1
    assert first.key == second.key and first.digest == second.digest
    assert sorted([first.reused, second.reused]) == [False, True]
    assert (Path(first.uri) / "data.txt").read_text() == calls[0]
    assert not list(Path(store.root, "download").glob(".tmp-*"))


def test_different_outputs_built_at_once_keep_their_own_content(tmp_path: Path):
    store, calls = ArtifactStore(tmp_path / "store"), []
    one, two = run_in_threads(
        lambda: STAGE.produce(store, DataConfig(source="digits", seed=1), {}, slow_build(calls, "one")),
        lambda: STAGE.produce(store, DataConfig(source="digits", seed=2), {}, slow_build(calls, "two")),
    )
    assert sorted(calls) == ["one", "two"] and one.key != two.key
    assert (Path(one.uri) / "data.txt").read_text() == "one" and (Path(two.uri) / "data.txt").read_text() == "two"
    assert store.manifest(one).metrics == {"label": "one"} and store.manifest(two).metrics == {"label": "two"}
