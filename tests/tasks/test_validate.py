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
from kiln.dataset import ImageDataset, publish_dataset, write_dataset
from kiln.errors import ValidationFailed
from kiln.stage import Stage
from kiln.store import ArtifactRef, ArtifactStore, read_json
from tasks import validate as validate_module
from tasks.validate import validate, validate_task


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
    # table-level: schema, no nulls in each of the 10 columns, split values; 9 per split; kiln's count check per split,
    # class balance, leakage, unreadable files (no reference: no drift check)
    assert summary["expectations_evaluated"] == len(results) == 12 + 2 * 9 + 2 + 3
    assert (summary["quarantined_files"], summary["leaked_test_samples"], "drift" in summary) == (0, 0, False)
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
    assert "2 of 35 data checks failed" in message
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
    assert "1 of 35 data checks failed" in message
    assert "test: kiln_min_samples_per_class(label): classes with fewer than 10 samples: class_0: 8, " in message
    assert "or lower validate.min_samples_per_class" in message
    assert _published_validate_outputs(store) == []


def test_blank_images_beyond_mostly_fail_and_within_mostly_pass(store, blobs):
    train_images = blobs.train_images.copy()
    train_images[:8] = np.arange(100, 108, dtype=np.uint8)[:, None, None, None]  # 8 of 72 (11%): constant, std 0
    dataset_ref = publish_dataset(store, _variant(blobs, "blobs-blank", train_images=train_images))

    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(mostly=0.99), dataset_ref, store)
    message = str(failure.value)
    assert "1 of 35 data checks failed" in message
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
    assert "- checks: 35 passed, 0 failed" in lines
    assert "- train: 72 samples, at least 24 per class" in lines
    index_uri = (Path(ref.uri) / "data_docs" / "index.html").as_uri()
    assert f"- Data Docs: [{index_uri}]({index_uri})" in lines


def test_images_on_the_wrong_scale_fail_the_peak_pixel_check(store, blobs):
    """Digits left in 0..16 (or floats 0..1 cast to uint8) pass every per-row check but never get bright."""
    dark = _variant(blobs, "unscaled", train_images=blobs.train_images // 16, test_images=blobs.test_images // 16)
    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(min_pixel_std=0.1), publish_dataset(store, dark), store)
    assert "expect_column_max_to_be_between(max)" in str(failure.value)


def test_train_test_leakage_fails_with_counts_and_examples_unless_allowed(store, blobs):
    leaky = _variant(blobs, "leaky", test_images=np.concatenate([blobs.train_images[:2], blobs.test_images[2:]]))
    leaky_ref = publish_dataset(store, leaky)

    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(), leaky_ref, store)

    message = str(failure.value)
    assert "1 of 35 data checks failed" in message
    assert (
        "test: kiln_no_train_test_leakage(content_hash): 2 test images (8.33%) are exact copies of training images "
        "(limit 0.00%); e.g. leaky:test:0 = leaky:train:0, leaky:test:1 = leaky:train:1"
    ) in message
    assert "fix: remove those images from the test split (or from train)" in message
    assert _published_validate_outputs(store) == []

    ref = validate(ValidateConfig(max_leaked_fraction=0.1), leaky_ref, store)
    assert read_json(store.materialize(ref) / "summary.json")["leaked_test_samples"] == 2


def test_exact_duplicates_within_a_split_fail_beyond_the_allowed_share(store, blobs):
    train_images = blobs.train_images.copy()
    train_images[1] = train_images[0]  # 2 of 72 training images (2.8 %) have a copy
    duplicated = publish_dataset(store, _variant(blobs, "dups", train_images=train_images))

    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(), duplicated, store)

    message = str(failure.value)
    assert "train: expect_column_values_to_be_unique(content_hash): 2 unexpected rows (2.78% of rows)" in message
    assert "'source': 'dups:train:0'}" in message and "'source': 'dups:train:1'}" in message
    assert "fix: remove the duplicated images from the source (the examples name some)" in message
    validate(ValidateConfig(max_duplicate_fraction=0.05), duplicated, store)  # passes


def test_class_imbalance_beyond_the_ratio_fails(store, blobs):
    keep = np.flatnonzero((blobs.train_labels != 0) | (np.arange(len(blobs.train_labels)) % 12 == 0))  # class_0: 2
    lopsided = _variant(blobs, "lopsided", train_images=blobs.train_images[keep], train_labels=blobs.train_labels[keep])
    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(), publish_dataset(store, lopsided), store)
    message = str(failure.value)
    assert "train: kiln_class_balance(label): the largest class has 12.0x the samples of the smallest (limit 10.0)" in message
    assert "class_0: 2" in message and "or raise validate.max_class_ratio" in message


def _with_unreadable_files(store: ArtifactStore, blobs: ImageDataset) -> ArtifactRef:
    skipped = [
        {"source": "cat/broken.jpg", "reason": "corrupt or truncated image (OSError: image file is truncated)",
         "kind": "unreadable"},
        {"source": "README.txt", "reason": "not inside a class folder"},
    ]  # fmt: skip
    return Stage("download", "kiln.dataset").produce(
        store, DataConfig(source="imagefolder", uri="fixture://unreadable"), {},
        lambda out_dir: write_dataset(out_dir, blobs, skipped),
    )  # fmt: skip


def test_unreadable_files_are_quarantined_and_listed_by_default(store, blobs):
    ref = validate(ValidateConfig(), _with_unreadable_files(store, blobs), store)

    directory = store.materialize(ref)
    quarantine = pd.read_csv(directory / "quarantine.csv")
    assert quarantine.to_dict("records") == [
        {"source": "cat/broken.jpg", "reason": "corrupt or truncated image (OSError: image file is truncated)"}
    ]  # the loose README is not a bad sample: it was never part of the dataset
    assert read_json(directory / "summary.json")["quarantined_files"] == 1
    assert store.manifest(ref).metrics["quarantined_files"] == 1


def test_unreadable_files_fail_the_stage_when_the_policy_says_so(store, blobs):
    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(on_bad_sample="fail"), _with_unreadable_files(store, blobs), store)
    message = str(failure.value)
    assert (
        "all: kiln_no_unreadable_files(source): 1 files in class folders could not be decoded; e.g. "
        "cat/broken.jpg: corrupt or truncated image"
    ) in message
    assert "fix: replace or delete the listed files, or set validate.on_bad_sample=quarantine" in message
    assert _published_validate_outputs(store) == []


def test_drift_from_the_reference_data_is_measured_per_channel_and_warned_or_failed_by_policy(store, blobs):
    reference = publish_dataset(store, blobs)
    tinted = blobs.train_images.copy()
    tinted[..., 0] = tinted[..., 0] // 3  # much less red
    current = publish_dataset(store, _variant(blobs, "tinted", train_images=tinted))

    ref = validate(ValidateConfig(), current, store, reference)

    directory = store.materialize(ref)
    drift = read_json(directory / "drift.json")
    assert drift["reference"]["digest"] == reference.digest
    assert drift["comparison"]["channel_brightness_ks"][0] > 0.5 and drift["comparison"]["channel_brightness_ks"][1] == 0
    assert drift["findings"][0].startswith("brightness drifted: KS statistic")
    assert store.manifest(ref).inputs["reference"]["digest"] == reference.digest
    assert validate(ValidateConfig(), current, store).key != ref.key  # the reference is part of what is validated

    with pytest.raises(ValidationFailed) as failure:
        validate(ValidateConfig(on_drift="fail"), current, store, reference)
    message = str(failure.value)
    assert "train: kiln_drift_vs_reference(): against production's data: brightness drifted: KS statistic" in message
    assert "set validate.on_drift=warn or raise the validate.max_* drift limits" in message

    same = validate(ValidateConfig(on_drift="fail"), reference, store, reference)
    assert read_json(store.materialize(same) / "drift.json")["findings"] == []


def test_task_reports_quarantine_leakage_and_drift(store, blobs, monkeypatch):
    reported: list[list[str]] = []
    monkeypatch.setattr(validate_module, "report", lambda _ref, _store, _title, lines: reported.append(lines))
    reference = publish_dataset(store, blobs)
    darker = publish_dataset(store, _variant(blobs, "darker", train_images=blobs.train_images // 2))

    validate_task.fn(ValidateConfig(), darker, StoreConfig(root=store.url), reference)

    [lines] = reported
    assert "- unreadable files quarantined (left out, listed in quarantine.csv): 0" in lines
    assert "- test images also in train (leakage): 0" in lines
    drift_line = next(line for line in lines if line.startswith("- drift against production's data"))
    assert "brightness drifted" in drift_line and "contrast drifted" in drift_line
    assert any(line.startswith("  | brightness KS per channel |") for line in lines)
