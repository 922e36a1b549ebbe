"""benchmarks/train_speed.py: its TTA views, and one whole run of it on a CPU as the GPU plan runs it."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import train_speed  # benchmarks/ (tests/benchmarks/conftest.py)


def test_the_ten_views_are_the_images_and_their_mirrors_moved_one_pixel_along_both_diagonals():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 5, 6, 2), dtype=np.uint8)
    views = train_speed.shifted_views(images)

    padded = torch.nn.functional.pad(torch.from_numpy(images).permute(0, 3, 1, 2).float(), (1, 1, 1, 1),
                                     mode="reflect").permute(0, 2, 3, 1).numpy()  # fmt: skip
    height, width = images.shape[1:3]
    moved = {"up_left": (0, 0), "down_right": (2, 2), "up_right": (0, 2), "down_left": (2, 0)}
    assert len(views) == 10
    assert np.array_equal(views["image"], images) and np.array_equal(views["mirror"], images[:, :, ::-1])
    for name, (row, column) in moved.items():
        assert np.array_equal(views[f"image_{name}"], padded[:, row : row + height, column : column + width])
    for image_corner, mirror_corner in (("up_left", "up_right"), ("down_right", "down_left"),
                                        ("up_right", "up_left"), ("down_left", "down_right")):  # fmt: skip
        assert np.array_equal(views[f"mirror_{mirror_corner}"], views[f"image_{image_corner}"][:, :, ::-1])


def test_the_kiln_and_airbench_view_sets_are_the_evaluate_stages_tta_views():
    """kiln_probs scores evaluate.tta=flip_translate and airbench_logits_wtd's weighting is flip_translate_weighted's,
    so their view sets must be those options' views: compared on the probabilities of a random linear classifier
    of the pixels, whose scores move with every pixel's place."""
    from kiln.runtime.preprocess import Preprocessing
    from kiln.training import predict_probabilities

    images = np.random.default_rng(4).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32 * 3, 10))
    torch.nn.init.normal_(model[1].weight, std=0.02)
    prep = Preprocessing(32, 32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    runtime = train_speed.resolve_runtime("cpu", "fp32")
    views = {name: predict_probabilities(model, view, prep, runtime) for name, view in
             train_speed.shifted_views(images).items()}  # fmt: skip

    def evaluate_stage(tta: str) -> np.ndarray:
        return predict_probabilities(model, images, prep, runtime, tta=tta)

    kiln = sum(views[name] for name in train_speed.TTA_VIEW_SETS["kiln"]) / 6
    np.testing.assert_allclose(kiln, evaluate_stage("flip_translate"), rtol=0, atol=1e-5)
    weighted = sum((0.25 if name in train_speed.UNSHIFTED_VIEWS else 0.125) * np.log(views[name])
                   for name in train_speed.TTA_VIEW_SETS["airbench"])  # fmt: skip
    airbench = np.exp(weighted) / np.exp(weighted).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(airbench, evaluate_stage("flip_translate_weighted"), rtol=0, atol=1e-5)
    airbench_plain = sum(views[name] for name in train_speed.TTA_VIEW_SETS["airbench"]) / 6
    assert np.abs(airbench_plain - kiln).max() > 0.01  # the two sets differ: the comparisons above can fail
    assert sorted(train_speed.TTA_VIEW_SETS["diagonals"]) == sorted(views)


def _image_folder_archive(path, per_class_train: int, per_class_test: int) -> None:
    """A CIFAR-shaped archive of two classes a network can tell apart (bright vs dark images)."""
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w:gz") as archive:
        for split, count in (("train", per_class_train), ("test", per_class_test)):
            for label, (low, high) in enumerate(((0, 100), (156, 256))):
                for index in range(count):
                    pixels = rng.integers(low, high, size=(32, 32, 3), dtype=np.uint8)
                    encoded = io.BytesIO()
                    Image.fromarray(pixels).save(encoded, format="PNG")
                    member = tarfile.TarInfo(f"{split}/class{label}/{index:04d}.png")
                    member.size = encoded.tell()
                    encoded.seek(0)
                    archive.addfile(member, encoded)


@pytest.mark.parametrize("profile", ["cifar10-fast", "cifar10-long"])
def test_a_cpu_run_of_the_recipe_section_reports_what_the_device_summary_reads(tmp_path, profile, capsys):
    """What benchmarks/device_checks.sh's recipe sections run, shrunk as its SMOKE=1 shrinks them: the report
    holds each run's times and scores, the scores are consistent with each other, and the summary reads it."""
    archive = tmp_path / "images.tar.gz"
    _image_folder_archive(archive, per_class_train=24, per_class_test=10)
    report = tmp_path / "out" / "recipe.json"
    report.parent.mkdir()

    train_speed.main(["--data", str(archive), "--device", "cpu", "--skip-feed", "--profile", profile,
                      "--warmup-epochs", "0", "--epochs", "1", "--runs", "1", "--first-seed", "3",
                      "--set", "train.batch_size=16", "--json-out", str(report)])  # fmt: skip

    results = json.loads(report.read_text())
    [recipe] = results["recipe"]
    [run] = recipe["runs"]
    assert (recipe["profile"], recipe["epochs"], run["seed"]) == (profile, 1, 3)
    assert run["train_seconds"] == pytest.approx(sum(run["epoch_seconds"])) and run["train_seconds"] > 0
    assert run["stage_wall_seconds"] >= run["train_seconds"]  # Prefect is installed: the train stage's own call
    variants = run["tta_variants"]
    assert set(variants) == {"kiln_probs", "airbench_probs", "diagonals_probs", "kiln_logits_wtd",
                             "airbench_logits_wtd"}  # fmt: skip
    assert variants["kiln_probs"] == run["accuracy_tta"]  # the benchmark's views are the evaluate stage's
    assert all(0.0 <= score <= 1.0 for score in variants.values())
    assert not list(tmp_path.glob("out/*.tmp"))  # the report is written whole, then renamed

    import device_summary

    capsys.readouterr()
    device_summary.main(report.parent)
    summary = capsys.readouterr().out
    assert f"{profile}, 1 epochs, seeds [3]" in summary and "train stage wall" in summary
    assert f"diagonals_probs {variants['diagonals_probs']:.4f}" in summary


def test_a_run_through_the_train_stages_function_trains_what_fit_alone_trains(tmp_path):
    """The recipe's runs go through tasks/train.py's function (reading its inputs from a store and writing its
    output): on a CPU, seeded, the model it writes is bit for bit the one fit alone trains."""
    from kiln.config import load_config
    from kiln.dataset import ImageDataset

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(2), 20)
    images = (rng.integers(0, 100, size=(40, 32, 32, 3)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    dataset = ImageDataset("two-tones", ["dark", "bright"], images, labels, images[::4], labels[::4])
    config = load_config("cifar10-long", overrides=["train.epochs=2", "train.batch_size=8", "train.device=cpu"])
    train_config = config.train.model_copy(update={"seed": 5, "validation_fraction": 0.0})
    runtime = train_speed.resolve_runtime("cpu", "fp32")

    alone, alone_history, _ = train_speed.fit_alone(dataset, config.augment, train_config, runtime)
    stage = train_speed.StageInputs(dataset, config.augment, tmp_path / "store")
    staged, staged_history, wall = stage.train(train_config, runtime)

    alone_weights, staged_weights = alone.state_dict(), staged.state_dict()
    assert alone_weights.keys() == staged_weights.keys()
    assert all(torch.equal(alone_weights[name], staged_weights[name]) for name in alone_weights)
    assert [epoch["train_loss"] for epoch in staged_history] == [epoch["train_loss"] for epoch in alone_history]
    assert wall > 0

    row = train_speed.train_once(dataset, config, seed=5, stage=stage)
    assert "stage_wall_seconds" in row and "fit_wall_seconds" not in row and len(row["epoch_seconds"]) == 2


def test_a_cpu_run_of_the_feed_section_compares_the_train_stage_with_the_bare_step(tmp_path, capsys):
    archive = tmp_path / "images.tar.gz"
    _image_folder_archive(archive, per_class_train=24, per_class_test=4)
    report = tmp_path / "feed.json"

    train_speed.main(["--data", str(archive), "--device", "cpu", "--skip-recipe", "--feed-model", "simple_cnn",
                      "--feed-batch", "16", "--feed-steps", "3", "--json-out", str(report)])  # fmt: skip

    feed = json.loads(report.read_text())["feed"]
    assert feed["bare_images_per_s"] > 0 and feed["stage_images_per_s"] > 0
    assert feed["ratio"] == pytest.approx(feed["stage_images_per_s"] / feed["bare_images_per_s"])
    assert (feed["model"], feed["batch"], feed["data_path"]) == ("simple_cnn", 16, "loader")  # a CPU's path
    import device_summary

    capsys.readouterr()
    device_summary.main(tmp_path)
    assert f"ratio {feed['ratio']:.3f}" in capsys.readouterr().out


def test_a_kept_stage_store_holds_only_the_inputs_and_every_run_trains(tmp_path, monkeypatch):
    """What a run killed in a kept store leaves (a published output, a checkpoint) is gone before the next run
    with that config calls the stage, which would otherwise reuse the output or resume from the checkpoint."""
    import tasks.train
    from kiln.config import load_config
    from kiln.dataset import ImageDataset

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(2), 8)
    images = rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    dataset = ImageDataset("noise", ["a", "b"], images, labels, images[:4], labels[:4])
    config = load_config("cifar10-fast", overrides=["train.epochs=1", "train.batch_size=8", "train.device=cpu"])
    train_config = config.train.model_copy(update={"seed": 1})
    runtime = train_speed.resolve_runtime("cpu", "fp32")
    store = tmp_path / "kept"

    train_speed.StageInputs(dataset, config.augment, store).train(train_config, runtime)
    assert not any((store / "train").iterdir())
    kept = train_speed.StageInputs(dataset, config.augment, store)
    assert kept.dataset_ref.reused and kept.policy_ref.reused  # the kept inputs, not published again
    stage_function = tasks.train.train
    left_behind = stage_function(train_config, kept.dataset_ref, kept.policy_ref, kept.store)
    checkpoint = kept.store.scratch_dir("train", left_behind.key) / "checkpoint.pt"
    checkpoint.write_bytes(b"an interrupted run's checkpoint")
    found_when_called = []

    def recording(*args, **kwargs):
        found_when_called.append((kept.store.lookup("train", left_behind.key), checkpoint.exists()))
        return stage_function(*args, **kwargs)

    monkeypatch.setattr(tasks.train, "train", recording)
    _, history, _ = kept.train(train_config, runtime)

    assert found_when_called == [(None, False)]
    assert len(history) == 1 and not any((store / "train").iterdir())


def test_a_url_for_the_stage_store_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--stage-store", "s3://bucket/store"])
    assert "'s3://bucket/store' is a URL: --stage-store takes a local folder" in capsys.readouterr().err
