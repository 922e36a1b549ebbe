"""The export stage on tiny blob models: a checked, batch-dynamic ONNX file in parity with PyTorch, or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import kiln.onnx_export
import tasks.export
from kiln.config import ExportConfig, StoreConfig
from kiln.dataset import publish_dataset, read_split
from kiln.errors import ExportError
from kiln.models import load_model
from kiln.onnx_export import torch_probabilities
from kiln.onnx_tools import ort_session, run_onnx
from kiln.runtime.preprocess import Preprocessing
from kiln.store import ArtifactStore
from tasks.export import MODEL_FILE, PARITY_FILE, PREPROCESS_FILE, STAGE, export
from tests.conftest import copy_outputs, make_blobs_dataset, publish_model

CONFIG = ExportConfig()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One store holding the blobs dataset and a fitted simple_cnn, shared by this module's read-only tests."""
    store = ArtifactStore(tmp_path_factory.mktemp("export") / "store")
    dataset_ref = publish_dataset(store, make_blobs_dataset())
    return store, dataset_ref, publish_model(store, dataset_ref)


@pytest.fixture(scope="module")
def exported(trained):
    store, dataset_ref, model_ref = trained
    return export(CONFIG, model_ref, dataset_ref, store)


@pytest.fixture
def fresh(trained, tmp_path: Path):
    """A private copy of the module's dataset and model, for tests that fail or monkeypatch the stage."""
    store, dataset_ref, model_ref = trained
    copy, (dataset_ref_copy, model_ref_copy) = copy_outputs(store, [dataset_ref, model_ref], tmp_path / "store")
    return copy, dataset_ref_copy, model_ref_copy


def output_dirs(store: ArtifactStore, stage: str) -> list[Path]:
    stage_dir = Path(store.root, stage)
    return sorted(stage_dir.iterdir()) if stage_dir.exists() else []


def test_export_writes_a_checked_model_with_the_probability_interface(trained, exported):
    store, _, model_ref = trained
    out = store.materialize(exported)

    assert sorted(entry.path for entry in store.manifest(exported).files) == [MODEL_FILE, PARITY_FILE, PREPROCESS_FILE]
    onnx.checker.check_model(str(out / MODEL_FILE), full_check=True)
    graph = onnx.load(str(out / MODEL_FILE)).graph
    assert [item.name for item in graph.input] == ["input"]
    assert [item.name for item in graph.output] == ["probabilities"]
    input_dims = [dim.dim_param or dim.dim_value for dim in graph.input[0].type.tensor_type.shape.dim]
    assert input_dims == ["batch", 3, 8, 8]
    assert (out / PREPROCESS_FILE).read_bytes() == (store.materialize(model_ref) / PREPROCESS_FILE).read_bytes()


@pytest.mark.parametrize("batch_size", [1, 7])
def test_exported_model_runs_other_batch_sizes_in_parity_with_pytorch(trained, exported, batch_size):
    store, dataset_ref, model_ref = trained
    out = store.materialize(exported)
    prep = Preprocessing.from_json(json.loads((out / PREPROCESS_FILE).read_text()))
    test_images, _ = read_split(store.materialize(dataset_ref), "test")
    inputs = prep.normalize(test_images[:batch_size])
    classifier, _ = load_model(store.materialize(model_ref))

    onnx_probabilities = run_onnx(ort_session(out / MODEL_FILE), inputs)

    assert onnx_probabilities.shape == (batch_size, 3)
    np.testing.assert_allclose(onnx_probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(onnx_probabilities, torch_probabilities(classifier, inputs), atol=CONFIG.parity_atol)


def test_parity_record_shows_the_gate_was_met(trained, exported):
    store, _, _ = trained
    parity = json.loads((store.materialize(exported) / PARITY_FILE).read_text())
    assert parity["samples"] == 24  # the whole blobs test split: fewer than parity_samples=256
    assert parity["max_abs_diff"] <= CONFIG.parity_atol
    assert parity["top1_agreement"] >= CONFIG.min_top1_agreement
    assert set(parity["max_abs_diff_by_batch_size"]) == {"1", "3"}
    assert parity["exporter"] == "dynamo" and parity["dynamo_error"] is None and parity["opset"] == CONFIG.opset
    metrics = store.manifest(exported).metrics
    assert metrics["exporter"] == "dynamo" and metrics["max_abs_diff"] == parity["max_abs_diff"]


def test_rerun_reuses_the_stored_export(trained, exported):
    store, dataset_ref, model_ref = trained
    again = export(CONFIG, model_ref, dataset_ref, store)
    assert again.reused is True
    assert (again.key, again.digest) == (exported.key, exported.digest)


@pytest.mark.parametrize("family", ["mlp", "lenet", "resnet9"])
def test_every_model_family_exports_in_parity(trained, family):
    store, dataset_ref, _ = trained
    model_ref = publish_model(store, dataset_ref, family, steps=5)
    ref = export(CONFIG, model_ref, dataset_ref, store)
    parity = json.loads((store.materialize(ref) / PARITY_FILE).read_text())
    assert parity["max_abs_diff"] <= CONFIG.parity_atol and parity["top1_agreement"] == 1.0
    assert parity["max_sum_deviation"] < 1e-5


@pytest.mark.parametrize(
    ("distort", "message"),
    [
        (lambda probabilities: probabilities + 1e-3, "exceeds export.parity_atol"),
        (lambda probabilities: np.roll(probabilities, 1, axis=1), "top-1 agreement"),
    ],
    ids=["probabilities-off", "classes-swapped"],
)
def test_parity_failure_raises_and_publishes_nothing(fresh, monkeypatch, distort, message):
    store, dataset_ref, model_ref = fresh
    def distorted_run_onnx(session, inputs, batch_size=256):
        return distort(run_onnx(session, inputs, batch_size))

    monkeypatch.setattr(tasks.export, "run_onnx", distorted_run_onnx)
    with pytest.raises(ExportError, match=message) as failure:
        export(CONFIG, model_ref, dataset_ref, store)

    assert "Nothing was published" in str(failure.value)
    assert store.lookup("export", STAGE.key(CONFIG, {"model": model_ref, "dataset": dataset_ref})) is None
    assert output_dirs(store, "export") == []  # not even a leftover staging directory


def test_falls_back_to_torchscript_when_dynamo_fails_and_records_why(fresh, monkeypatch):
    store, dataset_ref, model_ref = fresh
    def failing_dynamo(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::imaginary")

    monkeypatch.setattr(kiln.onnx_export, "_export_dynamo", failing_dynamo)
    ref = export(CONFIG, model_ref, dataset_ref, store)

    parity = json.loads((store.materialize(ref) / PARITY_FILE).read_text())
    assert parity["exporter"] == "torchscript"
    assert "aten::imaginary" in parity["dynamo_error"]
    assert parity["max_abs_diff"] <= CONFIG.parity_atol
    graph = onnx.load(str(store.materialize(ref) / MODEL_FILE)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_requested_opset_is_the_one_written(trained):
    """Opset 13 is below what the dynamo exporter translates to; the file must still be opset 13."""
    store, dataset_ref, model_ref = trained
    ref = export(ExportConfig(opset=13), model_ref, dataset_ref, store)
    model = onnx.load(str(store.materialize(ref) / MODEL_FILE))
    assert kiln.onnx_export.default_opset(model) == 13
    assert store.manifest(ref).metrics["opset"] == 13


def test_a_dataset_of_another_image_size_is_refused(fresh):
    store, _, model_ref = fresh
    other_dataset = publish_dataset(store, make_blobs_dataset(size=12))
    with pytest.raises(ExportError, match=r"shape \(12, 12, 3\).*trained on \(8, 8, 3\)"):
        export(CONFIG, model_ref, other_dataset, store)
    assert output_dirs(store, "export") == []


def test_export_task_wraps_the_stage_for_prefect(trained, exported):
    store, dataset_ref, model_ref = trained
    ref = tasks.export.export_task.fn(CONFIG, model_ref, dataset_ref, StoreConfig(root=store.url))
    assert ref.reused is True and ref.digest == exported.digest
