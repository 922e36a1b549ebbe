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
    output): on a CPU, seeded, the model it writes scores exactly what fit's model scores."""
    from kiln.config import load_config
    from kiln.dataset import ImageDataset

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(2), 20)
    images = (rng.integers(0, 100, size=(40, 32, 32, 3)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    dataset = ImageDataset("two-tones", ["dark", "bright"], images, labels, images[::4], labels[::4])
    config = load_config("cifar10-fast", overrides=["train.epochs=2", "train.batch_size=8", "train.device=cpu"])

    direct = train_speed.train_once(dataset, config, seed=5)
    stage = train_speed.StageInputs(dataset, config.augment, tmp_path / "store")
    through_stage = train_speed.train_once(dataset, config, seed=5, stage=stage)

    assert through_stage["final_train_loss"] == pytest.approx(direct["final_train_loss"], rel=1e-12, abs=0)
    assert through_stage["accuracy"] == direct["accuracy"]
    assert through_stage["tta_variants"] == direct["tta_variants"]
    assert len(through_stage["epoch_seconds"]) == 2 and through_stage["stage_wall_seconds"] > 0
    assert "fit_wall_seconds" in direct and "stage_wall_seconds" not in direct


def test_a_cpu_run_of_the_feed_section_compares_the_train_stage_with_the_bare_step(tmp_path):
    archive = tmp_path / "images.tar.gz"
    _image_folder_archive(archive, per_class_train=24, per_class_test=4)
    report = tmp_path / "feed.json"

    train_speed.main(["--data", str(archive), "--device", "cpu", "--skip-recipe", "--feed-model", "simple_cnn",
                      "--feed-batch", "16", "--feed-steps", "3", "--json-out", str(report)])  # fmt: skip

    feed = json.loads(report.read_text())["feed"]
    assert feed["bare_images_per_s"] > 0 and feed["stage_images_per_s"] > 0
    assert feed["ratio"] == pytest.approx(feed["stage_images_per_s"] / feed["bare_images_per_s"])
    assert (feed["model"], feed["batch"], feed["data_path"]) == ("simple_cnn", 16, "loader")  # a CPU's path


def test_a_kept_stage_store_holds_only_the_inputs_and_every_run_trains(tmp_path, monkeypatch):
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
    # A run killed after publishing its output leaves it behind: the next run with that config must not reuse it.
    kept = train_speed.StageInputs(dataset, config.augment, store)
    assert kept.dataset_ref.reused and kept.policy_ref.reused  # the kept inputs, not published again
    stage_function = tasks.train.train
    left_behind = stage_function(train_config, kept.dataset_ref, kept.policy_ref, kept.store)
    calls = []

    def recording(*args, **kwargs):
        calls.append(result := stage_function(*args, **kwargs))
        return result

    monkeypatch.setattr(tasks.train, "train", recording)
    _, history, _ = kept.train(train_config, runtime)

    assert [call.reused for call in calls] == [True, False] and calls[0].key == left_behind.key
    assert len(history) == 1 and not any((store / "train").iterdir())
