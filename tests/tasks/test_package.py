"""The package stage: a raw-image model in parity with the shipped variant, a Triton repository that matches it,
a runtime, and a bundle that verifies."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from kiln.bundle import load_bundle
from kiln.config import CompressConfig, EvaluateConfig, ExportConfig, PackageConfig
from kiln.dataset import publish_dataset
from kiln.errors import BundleError
from kiln.onnx_tools import ort_session
from kiln.store import ArtifactStore
from tasks import package as package_module
from tests.conftest import copy_outputs, make_blobs_dataset, publish_model
from tests.kiln.test_triton import one, parse_pbtxt
from tests.support.bundles import build_bundle


FAST_COMPRESS = CompressConfig(latency_runs=3, throughput_seconds=0.05)  # the default variants, timed briefly


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("package") / "store")
    dataset_ref = publish_dataset(store, make_blobs_dataset())
    model_ref = publish_model(store, dataset_ref)
    ref, bundle_dir = build_bundle(store, dataset_ref, model_ref, compress_config=FAST_COMPRESS)
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


def test_the_model_card_says_which_variant_ships_and_why(built):
    *_, bundle_dir = built
    card = (bundle_dir / "model_card.md").read_text()
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    chosen = metrics["chosen_variant"]
    policy = metrics["selection_policy"]

    assert chosen in policy["candidates"] and policy["objective"] == "latency"
    assert f"- shipped: **{chosen}**. {metrics['selection_reason']}" in card
    assert "`compress.objective` = latency" in card and f"qualifying: {', '.join(policy['candidates'])}" in card
    assert "- not eligible: fp16 (listed in compress.exclude_from_selection: it is built for GPU serving" in card
    assert [row["variant"] for row in metrics["compression"]] == ["fp32", "int8_static", "int8_dynamic", "fp16"]
    assert "| variant | accuracy | agreement_with_fp32 | size_bytes | params | macs |" in card


def test_a_pruned_variant_ships_behind_the_same_raw_image_front_end(built, tmp_path: Path):
    """The policy can choose a retrained variant; the bundle then serves that network, in parity, with its card."""
    from tasks.compress import compress
    from tasks.evaluate import evaluate
    from tasks.export import export
    from tasks.package import bundle_location, package

    store, dataset_ref, model_ref, _, _ = built
    copy, (dataset_copy, model_copy) = copy_outputs(store, [dataset_ref, model_ref], tmp_path / "store")
    exported = export(ExportConfig(), model_copy, dataset_copy, copy)
    # Budget 1 and objective size: the pruned network is smaller than fp32, so it must win.
    smallest = CompressConfig(variants=["prune_structured"], objective="size", max_accuracy_drop=1.0,
                              finetune_epochs=1, latency_runs=3, throughput_seconds=0.05)  # fmt: skip
    compressed = compress(smallest, exported, dataset_copy, copy, model=model_copy)
    evaluation = evaluate(EvaluateConfig(), model_copy, dataset_copy, copy)
    ref = package(PackageConfig(archive=False), dataset_copy, model_copy, evaluation, exported, compressed, copy)
    bundle_dir = Path(bundle_location(ref, copy)[0])

    bundle = load_bundle(bundle_dir)
    assert bundle.manifest["chosen_variant"] == "prune_structured"
    expected = np.load(copy.materialize(compressed) / "predictions.prune_structured.npy")
    images = make_blobs_dataset().test_images
    np.testing.assert_array_equal(bundle.predict_arrays(images).argmax(axis=1), expected)
    assert json.loads((bundle_dir / "metrics.json").read_text())["raw_input_parity"]["class_index_disagreements"] == 0
    assert "- shipped: **prune_structured**. prune_structured has the smallest file" in (
        bundle_dir / "model_card.md"
    ).read_text()


def test_a_dynamically_quantized_variant_ships_in_parity_over_several_batches(tmp_path: Path):
    """int8_dynamic computes activation scales per batch, so the raw-image parity check must batch both models alike
    (it once compared 1,024-image chunks with 256-image ones and refused the bundle). It ships only when opted in."""
    from tasks.compress import compress
    from tasks.evaluate import evaluate
    from tasks.export import export
    from tasks.package import bundle_location, package

    store = ArtifactStore(tmp_path / "store")
    blobs = make_blobs_dataset(per_class_test=100)  # 300 test images: more than one 256-image batch
    test_images = blobs.test_images.copy()
    test_images[256:] //= 8  # a dim last batch: its own activation range, unlike the first 256 images
    dataset_ref = publish_dataset(store, dataclasses.replace(blobs, test_images=test_images))
    model_ref = publish_model(store, dataset_ref, "mlp")
    exported = export(ExportConfig(), model_ref, dataset_ref, store)
    assert "int8_dynamic" in CompressConfig().exclude_from_selection  # batch-dependent outputs: not shipped by default
    opted_in = CompressConfig(variants=["int8_dynamic"], objective="size", max_accuracy_drop=1.0,
                              exclude_from_selection=[], latency_runs=3, throughput_seconds=0.05)  # fmt: skip
    compressed = compress(opted_in, exported, dataset_ref, store)
    evaluation = evaluate(EvaluateConfig(), model_ref, dataset_ref, store)
    ref = package(PackageConfig(archive=False), dataset_ref, model_ref, evaluation, exported, compressed, store)

    bundle_dir = Path(bundle_location(ref, store)[0])
    assert load_bundle(bundle_dir).manifest["chosen_variant"] == "int8_dynamic"
    assert json.loads((bundle_dir / "metrics.json").read_text())["raw_input_parity"]["samples"] == 300


def test_the_model_card_names_the_recipes_optimizer_split_and_batch_selection():
    training = {"epochs": 8, "device": "cuda", "precision": "bf16", "train_seconds": 2.1}
    plain = {"optimizer": "sgd", "lr": 1.5, "batch_size": 1024}  # an older manifest: no keep_hardest key
    assert package_module.training_line(training, plain) == (
        "- 8 epochs, optimizer sgd, peak lr 1.5, batch 1024, on cuda (bf16), 2.1 s")
    recipe = {"optimizer": "muon", "lr": 1.5, "muon_lr": 0.24, "batch_size": 2000, "keep_hardest": 0.5}
    assert package_module.training_line(training, recipe) == (
        "- 8 epochs, optimizer muon, peak lr 1.5 (filters: 0.24), batch 2000 (trained on the hardest 50 % of each, "
        "ranked by a proxy network), on cuda (bf16), 2.1 s")
