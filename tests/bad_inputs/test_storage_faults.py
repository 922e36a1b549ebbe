"""Faults in the artifact store: a flipped byte in a stored output, and a disk that fills up while a stage writes.

A flipped byte is caught by whoever reads the output next (every read verifies sha256 against the manifest): a
consumer stops naming the file, and the stage that owns the output, asked for it again, sets the corrupt copy aside
and recomputes it (store.on_corrupt=recompute, the default) or stops naming the file (store.on_corrupt=stop).
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import numpy as np
import pytest

from kiln.config import ValidateConfig
from kiln.errors import IntegrityError, StorageFull
from kiln.store import CORRUPT_DIR, ArtifactStore
from tasks.download import download
from tasks.validate import validate
from tests.bad_inputs.conftest import assert_published_complete, fails_cleanly, imagefolder, two_classes, write_tree


def flip_one_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "pets", two_classes(per_class=4))


def test_a_consumer_of_a_flipped_byte_names_the_file_and_uses_nothing(tmp_path, folder):
    store = ArtifactStore(tmp_path / "store")
    dataset = download(imagefolder(folder), store)
    flip_one_byte(Path(dataset.uri) / "train_images.npy")

    with fails_cleanly(store.root, IntegrityError, f"{dataset.uri}/train_images.npy is corrupted: sha256",
                       "differs from the manifest's"):  # fmt: skip
        validate(ValidateConfig(), dataset, store)


def test_a_flipped_byte_makes_the_stage_set_the_output_aside_and_recompute_it(tmp_path, folder, caplog):
    store = ArtifactStore(tmp_path / "store")
    first = download(imagefolder(folder), store)
    flip_one_byte(Path(first.uri) / "samples.csv", offset=40)

    with caplog.at_level(logging.WARNING, logger="kiln"):
        again = download(imagefolder(folder), store)

    assert not again.reused and (again.key, again.digest) == (first.key, first.digest)
    assert_published_complete(store, again)
    [aside] = list((Path(store.root) / CORRUPT_DIR).iterdir())
    assert aside.name.startswith(f"download-{first.key}-") and (aside / "samples.csv").is_file()
    assert f"{first.uri}/samples.csv is corrupted" in caplog.text and f"moved to {aside}" in caplog.text
    assert download(imagefolder(folder), store).reused  # and the rebuilt copy is reused from then on


def test_a_flipped_byte_stops_the_run_when_the_policy_says_so(tmp_path, folder):
    store = ArtifactStore(tmp_path / "store", on_corrupt="stop")
    first = download(imagefolder(folder), store)
    flip_one_byte(Path(first.uri) / "test_labels.npy")

    with fails_cleanly(store.root, IntegrityError, "download: the stored output is corrupt and store.on_corrupt is "
                       f"'stop': {first.uri}/test_labels.npy is corrupted", f"delete {first.uri} so the stage is "
                       "recomputed", "or set store.on_corrupt=recompute"):  # fmt: skip
        download(imagefolder(folder), store)
    assert (Path(first.uri) / "test_labels.npy").is_file()  # left where it is, for whoever investigates


def test_a_corrupt_output_on_a_remote_store_is_recomputed_too(folder):
    store = ArtifactStore("memory://kiln-faults/store")
    first = download(imagefolder(folder), store)
    with store.fs.open(f"{first.uri}/train_labels.npy", "wb") as handle:
        handle.write(b"not the labels")

    again = download(imagefolder(folder), store)

    assert not again.reused and again.digest == first.digest
    store.verify(again)
    assert store.fs.ls(f"{store.root}/{CORRUPT_DIR}")


def test_a_disk_filling_up_while_writing_gives_one_clear_error_and_no_partial_output(tmp_path, folder, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    real_save = np.save

    def save_until_the_disk_is_full(path, array, *args, **kwargs):
        if str(path).endswith("test_images.npy"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_until_the_disk_is_full)
    with fails_cleanly(store.root, StorageFull, f"download: the disk under store.root={store.url} is full",
                       "test_images.npy", "nothing was published and the partial output was removed",
                       "point store.root at a larger disk with --set store.root=PATH"):  # fmt: skip
        download(imagefolder(folder), store)
    monkeypatch.setattr(np, "save", real_save)
    assert_published_complete(store, download(imagefolder(folder), store))  # with space again, it just works
