"""CSV manifests (path,label[,split]) through the download stage: a good one first, then each way one goes wrong,
with the exact outcome (a DataError naming the lines and the fix, or files reported as unreadable)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kiln.config import ValidateConfig, load_config
from kiln.dataset import read_dataset, read_skipped
from kiln.errors import DataError, ValidationFailed
from kiln.store import ArtifactStore
from tasks.download import download
from tasks.validate import validate
from tests.bad_inputs.conftest import assert_published_complete, fails_cleanly, image_file, imagefolder


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Six 8x8 images in one flat folder (no class folders): what a labelling tool's export looks like."""
    folder = tmp_path / "export"
    (folder / "images").mkdir(parents=True)
    for index in range(6):
        colour = (40 * index, 200, 30) if index % 2 else (200, 30 * index, 90)
        (folder / "images" / f"{index}.png").write_bytes(image_file(colour))
    return folder


def write_manifest(folder: Path, text: str, name: str = "labels.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


GOOD_ROWS = (
    "path,label,split\n"
    "images/0.png,cat,train\nimages/1.png,dog,train\nimages/2.png,cat,train\n"
    "images/3.png,dog,train\nimages/4.png,cat,test\nimages/5.png,dog,test\n"
)


def test_a_good_manifest_is_read_with_its_labels_and_splits(store, photos):
    manifest = write_manifest(photos, GOOD_ROWS)
    ref = download(imagefolder(manifest), store)
    dataset = read_dataset(assert_published_complete(store, ref))
    assert dataset.classes == ["cat", "dog"] and dataset.name == "labels"
    assert dataset.train_labels.tolist() == [0, 1, 0, 1] and dataset.test_labels.tolist() == [0, 1]
    samples = pd.read_csv(Path(ref.uri) / "samples.csv")
    assert samples["source"].tolist() == [f"images/{index}.png" for index in range(6)]


def test_the_profile_accepts_a_manifest_as_data_uri(photos):
    config = load_config("imagefolder", overrides=[f"data.uri={photos / 'labels.csv'}", "data.classes=[cat, dog]"])
    assert config.data.classes == ["cat", "dog"]


def test_a_manifest_without_a_split_column_is_split_by_test_fraction(store, photos):
    rows = "path,label\n" + "".join(f"images/{index}.png,{'dog' if index % 2 else 'cat'}\n" for index in range(6))
    ref = download(imagefolder(write_manifest(photos, rows), test_fraction=0.34), store)
    dataset = read_dataset(store.materialize(ref))
    assert (len(dataset.train_labels), len(dataset.test_labels)) == (4, 2)
    assert sorted(dataset.test_labels.tolist()) == [0, 1]


def test_labels_outside_the_declared_class_set(store, photos):
    rows = GOOD_ROWS.replace("images/3.png,dog,train", "images/3.png,dgo,train")
    manifest = write_manifest(photos, rows)
    with fails_cleanly(store.root, DataError, f"1 rows of {manifest} have labels outside data.classes (cat, dog) "
                       "(line 5: images/3.png,dgo); fix those labels, or add the classes to data.classes"):  # fmt: skip
        download(imagefolder(manifest, classes=["cat", "dog"]), store)


def test_missing_label_column(store, photos):
    manifest = write_manifest(photos, "path,class\nimages/0.png,cat\n")
    with fails_cleanly(store.root, DataError, f"{manifest} lacks the column(s) label; a CSV manifest needs a header "
                       "row with path and label (and optionally split), found: path, class"):  # fmt: skip
        download(imagefolder(manifest), store)


def test_missing_both_columns(store, photos):
    manifest = write_manifest(photos, "file,y\nimages/0.png,cat\n")
    with fails_cleanly(store.root, DataError, "lacks the column(s) path, label", "found: file, y"):
        download(imagefolder(manifest), store)


def test_an_empty_manifest(store, photos):
    manifest = write_manifest(photos, "path,label,split\n")
    with fails_cleanly(store.root, DataError, f"{manifest} lists no images; add one row per image"):
        download(imagefolder(manifest), store)


def test_an_empty_label(store, photos):
    manifest = write_manifest(photos, GOOD_ROWS.replace("images/2.png,cat,train", "images/2.png,,train"))
    with fails_cleanly(store.root, DataError, f"1 rows of {manifest} have an empty label (line 4: images/2.png,); "
                       "label every image or remove the row"):  # fmt: skip
        download(imagefolder(manifest), store)


def test_an_unknown_split(store, photos):
    manifest = write_manifest(photos, GOOD_ROWS.replace("images/5.png,dog,test", "images/5.png,dog,holdout"))
    with fails_cleanly(store.root, DataError, "1 rows of", "have a split other than train or test (line 7: "
                       "images/5.png,dog); use train or test, or drop the split column"):  # fmt: skip
        download(imagefolder(manifest), store)


def test_one_image_with_two_labels(store, photos):
    manifest = write_manifest(photos, GOOD_ROWS + "images/0.png,dog,train\n")
    with fails_cleanly(store.root, DataError, "2 rows of", "give one image two different labels (line 2: "
                       "images/0.png,cat; line 8: images/0.png,dog); keep one label per path"):  # fmt: skip
        download(imagefolder(manifest), store)


def test_a_single_label(store, photos):
    manifest = write_manifest(photos, "path,label\nimages/0.png,cat\nimages/2.png,cat\n")
    with fails_cleanly(store.root, DataError, "has one label (cat); a classifier needs at least two classes"):
        download(imagefolder(manifest), store)


def test_a_declared_class_with_no_images(store, photos):
    manifest = write_manifest(photos, GOOD_ROWS)
    with fails_cleanly(store.root, DataError, "has no readable images of class(es) bird in the train split"):
        download(imagefolder(manifest, classes=["cat", "dog", "bird"]), store)


def test_a_binary_file_named_csv(store, photos):
    manifest = photos / "labels.csv"
    manifest.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 20)
    with fails_cleanly(store.root, DataError, f"{manifest} is not a readable CSV manifest", "it needs a header row"):
        download(imagefolder(manifest), store)


def test_missing_and_corrupt_files_are_reported_unreadable_then_quarantined_or_failed(store, photos):
    (photos / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = GOOD_ROWS + "images/gone.png,cat,train\n"
    ref = download(imagefolder(write_manifest(photos, rows)), store)

    skipped = read_skipped(assert_published_complete(store, ref))
    assert skipped[["source", "kind"]].to_dict("records") == [
        {"source": "images/1.png", "kind": "unreadable"}, {"source": "images/gone.png", "kind": "unreadable"},
    ]  # fmt: skip
    assert skipped["reason"].tolist()[1] == "file not found"
    validated = validate(ValidateConfig(), ref, store)  # default policy: quarantine
    assert len(pd.read_csv(Path(validated.uri) / "quarantine.csv")) == 2
    with pytest.raises(ValidationFailed, match="2 files in class folders could not be decoded; e.g. images/1.png"):
        validate(ValidateConfig(on_bad_sample="fail"), ref, store)


def test_editing_a_listed_image_makes_a_new_download(store, photos):
    manifest = write_manifest(photos, GOOD_ROWS)
    first = download(imagefolder(manifest), store)
    (photos / "images" / "0.png").write_bytes(image_file((1, 2, 3)))
    second = download(imagefolder(manifest), store)
    assert not second.reused and second.digest != first.digest


@pytest.mark.parametrize("classes", [["cat", "cat"], ["cat"], ["cat", ""]])
def test_a_declared_class_list_that_cannot_be_a_class_set(classes):
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="data.classes: Value error, must list at least two distinct, non-empty"):
        load_config("imagefolder", overrides=["data.uri=labels.csv", f"data.classes=[{', '.join(classes)}]"])
