"""The validate stage: Great Expectations checks on samples.csv, Data Docs, and nothing published on failure."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kiln.config import DataConfig, StoreConfig, ValidateConfig
from kiln.dataset import ImageDataset, write_dataset
from kiln.errors import ValidationFailed
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json
from tasks import validate as validate_module
from tasks.validate import validate, validate_task
from tests.conftest import publish_dataset


def _variant(blobs: ImageDataset, name: str, **arrays: np.ndarray) -> ImageDataset:
    fields = {key: getattr(blobs, key) for key in ("train_images", "train_labels", "test_images", "test_labels")}
    return ImageDataset(name, blobs.classes, **{**fields, **arrays})


def _text_of(page: Path) -> str:
    """The visible text of an HTML page: tags and scripts dropped, whitespace collapsed."""
    body = re.sub(r"<script.*?</script>", " ", page.read_text(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def _published_validate_outputs(store: ArtifactStore) -> list[Path]:
    folder = Path(store.root, "validate")
    return sorted(folder.iterdir()) if folder.exists() else []


def test_good_dataset_passes_with_results_summary_and_data_docs(store, dataset_ref):
    ref = validate(ValidateConfig(), dataset_ref, store)

    directory = store.materialize(ref)
    summary, results = read_json(directory / "summary.json"), read_json(directory / "results.json")
    assert summary["success"] is True
    assert summary["counts"] == {"train": 72, "test": 24}
    assert summary["samples_per_class"]["test"] == {"class_0": 8, "class_1": 8, "class_2": 8}
    # table-level: schema, no nulls in each of the 10 columns, split values; 8 per split; kiln's count check per split
    assert summary["expectations_evaluated"] == len(results) == 12 + 2 * 8 + 2
    assert all(entry["success"] for entry in results)
    std_checks = [entry for entry in results if entry["column"] == "std" and "between" in entry["expectation"]]
    assert [entry["split"] for entry in std_checks] == ["train", "test"]
    assert std_checks[0]["kwargs"]["min_value"] == 1.0 and std_checks[0]["kwargs"]["mostly"] == 0.99
    schema = next(entry for entry in results if entry["expectation"] == "expect_table_columns_to_match_ordered_list")
    assert schema["split"] == "all" and schema["observed_value"][0] == "split"

    metrics = store.manifest(ref).metrics
    assert metrics["expectations_evaluated"] == len(results) and metrics["expectations_failed"] == 0
    assert (metrics["train_samples"], metrics["test_samples"]) == (72, 24)
    assert metrics["smallest_class_size"] == {"train": 24, "test": 8}

    index = (directory / "data_docs" / "index.html").read_text()
    train_page = directory / summary["data_docs"]["pages"]["train"]
    assert "samples_per_split" in index and "validations/samples_per_split/train/" in index
    std_rendered = "values must be greater than or equal to 1.0 and less than or equal to 255.0 , at least 99 %"
    assert std_rendered in _text_of(train_page)
    docs_bytes = sum(path.stat().st_size for path in (directory / "data_docs").rglob("*") if path.is_file())
    assert docs_bytes < 1_000_000  # GX's unused fonts and GIFs were pruned


def test_second_call_is_reused(store, dataset_ref):
    first = validate(ValidateConfig(), dataset_ref, store)
    second = validate(ValidateConfig(), dataset_ref, store)

    assert (first.reused, second.reused) == (False, True)
    assert (second.key, second.digest) == (first.key, first.digest)


def test_writes_nothing_outside_the_store(store, dataset_ref, tmp_path, monkeypatch):
    working_dir = tmp_path / "cwd"
    working_dir.mkdir()
    monkeypatch.chdir(working_dir)

    validate(ValidateConfig(), dataset_ref, store)

    assert list(working_dir.iterdir()) == []  # no gx/ project, no uncommitted/ data docs


def test_class_missing_from_test_fails_naming_class_and_split_and_publishes_nothing(store, blobs):
    keep = blobs.test_labels != 2
    test_images, test_labels = blobs.test_images[keep], blobs.test_labels[keep]
    dataset = _variant(blobs, "no-test-class-2", test_images=test_images, test_labels=test_labels)
    dataset_ref = publish_dataset(store, dataset)

    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(), dataset_ref, store)

    message = str(failure.value)
    assert "2 of 30 data checks failed" in message
    assert "test: expect_column_distinct_values_to_contain_set(label): missing values: 2 (class_2)" in message
    assert "test: kiln_min_samples_per_class(label): classes with fewer than 1 samples: class_2: 0" in message
    assert "train:" not in message
    assert "fix: every class needs samples in both splits" in message
    assert _published_validate_outputs(store) == []
    # ...but the failed run's results and Data Docs are kept where the message says
    kept = re.search(r"Full results: (\S+results.json); Data Docs: file://(\S+index.html)", message)
    assert kept, message
    results = json.loads(Path(kept.group(1)).read_text())
    assert any(not entry["success"] and entry["split"] == "test" for entry in results)
    assert Path(kept.group(2)).is_file()


def test_too_few_samples_per_class_fails_the_kiln_count_check(store, dataset_ref):
    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(min_samples_per_class=10), dataset_ref, store)  # blobs: 24 train, 8 test per class

    message = str(failure.value)
    assert "1 of 30 data checks failed" in message
    assert "test: kiln_min_samples_per_class(label): classes with fewer than 10 samples: class_0: 8, " in message
    assert "or lower validate.min_samples_per_class" in message
    assert _published_validate_outputs(store) == []


def test_blank_images_beyond_mostly_fail_and_within_mostly_pass(store, blobs):
    train_images = blobs.train_images.copy()
    train_images[:8] = 100  # 8 of 72 train images (11%) are constant: pixel std 0
    dataset_ref = publish_dataset(store, _variant(blobs, "blobs-blank", train_images=train_images))

    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(mostly=0.99), dataset_ref, store)
    message = str(failure.value)
    assert "1 of 30 data checks failed" in message
    assert "train: expect_column_values_to_be_between(std): 8 unexpected rows (11.11% of rows)" in message
    assert "expected min_value=1.0, max_value=255.0, mostly=0.99" in message
    assert "'std': 0.0, 'source': 'blobs-blank:train:0'" in message
    assert "validate.min_pixel_std" in message
    assert _published_validate_outputs(store) == []

    tolerant = validate(ValidateConfig(mostly=0.85), dataset_ref, store)
    std_train = next(
        entry
        for entry in read_json(store.materialize(tolerant) / "results.json")
        if entry["column"] == "std" and entry["split"] == "train"
    )
    assert std_train["success"] is True and std_train["unexpected_count"] == 8


def test_labels_out_of_range_fail(store, blobs):
    train_labels = blobs.train_labels.copy()
    train_labels[5] = len(blobs.classes)  # write_dataset does not check label range; validation must
    dataset_ref = publish_dataset(store, _variant(blobs, "blobs-bad-label", train_labels=train_labels))

    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(), dataset_ref, store)

    message = str(failure.value)
    assert "train: expect_column_values_to_be_in_set(label): 1 unexpected rows" in message
    assert "value_set=[0, 1, 2]" in message
    assert "'label': 3, 'source': 'blobs-bad-label:train:5'" in message
    assert "fix: labels must index dataset.json's classes" in message
    assert _published_validate_outputs(store) == []


def test_hand_edited_samples_csv_fails_schema_and_split_checks(store, blobs):
    def write_tampered(out_dir: Path) -> dict:
        metrics = write_dataset(out_dir, blobs)
        samples = pd.read_csv(out_dir / "samples.csv")
        samples.loc[0, "split"] = "val"
        samples.insert(0, "extra", 1)
        samples = samples.drop(columns=["std"])
        samples.to_csv(out_dir / "samples.csv", index=False)
        return metrics

    dataset_ref = Stage("download", "kiln.dataset").produce(
        store, DataConfig(source="imagefolder", uri="fixture://tampered"), {}, write_tampered
    )

    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(), dataset_ref, store)

    message = str(failure.value)
    assert "all: expect_table_columns_to_match_ordered_list(): observed ['extra', 'split'," in message
    assert "all: expect_column_values_to_be_in_set(split): 1 unexpected rows" in message
    assert "'split': 'val'" in message
    assert 'train: expect_column_values_to_be_between(std): could not be evaluated: Error: The column "std"' in message
    assert "fix: samples.csv is not in kiln's canonical format" in message
    assert _published_validate_outputs(store) == []


def test_task_reports_counts_and_a_file_uri_to_the_data_docs(store, dataset_ref, monkeypatch):
    reported: list[tuple[ArtifactRef, list[str]]] = []
    monkeypatch.setattr(validate_module, "report", lambda ref, _store, _title, lines: reported.append((ref, lines)))

    ref = validate_task.fn(ValidateConfig(), dataset_ref, StoreConfig(root=store.url))

    [(reported_ref, lines)] = reported
    assert reported_ref == ref
    assert "- checks: 30 passed, 0 failed" in lines
    assert "- train: 72 samples, at least 24 per class" in lines
    index_uri = (Path(ref.uri) / "data_docs" / "index.html").as_uri()
    assert f"- Data Docs: [{index_uri}]({index_uri})" in lines


def test_images_on_the_wrong_scale_fail_the_peak_pixel_check(store, blobs):
    """Digits left in 0..16 (or floats 0..1 cast to uint8) pass every per-row check but never get bright."""
    dark = _variant(blobs, "unscaled", train_images=blobs.train_images // 16, test_images=blobs.test_images // 16)
    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(min_pixel_std=0.1), publish_dataset(store, dark), store)
    assert "expect_column_max_to_be_between(max)" in str(failure.value)
