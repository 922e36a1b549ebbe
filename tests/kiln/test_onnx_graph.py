"""The raw-image model: uint8 NHWC in, the same probabilities as PyTorch (fp32) and as the tensor-in model (int8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from kiln.config import CompressConfig, ExportConfig
from kiln.dataset import publish_dataset, read_info, read_split
from kiln.errors import ExportError
from kiln.models import load_model
from kiln.onnx_export import torch_probabilities
from kiln.onnx_graph import add_image_preprocessing
from kiln.onnx_tools import ort_session, run_onnx
from kiln.runtime.onnx_runtime import CLASS_INDEX_NAME, RAW_INPUT_NAME
from kiln.runtime.preprocess import Preprocessing
from kiln.store import ArtifactStore, read_json
from tasks.compress import calibration_images, quantize_int8
from tasks.export import MODEL_FILE, PREPROCESS_FILE, export
from tests.conftest import make_blobs_dataset, publish_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("graph") / "store")
    dataset_ref = publish_dataset(store, make_blobs_dataset())
    model_ref = publish_model(store, dataset_ref)
    export_ref = export(ExportConfig(), model_ref, dataset_ref, store)
    export_dir, dataset_dir = store.materialize(export_ref), store.materialize(dataset_ref)
    prep = Preprocessing.from_json(read_json(export_dir / PREPROCESS_FILE))
    classifier, _ = load_model(store.materialize(model_ref))
    return export_dir, dataset_dir, prep, classifier


def run_raw(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities, class_index = ort_session(path).run(None, {RAW_INPUT_NAME: images})
    return probabilities, class_index


def test_raw_fp32_model_matches_pytorch_on_uint8_images(exported, tmp_path: Path):
    export_dir, dataset_dir, prep, classifier = exported
    classes = read_info(dataset_dir).classes
    raw = tmp_path / "raw.onnx"
    add_image_preprocessing(export_dir / MODEL_FILE, prep, raw, classes)
    images, _ = read_split(dataset_dir, "test")

    probabilities, class_index = run_raw(raw, images)
    reference = torch_probabilities(classifier, prep.normalize(images))

    np.testing.assert_allclose(probabilities, reference, atol=1e-5)
    np.testing.assert_array_equal(class_index, reference.argmax(axis=1))
    assert class_index.dtype == np.int64 and class_index.shape == (len(images),)


def test_raw_model_declares_its_signature_and_classes(exported, tmp_path: Path):
    export_dir, dataset_dir, prep, _ = exported
    raw = tmp_path / "raw.onnx"
    add_image_preprocessing(export_dir / MODEL_FILE, prep, raw, ["a", "b", "c"])
    session = ort_session(raw)

    (image,) = session.get_inputs()
    assert (image.name, image.type) == (RAW_INPUT_NAME, "tensor(uint8)")
    assert isinstance(image.shape[0], str) and image.shape[1:] == [prep.height, prep.width, prep.channels]
    assert [(out.name, out.type) for out in session.get_outputs()] == [
        ("probabilities", "tensor(float)"), (CLASS_INDEX_NAME, "tensor(int64)"),
    ]  # fmt: skip
    assert session.get_modelmeta().custom_metadata_map["classes"] == '["a", "b", "c"]'
    for batch in (1, 5):  # the batch axis stays dynamic
        probabilities, class_index = run_raw(raw, np.zeros((batch, prep.height, prep.width, prep.channels), np.uint8))
        assert probabilities.shape == (batch, 3) and class_index.shape == (batch,)


def test_raw_int8_model_computes_exactly_the_tensor_in_int8_model(exported, tmp_path: Path):
    """Preprocessing in the graph mirrors numpy's float32 steps, so even a quantized model sees identical input."""
    export_dir, dataset_dir, prep, _ = exported
    train_images, train_labels = read_split(dataset_dir, "train")
    int8 = tmp_path / "model.int8.onnx"
    quantize_int8(export_dir / MODEL_FILE, int8, calibration_images(train_images, train_labels, 32, prep), CompressConfig())
    raw = tmp_path / "raw.int8.onnx"
    add_image_preprocessing(int8, prep, raw, read_info(dataset_dir).classes)
    images, _ = read_split(dataset_dir, "test")

    probabilities, class_index = run_raw(raw, images)
    reference = run_onnx(ort_session(int8), prep.normalize(images))

    np.testing.assert_array_equal(probabilities, reference)
    np.testing.assert_array_equal(class_index, reference.argmax(axis=1))


def test_a_model_without_the_tensor_in_interface_is_refused(exported, tmp_path: Path):
    export_dir, _, prep, _ = exported
    model = onnx.load(str(export_dir / MODEL_FILE))
    model.graph.input[0].name = "pixels"
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model, str(renamed))
    with pytest.raises(ExportError, match="expected \\['input'\\]"):
        add_image_preprocessing(renamed, prep, tmp_path / "raw.onnx", ["a", "b", "c"])


def test_a_size_mismatch_with_preprocess_json_is_refused(exported, tmp_path: Path):
    export_dir, _, prep, _ = exported
    wrong = Preprocessing(prep.height + 1, prep.width, prep.channels, prep.mean, prep.std)
    with pytest.raises(ExportError, match="preprocess.json says"):
        add_image_preprocessing(export_dir / MODEL_FILE, wrong, tmp_path / "raw.onnx", ["a", "b", "c"])
