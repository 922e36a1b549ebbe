"""The compress stage: a valid QDQ int8 model, a re-evaluation of every variant, and an honest choice between them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

import tasks.compress
from kiln.config import CompressConfig, ExportConfig, StoreConfig
from kiln.dataset import read_split
from kiln.onnx_tools import ort_session, run_onnx
from kiln.runtime.preprocess import Preprocessing
from kiln.store import ArtifactStore, read_json
from tasks.compress import (
    INT8_FILE,
    REPORT_COLUMNS,
    REPORT_FILE,
    SELECTION_FILE,
    calibration_images,
    compress,
    select_variant,
)
from tasks.export import export
from tests.conftest import copy_outputs, make_blobs_dataset, publish_dataset, publish_model

CONFIG = CompressConfig(latency_runs=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One store holding the blobs dataset, a fitted simple_cnn and its export, shared by this module."""
    store = ArtifactStore(tmp_path_factory.mktemp("compress") / "store")
    dataset_ref = publish_dataset(store, make_blobs_dataset())
    model_ref = publish_model(store, dataset_ref)
    return store, dataset_ref, export(ExportConfig(), model_ref, dataset_ref, store)


@pytest.fixture(scope="module")
def compressed(exported):
    store, dataset_ref, export_ref = exported
    return compress(CONFIG, export_ref, dataset_ref, store)


@pytest.fixture
def fresh(exported, tmp_path: Path):
    """A private copy of the module's dataset and export, for tests that monkeypatch the stage."""
    store, dataset_ref, export_ref = exported
    copy, (dataset_ref_copy, export_ref_copy) = copy_outputs(store, [dataset_ref, export_ref], tmp_path / "store")
    return copy, dataset_ref_copy, export_ref_copy


def report_rows(store: ArtifactStore, ref) -> pd.DataFrame:
    return pd.read_csv(store.materialize(ref) / REPORT_FILE)


def test_int8_model_is_a_valid_qdq_graph_that_onnxruntime_runs(exported, compressed):
    store, dataset_ref, export_ref = exported
    out = store.materialize(compressed)
    onnx.checker.check_model(str(out / INT8_FILE), full_check=True)
    op_types = {node.op_type for node in onnx.load(str(out / INT8_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types

    prep = Preprocessing.from_json(read_json(store.materialize(export_ref) / "preprocess.json"))
    test_images, _ = read_split(store.materialize(dataset_ref), "test")
    session = ort_session(out / INT8_FILE)
    for batch_size in (1, 7):
        probabilities = run_onnx(session, prep.normalize(test_images[:batch_size]))
        assert probabilities.shape == (batch_size, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)  # the softmax stayed in float
    assert "model.fp32.onnx" not in {entry.path for entry in store.manifest(compressed).files}


def test_report_has_one_sane_row_per_variant_matching_the_saved_predictions(exported, compressed):
    store, dataset_ref, _ = exported
    out = store.materialize(compressed)
    rows = report_rows(store, compressed).set_index("variant")
    _, test_labels = read_split(store.materialize(dataset_ref), "test")

    assert list(pd.read_csv(out / REPORT_FILE).columns) == list(REPORT_COLUMNS)
    assert list(rows.index) == ["fp32", "int8"]
    for variant in ("fp32", "int8"):
        predictions = np.load(out / f"predictions.{variant}.npy")
        assert predictions.dtype == np.int64 and predictions.shape == test_labels.shape
        assert rows.loc[variant, "accuracy"] == pytest.approx(np.mean(predictions == test_labels))
        assert rows.loc[variant, "p50_ms"] > 0 and rows.loc[variant, "p50_ms"] <= rows.loc[variant, "p95_ms"]
        assert rows.loc[variant, "throughput_ips"] > 0
    fp32_predictions = np.load(out / "predictions.fp32.npy")
    int8_predictions = np.load(out / "predictions.int8.npy")
    assert rows.loc["int8", "agreement_with_fp32"] == pytest.approx(np.mean(int8_predictions == fp32_predictions))
    assert rows.loc["fp32", "agreement_with_fp32"] == 1.0
    assert rows.loc["fp32", "accuracy"] >= 0.9  # the fixture model has learned the blobs
    assert rows.loc["fp32", "size_bytes"] > 2.5 * rows.loc["int8", "size_bytes"]  # int8 weights: about 4x smaller
    assert rows.loc["fp32", "params"] == rows.loc["int8", "params"] > 0


def test_int8_is_chosen_when_its_accuracy_drop_is_within_budget(exported, compressed):
    store, _, _ = exported
    rows = report_rows(store, compressed).set_index("variant")
    assert rows.loc["fp32", "accuracy"] - rows.loc["int8", "accuracy"] <= CONFIG.max_accuracy_drop

    selection = read_json(store.materialize(compressed) / SELECTION_FILE)
    assert (selection["chosen"], selection["file"], selection["stage"]) == ("int8", INT8_FILE, "compress")
    assert "within" in selection["reason"]
    metrics = store.manifest(compressed).metrics
    assert metrics["chosen"] == "int8"
    assert metrics["int8_size_bytes"] == rows.loc["int8", "size_bytes"]
    assert metrics["fp32_accuracy"] == rows.loc["fp32", "accuracy"]


def test_fp32_is_chosen_when_int8_loses_too_much_accuracy(fresh, monkeypatch):
    """A quantizer that broke the model: the int8 session's classes come out shifted by one."""
    store, dataset_ref, export_ref = fresh

    class ShiftedClasses:
        def __init__(self, session):
            self.session = session

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, outputs, feed):
            return [np.roll(result, 1, axis=1) for result in self.session.run(outputs, feed)]

    def session_for(path, threads=None):
        session = ort_session(path, threads)
        return ShiftedClasses(session) if Path(path).name == INT8_FILE else session

    monkeypatch.setattr(tasks.compress, "ort_session", session_for)
    ref = compress(CONFIG, export_ref, dataset_ref, store)

    rows = report_rows(store, ref).set_index("variant")
    assert rows.loc["fp32", "accuracy"] - rows.loc["int8", "accuracy"] > CONFIG.max_accuracy_drop
    assert rows.loc["int8", "agreement_with_fp32"] < 0.5
    selection = read_json(store.materialize(ref) / SELECTION_FILE)
    assert (selection["chosen"], selection["file"], selection["stage"]) == ("fp32", "model.fp32.onnx", "export")
    assert "compress.max_accuracy_drop" in selection["reason"]
    assert store.manifest(ref).metrics["chosen"] == "fp32"


def make_row(variant: str, accuracy: float, size_bytes: int) -> dict:
    return {"variant": variant, "accuracy": accuracy, "size_bytes": size_bytes}


@pytest.mark.parametrize(
    ("fp32_accuracy", "int8_accuracy", "budget", "chosen"),
    [
        (0.97, 0.96, 0.01, "int8"),  # exactly at the budget (0.97 - 0.96 is 0.01000...09 in floats)
        (0.97, 0.955, 0.01, "fp32"),
        (0.90, 0.91, 0.0, "int8"),  # int8 better than fp32
        (0.90, 0.90, 0.0, "int8"),
        (0.90, 0.8999, 0.0, "fp32"),
    ],
)
def test_select_variant_applies_the_accuracy_budget(fp32_accuracy, int8_accuracy, budget, chosen):
    rows = [make_row("fp32", fp32_accuracy, 400), make_row("int8", int8_accuracy, 100)]
    selection = select_variant(rows, CompressConfig(max_accuracy_drop=budget))
    assert selection["chosen"] == chosen
    assert selection["accuracy_drop"] == pytest.approx(fp32_accuracy - int8_accuracy)
    assert selection["reason"].endswith(".")


def test_method_none_reports_only_fp32_and_ships_it(exported):
    store, dataset_ref, export_ref = exported
    ref = compress(CompressConfig(method="none", latency_runs=3), export_ref, dataset_ref, store)
    out = store.materialize(ref)
    assert list(report_rows(store, ref)["variant"]) == ["fp32"]
    assert not (out / INT8_FILE).exists() and not (out / "predictions.int8.npy").exists()
    selection = read_json(out / SELECTION_FILE)
    assert (selection["chosen"], selection["stage"]) == ("fp32", "export")
    assert "compress.method=none" in selection["reason"]


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods_quantize_too(exported, method):
    store, dataset_ref, export_ref = exported
    config = CompressConfig(calibrate_method=method, per_channel=False, latency_runs=3)
    ref = compress(config, export_ref, dataset_ref, store)
    op_types = {node.op_type for node in onnx.load(str(store.materialize(ref) / INT8_FILE)).graph.node}
    assert "QuantizeLinear" in op_types
    assert set(report_rows(store, ref)["variant"]) == {"fp32", "int8"}


def test_calibration_images_are_a_deterministic_stratified_sample(blobs):
    prep = Preprocessing(8, 8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    first = calibration_images(blobs.train_images, blobs.train_labels, 12, prep)
    again = calibration_images(blobs.train_images, blobs.train_labels, 12, prep)
    assert first.shape == (12, 3, 8, 8) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    everything = calibration_images(blobs.train_images, blobs.train_labels, 10_000, prep)
    assert len(everything) == len(blobs.train_labels)  # asking for more than exists uses all of them


def test_rerun_reuses_the_stored_output(exported, compressed):
    store, dataset_ref, export_ref = exported
    again = compress(CONFIG, export_ref, dataset_ref, store)
    assert again.reused is True and again.digest == compressed.digest


def test_compress_task_wraps_the_stage_for_prefect(exported, compressed):
    store, dataset_ref, export_ref = exported
    ref = tasks.compress.compress_task.fn(CONFIG, export_ref, dataset_ref, StoreConfig(root=store.url))
    assert ref.reused is True and ref.digest == compressed.digest
