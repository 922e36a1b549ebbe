"""The compress stage: every variant is a valid ONNX model that onnxruntime runs, every variant is re-evaluated and
measured, and the policy ships the best qualifying one (fp32 when none qualifies)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

import tasks.compress
from kiln.config import CompressConfig, ExportConfig, StoreConfig
from kiln.dataset import publish_dataset, read_split
from kiln.errors import ConfigError
from kiln.onnx_tools import ort_session, run_onnx
from kiln.runtime.preprocess import Preprocessing
from kiln.store import ArtifactStore, read_json
from tasks.compress import (
    DETAILS_FILE,
    PLOT_FILE,
    REPORT_COLUMNS,
    REPORT_FILE,
    SELECTION_FILE,
    VARIANT_ORDER,
    calibration_images,
    compress,
    variant_file,
)
from tasks.export import export
from tests.conftest import copy_outputs, make_blobs_dataset, publish_model

FAST = {"latency_runs": 5, "throughput_seconds": 0.05, "timing_threads": 1}  # timings need only exist here
CONFIG = CompressConfig(**FAST)  # the default variants: int8_static, int8_dynamic, fp16
EVERYTHING = CompressConfig(variants=list(VARIANT_ORDER), finetune_epochs=1, distill_epochs=2, **FAST)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One store holding the blobs dataset, a fitted simple_cnn and its export, shared by this module."""
    store = ArtifactStore(tmp_path_factory.mktemp("compress") / "store")
    dataset_ref = publish_dataset(store, make_blobs_dataset())
    model_ref = publish_model(store, dataset_ref)
    return store, dataset_ref, model_ref, export(ExportConfig(), model_ref, dataset_ref, store)


@pytest.fixture(scope="module")
def compressed(exported):
    """Every variant, retrained ones included (1 fine-tuning epoch, 2 distillation epochs: validity, not quality)."""
    store, dataset_ref, model_ref, export_ref = exported
    return compress(EVERYTHING, export_ref, dataset_ref, store, model=model_ref)


@pytest.fixture
def fresh(exported, tmp_path: Path):
    """A private copy of the module's dataset and export, for tests that monkeypatch the stage."""
    store, dataset_ref, _, export_ref = exported
    copy, (dataset_ref_copy, export_ref_copy) = copy_outputs(store, [dataset_ref, export_ref], tmp_path / "store")
    return copy, dataset_ref_copy, export_ref_copy


def report_rows(store: ArtifactStore, ref) -> pd.DataFrame:
    return pd.read_csv(store.materialize(ref) / REPORT_FILE)


@pytest.mark.parametrize("variant", VARIANT_ORDER)
def test_every_variant_is_a_valid_onnx_model_that_onnxruntime_runs(exported, compressed, variant):
    store, dataset_ref, _, export_ref = exported
    path = store.materialize(compressed) / variant_file(variant)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [value.name for value in model.graph.input] == ["input"]  # the interface the package stage wraps
    assert [value.name for value in model.graph.output] == ["probabilities"]
    op_types = {node.op_type for node in model.graph.node}
    expected_ops = {"int8_static": {"QuantizeLinear", "DequantizeLinear"}, "distill_int8": {"QuantizeLinear"},
                    "int8_dynamic": {"MatMulInteger"}}.get(variant, set())  # fmt: skip
    assert expected_ops <= op_types
    if variant == "fp16":
        assert any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in model.graph.initializer)

    prep = Preprocessing.from_json(read_json(store.materialize(export_ref) / "preprocess.json"))
    test_images, _ = read_split(store.materialize(dataset_ref), "test")
    session = ort_session(path)
    for batch_size in (1, 7):
        probabilities = run_onnx(session, prep.normalize(test_images[:batch_size]))
        assert probabilities.shape == (batch_size, 3) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)  # the softmax stayed in float


def test_report_has_one_sane_row_per_variant_matching_the_saved_predictions(exported, compressed):
    store, dataset_ref, _, export_ref = exported
    out, export_dir = store.materialize(compressed), store.materialize(export_ref)
    rows = report_rows(store, compressed).set_index("variant")
    _, test_labels = read_split(store.materialize(dataset_ref), "test")

    assert list(pd.read_csv(out / REPORT_FILE).columns) == list(REPORT_COLUMNS)
    assert list(rows.index) == ["fp32", *VARIANT_ORDER]
    fp32_predictions = np.load(out / "predictions.fp32.npy")
    for variant in rows.index:
        predictions = np.load(out / f"predictions.{variant}.npy")
        assert predictions.dtype == np.int64 and predictions.shape == test_labels.shape  # the full test set
        row = rows.loc[variant]
        assert row["accuracy"] == pytest.approx(np.mean(predictions == test_labels))
        assert row["agreement_with_fp32"] == pytest.approx(np.mean(predictions == fp32_predictions))
        assert row["accuracy_drop"] == pytest.approx(rows.loc["fp32", "accuracy"] - row["accuracy"])
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["throughput_ips"] > 0
        assert row["size_bytes"] == ((export_dir if variant == "fp32" else out) / row["file"]).stat().st_size
        assert row["params"] > 0 and row["macs"] > 0 and isinstance(row["note"], str) and row["note"]
    assert rows.loc["fp32", "agreement_with_fp32"] == 1.0 and rows.loc["fp32", "throughput_vs_fp32"] == 1.0
    assert rows.loc["fp32", "accuracy"] >= 0.9  # the fixture model has learned the blobs
    assert rows["pareto"].any()


def test_each_variant_shrinks_what_it_claims_to(exported, compressed):
    store, *_ = exported
    rows = report_rows(store, compressed).set_index("variant")
    fp32 = rows.loc["fp32"]
    # Quantization and fp16 store the same network in fewer bytes.
    assert fp32["size_bytes"] > 2.5 * rows.loc["int8_static", "size_bytes"]  # int8 weights: about 4x smaller
    assert fp32["size_bytes"] > 1.7 * rows.loc["fp16", "size_bytes"]
    assert fp32["size_bytes"] > rows.loc["int8_dynamic", "size_bytes"]  # only the linear layers are int8
    for variant in ("int8_static", "int8_dynamic", "fp16"):
        assert (rows.loc[variant, "params"], rows.loc[variant, "macs"]) == (fp32["params"], fp32["macs"])
    # Structured pruning makes a smaller network: fewer weights and fewer multiply-accumulates.
    assert rows.loc["prune_structured", "params"] < 0.75 * fp32["params"]
    assert rows.loc["prune_structured", "macs"] < 0.75 * fp32["macs"]
    # Unstructured pruning only zeroes weights: same dense size and arithmetic, but the file compresses better.
    sparse = rows.loc["prune_unstructured"]
    assert sparse["zero_weight_fraction"] >= EVERYTHING.sparsity - 0.01 and fp32["zero_weight_fraction"] < 0.01
    for column in ("params", "macs", "size_bytes"):
        assert sparse[column] == fp32[column]
    assert sparse["gzip_size_bytes"] < 0.8 * fp32["gzip_size_bytes"]
    assert "no faster" in sparse["note"]
    # The student is a quarter of the teacher or less; its int8 copy has the same network in fewer bytes.
    assert rows.loc["distill", "params"] <= 0.3 * fp32["params"]
    assert rows.loc["distill_int8", "params"] == rows.loc["distill", "params"]
    assert rows.loc["distill_int8", "size_bytes"] < rows.loc["distill", "size_bytes"]


def test_variants_json_says_how_each_retrained_variant_was_made(exported, compressed):
    store, *_ = exported
    out = store.materialize(compressed)
    details = read_json(out / DETAILS_FILE)
    widths = details["prune_structured"]["channel_widths"]
    assert widths and all(group["after"] < group["before"] for group in widths)
    assert details["prune_unstructured"]["weight_sparsity"] == pytest.approx(EVERYTHING.sparsity, abs=0.01)
    assert details["distill"]["student"] == "simple_cnn at width 0.45" and details["distill"]["params_ratio"] <= 0.3
    for variant, epochs in (("prune_structured", 1), ("prune_unstructured", 1), ("distill", 2)):
        assert len(pd.read_csv(out / f"history.{variant}.csv")) == epochs
    assert "teacher_agreement" in pd.read_csv(out / "history.distill.csv")
    scratch = Path(store.root) / ".scratch" / "compress"
    assert not scratch.exists() or not any(scratch.iterdir())  # the retraining checkpoints are gone once published


class Killed(Exception):
    pass


def test_a_compress_killed_during_distillation_resumes_it(exported, tmp_path, monkeypatch, caplog):
    import logging

    store, *refs = exported
    copy, (dataset_ref, model_ref, export_ref) = copy_outputs(store, refs, tmp_path / "store")
    config = CompressConfig(variants=["distill"], distill_epochs=3, **FAST)
    log_epoch = tasks.compress._log_epoch

    def killed_after_epoch_1(name, epochs):
        def on_epoch(row):
            if row["epoch"] == 1:
                raise Killed
        return on_epoch

    monkeypatch.setattr(tasks.compress, "_log_epoch", killed_after_epoch_1)
    with pytest.raises(Killed):
        compress(config, export_ref, dataset_ref, copy, model=model_ref)
    monkeypatch.setattr(tasks.compress, "_log_epoch", log_epoch)
    with caplog.at_level(logging.INFO, logger="kiln"):
        ref = compress(config, export_ref, dataset_ref, copy, model=model_ref)
    assert "resuming from the checkpoint after epoch 1 of 3" in caplog.text
    assert list(pd.read_csv(copy.materialize(ref) / "history.distill.csv")["epoch"]) == [1, 2, 3]


def test_a_variant_that_fails_its_export_check_is_retrained_on_retry(exported, tmp_path, monkeypatch, caplog):
    """Its finished training is not resumed: a retry would only reach the same failure again."""
    import logging

    store, *refs = exported
    copy, (dataset_ref, model_ref, export_ref) = copy_outputs(store, refs, tmp_path / "store")
    config = CompressConfig(variants=["distill"], distill_epochs=1, **FAST)

    def failing_check(self, model, path):
        raise Killed("parity check failed")

    monkeypatch.setattr(tasks.compress._Builder, "_export_checked", failing_check)
    with pytest.raises(Killed):
        compress(config, export_ref, dataset_ref, copy, model=model_ref)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="kiln"):
        compress(config, export_ref, dataset_ref, copy, model=model_ref)
    assert "resuming from the checkpoint" not in caplog.text


def test_selection_ships_a_qualifying_variant_and_records_why(exported, compressed):
    store, *_ = exported
    out = store.materialize(compressed)
    rows = report_rows(store, compressed).set_index("variant")
    selection = read_json(out / SELECTION_FILE)
    chosen = selection["chosen"]

    qualifying = rows[rows["qualifies"]]
    assert set(qualifying.index) == set(selection["candidates"]) and chosen in selection["candidates"]
    assert rows.loc[chosen, "p50_ms"] == qualifying["p50_ms"].min()  # objective latency: the fastest of them
    assert (qualifying["accuracy_drop"] <= EVERYTHING.max_accuracy_drop + 1e-9).all()
    assert "fp16" not in selection["candidates"] and "exclude_from_selection" in selection["rejected"]["fp16"]
    expected_dir = store.materialize(exported[3]) if chosen == "fp32" else out
    assert (expected_dir / selection["file"]).is_file()
    assert selection["stage"] == ("export" if chosen == "fp32" else "compress")
    assert selection["objective"] == "latency" and selection["reason"].endswith(".")
    assert store.manifest(compressed).metrics["chosen"] == chosen
    assert store.manifest(compressed).metrics["prune_structured_macs"] == rows.loc["prune_structured", "macs"]
    files = {entry.path for entry in store.manifest(compressed).files}
    assert PLOT_FILE in files and "model.fp32.onnx" not in files
    assert (out / PLOT_FILE).read_bytes().startswith(b"\x89PNG")


def test_fp32_ships_when_every_variant_loses_too_much_accuracy(fresh, monkeypatch):
    """A compressor that broke the models: every variant's classes come out shifted by one."""
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
        return session if Path(path).name == "model.fp32.onnx" else ShiftedClasses(session)

    monkeypatch.setattr(tasks.compress, "ort_session", session_for)
    ref = compress(CONFIG, export_ref, dataset_ref, store)

    rows = report_rows(store, ref).set_index("variant")
    assert (rows.drop(index="fp32")["accuracy_drop"] > CONFIG.max_accuracy_drop).all()
    assert (rows.drop(index="fp32")["agreement_with_fp32"] < 0.5).all()
    selection = read_json(store.materialize(ref) / SELECTION_FILE)
    assert (selection["chosen"], selection["file"], selection["stage"]) == ("fp32", "model.fp32.onnx", "export")
    assert selection["candidates"] == ["fp32"] and selection["reason"].startswith("No compressed variant qualifies")
    assert "compress.max_accuracy_drop" in selection["rejected"]["int8_static"]
    assert store.manifest(ref).metrics["chosen"] == "fp32"


def test_no_variants_reports_only_fp32_and_ships_it(exported):
    store, dataset_ref, _, export_ref = exported
    for config in (CompressConfig(variants=[], **FAST), CompressConfig(method="none", **FAST)):  # method: the old key
        ref = compress(config, export_ref, dataset_ref, store)
        out = store.materialize(ref)
        assert list(report_rows(store, ref)["variant"]) == ["fp32"]
        assert not list(out.glob("model.*.onnx")) and not (out / "predictions.int8_static.npy").exists()
        selection = read_json(out / SELECTION_FILE)
        assert (selection["chosen"], selection["stage"]) == ("fp32", "export")
        assert "compress.variants is empty" in selection["reason"]


def test_retrained_variants_need_the_train_output(exported):
    store, dataset_ref, _, export_ref = exported
    with pytest.raises(ConfigError, match=r"\['prune_structured'\] retrain from the trained model.*model="):
        compress(CompressConfig(variants=["int8_static", "prune_structured"]), export_ref, dataset_ref, store)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods_quantize_too(exported, method):
    store, dataset_ref, _, export_ref = exported
    config = CompressConfig(variants=["int8_static"], calibrate_method=method, per_channel=False, **FAST)
    ref = compress(config, export_ref, dataset_ref, store)
    op_types = {node.op_type for node in onnx.load(str(store.materialize(ref) / "model.int8_static.onnx")).graph.node}
    assert "QuantizeLinear" in op_types
    assert list(report_rows(store, ref)["variant"]) == ["fp32", "int8_static"]


def test_calibration_images_are_a_deterministic_stratified_sample(blobs):
    prep = Preprocessing(8, 8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    first = calibration_images(blobs.train_images, blobs.train_labels, 12, prep)
    again = calibration_images(blobs.train_images, blobs.train_labels, 12, prep)
    assert first.shape == (12, 3, 8, 8) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    everything = calibration_images(blobs.train_images, blobs.train_labels, 10_000, prep)
    assert len(everything) == len(blobs.train_labels)  # asking for more than exists uses all of them


def test_rerun_reuses_the_stored_output(exported, compressed):
    store, dataset_ref, model_ref, export_ref = exported
    again = compress(EVERYTHING, export_ref, dataset_ref, store, model=model_ref)
    assert again.reused is True and again.digest == compressed.digest


def test_compress_task_wraps_the_stage_for_prefect(exported, compressed):
    store, dataset_ref, model_ref, export_ref = exported
    store_config = StoreConfig(root=store.url)
    ref = tasks.compress.compress_task.fn(EVERYTHING, export_ref, dataset_ref, store_config, model=model_ref)
    assert ref.reused is True and ref.digest == compressed.digest


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"variants": ["int8_static", "int8_static"]}, "lists int8_static more than once"),
        ({"variants": ["distill_int8"]}, "add distill to the list too"),
        ({"variants": ["int4"]}, "Input should be 'int8_static'"),
        ({"objective": "speed"}, "Input should be 'latency', 'throughput' or 'size'"),
        ({"prune_amount": 1.0}, "less than 1"),
    ],
)
def test_config_rejects_bad_compression_settings(overrides, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        CompressConfig(**overrides)
