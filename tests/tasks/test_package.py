"""The package stage: a raw-image model in parity with the shipped variant, a Triton repository that matches it,
a runtime, and a bundle that verifies."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from kiln.bundle import load_bundle
from kiln.config import CompressConfig, PackageConfig
from kiln.errors import BundleError
from kiln.onnx_tools import ort_session
from kiln.store import ArtifactStore
from tasks import package as package_module
from tests.conftest import copy_outputs, make_blobs_dataset, publish_dataset, publish_model
from tests.kiln.test_triton import one, parse_pbtxt
from tests.support.bundles import build_bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("package") / "store")
    dataset_ref = publish_dataset(store, make_blobs_dataset())
    model_ref = publish_model(store, dataset_ref)
    ref, bundle_dir = build_bundle(store, dataset_ref, model_ref)
    return store, dataset_ref, model_ref, ref, bundle_dir


def test_the_bundle_serves_a_raw_image_model_with_recorded_parity(built):
    store, _, _, ref, bundle_dir = built
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    session = ort_session(bundle_dir / "model.onnx")

    assert [(i.name, i.type, i.shape[1:]) for i in session.get_inputs()] == [("image", "tensor(uint8)", [8, 8, 3])]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "class_index"]
    assert [i.name for i in ort_session(bundle_dir / "model.fp32.onnx").get_inputs()] == ["input"]
    parity = metrics["raw_input_parity"]
    assert parity["samples"] == len(make_blobs_dataset().test_images) and parity["class_index_disagreements"] == 0
    assert parity["max_abs_diff"] <= package_module.RAW_PARITY_ATOL
    assert store.manifest(ref).metrics["raw_input_max_abs_diff"] == parity["max_abs_diff"]


def test_the_triton_config_describes_the_bundles_own_model(built):
    *_, bundle_dir = built
    model_dir = bundle_dir / "triton" / "kiln-classifier"
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    session = ort_session(model_dir / "1" / "model.onnx")

    assert (model_dir / "1" / "model.onnx").read_bytes() == (bundle_dir / "model.onnx").read_bytes()
    assert one(config, "max_batch_size") == PackageConfig().triton_max_batch
    (image,) = config["input"]
    assert (one(image, "name"), one(image, "data_type")) == ("image", "TYPE_UINT8")
    assert image["dims"] == session.get_inputs()[0].shape[1:]
    outputs = session.get_outputs()
    assert [one(output, "name") for output in config["output"]] == [output.name for output in outputs]
    assert [one(output, "data_type") for output in config["output"]] == ["TYPE_FP32", "TYPE_INT64"]
    assert [output.type for output in outputs] == ["tensor(float)", "tensor(int64)"]
    probabilities, class_index = config["output"]
    assert probabilities["dims"] == outputs[0].shape[1:] == [3]
    assert class_index["dims"] == [1] and len(outputs[1].shape) == 1  # [batch] becomes dims [1] + empty reshape
    assert one(probabilities, "label_filename") == "labels.txt"
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert labels == json.loads((bundle_dir / "labels.json").read_text())


def test_the_archive_holds_the_same_verified_bundle(built, tmp_path: Path):
    store, _, _, ref, bundle_dir = built
    archive = Path(ref.uri) / f"{bundle_dir.name}.tar.gz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {f"{bundle_dir.name}/model.onnx", f"{bundle_dir.name}/Dockerfile", f"{bundle_dir.name}/kiln_runtime/server.py",
            f"{bundle_dir.name}/triton/kiln-classifier/config.pbtxt"} <= names  # fmt: skip
    images = make_blobs_dataset().test_images[:4]
    from_archive = load_bundle(archive, extract_to=tmp_path)
    np.testing.assert_array_equal(from_archive.predict_arrays(images), load_bundle(bundle_dir).predict_arrays(images))


def test_a_raw_model_out_of_parity_publishes_nothing(built, monkeypatch, tmp_path: Path):
    store, dataset_ref, model_ref, _, _ = built
    broken, (dataset_copy, model_copy) = copy_outputs(store, [dataset_ref, model_ref], tmp_path / "store")
    real = package_module.add_image_preprocessing

    def wrong_std(model_path, prep, out_path, classes):
        from dataclasses import replace

        real(model_path, replace(prep, std=tuple(value * 1.5 for value in prep.std)), out_path, classes)

    monkeypatch.setattr(package_module, "add_image_preprocessing", wrong_std)
    with pytest.raises(BundleError, match="differs from model.fp32.onnx on the test set: model input max"):
        build_bundle(broken, dataset_copy, model_copy, compress_config=CompressConfig(method="none", latency_runs=3))
    assert not (tmp_path / "store" / "package").exists() or not any((tmp_path / "store" / "package").iterdir())
