"""The device data path (kiln/device_data.py), run here on the CPU: the same ops, batched, as the per-image v2 path,
reproducible from a seed, and wired into fit() with graceful fallbacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.augmentation import build_transform, resolve_policy
from kiln.config import AugmentConfig, TrainConfig
from kiln.device_data import DeviceBatches, _crop, _reflect_pad
from kiln.errors import ConfigError
from kiln.models import ModelSpec, build_model
from kiln.runtime.preprocess import Preprocessing
from kiln.training import (
    AugmentedImages, compiled, fit, predict_probabilities, resolve_runtime, training_batches,
)
from tests.conftest import make_blobs_dataset

CPU = torch.device("cpu")


def prep_for(images: np.ndarray) -> Preprocessing:
    height, width, channels = images.shape[1:]
    return Preprocessing(height, width, channels, (0.4,) * channels, (0.25,) * channels)


def images_of(count: int = 20, size: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, channels), dtype=np.uint8)


def test_without_augmentation_batches_are_the_normalized_images_in_a_seeded_order():
    images, labels = images_of(), np.arange(20)
    prep = prep_for(images)
    batches = DeviceBatches(images, labels, {"ops": []}, prep, CPU, batch_size=8)
    assert len(batches) == 2  # full batches only, as the DataLoader path (drop_last)
    seen = list(batches.epoch(torch.Generator().manual_seed(0), 1))
    for inputs, batch_labels in seen:
        assert inputs.dtype == torch.float32 and inputs.shape == (8, 3, 8, 8)
        expected = torch.from_numpy(prep.normalize(images[batch_labels.numpy()]))
        torch.testing.assert_close(inputs, expected, rtol=0, atol=1e-5)  # labels still name their own images
    again = list(DeviceBatches(images, labels, {"ops": []}, prep, CPU, 8).epoch(torch.Generator().manual_seed(0), 1))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(seen, again))


def test_reflect_padding_matches_numpy_and_crops_are_translations_of_it():
    images = images_of(count=4, size=6)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    padded = _reflect_pad(nchw, 2)
    expected = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    assert np.array_equal(padded.permute(0, 2, 3, 1).numpy(), expected)
    dy, dx, order = torch.tensor([0, 4, 1, 3]), torch.tensor([4, 0, 2, 1]), torch.tensor([3, 0, 2, 1])
    crops = _crop(padded, order, dy, dx, torch.arange(6), torch.arange(6), torch.arange(3)).permute(0, 2, 3, 1).numpy()
    for row, index in enumerate(order.tolist()):
        y, x = int(dy[row]), int(dx[row])
        assert np.array_equal(crops[row], expected[index, y : y + 6, x : x + 6])


def test_flip_and_cutout_do_what_the_policy_says():
    images = images_of(count=16, size=8)
    policy = {"ops": [{"op": "RandomHorizontalFlip", "p": 1.0}, {"op": "Cutout", "size": 4, "fill": [255, 0, 7]}]}
    prep = Preprocessing(8, 8, 3, (0.0,) * 3, (1 / 255,) * 3)  # normalization = identity on the 0..255 scale
    batches = DeviceBatches(images, np.arange(16), policy, prep, CPU, batch_size=16)
    [(inputs, labels)] = list(batches.epoch(torch.Generator().manual_seed(1), 1))
    for output, index in zip(inputs.round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), labels.tolist()):
        flipped = images[index][:, ::-1]
        filled = np.all(output == [255, 0, 7], axis=2) & np.any(flipped != [255, 0, 7], axis=2)
        rows, columns = np.nonzero(filled)
        assert 1 <= len(rows) <= 16 and np.ptp(rows) < 4 and np.ptp(columns) < 4  # one square of at most 4x4
        untouched = ~np.all(output == [255, 0, 7], axis=2)
        assert np.array_equal(output[untouched], flipped[untouched])


def filled_squares(outputs: np.ndarray, originals: np.ndarray, fill) -> list[tuple[int, int, int, int]]:
    """Per image (N, H, W, C): the filled pixels' count, and their first row, first column and bounding-box side."""
    squares = []
    for output, original in zip(outputs, originals):
        rows, columns = np.nonzero(np.all(output == fill, axis=2) & np.any(original != fill, axis=2))
        squares.append((len(rows), int(rows.min()), int(columns.min()), int(max(np.ptp(rows), np.ptp(columns))) + 1))
    return squares


@pytest.mark.parametrize("inside", [False, True], ids=["centred anywhere", "inside"])
def test_cutout_inside_keeps_the_whole_square_on_the_image_on_both_paths(inside):
    images = images_of(count=64, size=8)
    spec = resolve_policy(AugmentConfig(policy="crop", crop_padding=0, cutout=4, cutout_inside=inside), (8, 8, 3),
                          [1.0, 0.0, 7 / 255])  # fmt: skip
    assert ("inside" in spec["ops"][1]) is inside
    assert spec["version"] == (2 if inside else 1)  # older kilns read version 1 alike and refuse version 2
    fill = [255, 0, 7]
    prep = Preprocessing(8, 8, 3, (0.0,) * 3, (1 / 255,) * 3)  # normalization = identity on the 0..255 scale
    batches = DeviceBatches(images, np.arange(64), spec, prep, CPU, batch_size=64)
    [(inputs, labels)] = list(batches.epoch(torch.Generator().manual_seed(3), 1))
    device = filled_squares(inputs.round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), images[labels.numpy()], fill)
    torch.manual_seed(3)
    transform = build_transform(spec)
    per_image = filled_squares(np.stack([transform(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy()
                                         for image in images]), images, fill)  # fmt: skip
    for squares in (device, per_image):
        assert all(side <= 4 for _, _, _, side in squares)
        whole = [count == 16 for count, _, _, _ in squares]  # a random image may share a few pixels with the fill
        if inside:
            assert all(whole)
            assert {top for _, top, _, _ in squares} == {0, 1, 2, 3, 4}  # every place inside, edges included
        else:
            assert 8 < whole.count(False) < 56  # about 3/5 of the centres put part of the square off the image


@pytest.mark.parametrize("count, batch_size", [(103, 24), (10, 16)], ids=["full batches", "one partial batch"])
def test_each_rank_takes_every_world_th_sample_of_the_one_process_batches(count, batch_size):
    """Data-parallel ranks share one seed, so each must see exactly its interleaved share of the batch one process
    would draw, crop, flip and cut out; with fewer images than a batch, that one partial batch is all there is."""
    images = images_of(count=count, size=8)
    spec = resolve_policy(AugmentConfig(policy="crop_flip", crop_padding=2, flip="alternate", cutout=3), (8, 8, 3))

    def epochs(shard: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = DeviceBatches(images, np.arange(count), spec, prep_for(images), CPU, batch_size, shard=shard)
        generator = torch.Generator().manual_seed(4)
        return [batch for epoch in (1, 2) for batch in batches.epoch(generator, epoch)]

    whole = epochs((0, 1))
    assert len(whole) == 2 * max(count // batch_size, 1) and len(whole[-1][1]) == min(count, batch_size)
    for rank in range(3):
        shares = epochs((rank, 3))
        assert len(shares) == len(whole)
        for (inputs, labels), (all_inputs, all_labels) in zip(shares, whole):
            assert torch.equal(labels, all_labels[rank::3]) and torch.equal(inputs, all_inputs[rank::3])


def test_cutout_inside_needs_cutout():
    with pytest.raises(ValueError, match="augment.cutout is 0"):
        AugmentConfig(cutout_inside=True)


def test_a_policy_version_this_kiln_does_not_know_is_refused():
    with pytest.raises(ConfigError, match="augmentation policy version 3 is not supported by this kiln"):
        build_transform({"version": 3, "policy": "crop", "image_shape": [8, 8, 3], "ops": []})


def test_an_alternating_flip_mirrors_each_image_in_every_other_epoch():
    images = images_of(count=64, size=8)
    spec = resolve_policy(AugmentConfig(policy="crop_flip", crop_padding=0, flip="alternate"), (8, 8, 3))
    assert spec["ops"][1] == {"op": "RandomHorizontalFlip", "p": 0.5, "alternate": True}
    build_transform(spec)(torch.from_numpy(images[0]).permute(2, 0, 1))  # per image: a random flip
    prep = Preprocessing(8, 8, 3, (0.0,) * 3, (1 / 255,) * 3)

    def mirrored_in(epoch: int, seed: int = 0) -> torch.Tensor:
        batches = DeviceBatches(images, np.arange(64), spec, prep, CPU, batch_size=64, seed=seed)
        [(inputs, labels)] = list(batches.epoch(torch.Generator().manual_seed(epoch), epoch))
        outputs = inputs.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        flips = [not np.array_equal(output, images[index]) for output, index in zip(outputs, labels.tolist())]
        for output, index, flipped in zip(outputs, labels.tolist(), flips):
            assert np.array_equal(output, images[index][:, ::-1] if flipped else images[index])
        return torch.tensor(flips)[labels.argsort()]  # by image

    first, second, third = mirrored_in(1), mirrored_in(2), mirrored_in(3)
    assert torch.equal(first, ~second) and torch.equal(first, third)
    assert 16 < int(first.sum()) < 48  # about half the images start mirrored
    assert not torch.equal(first, mirrored_in(1, seed=1))  # which ones: the seed's choice


def test_the_policy_from_the_augment_stage_runs_on_both_paths_with_the_same_ops():
    spec = resolve_policy(AugmentConfig(policy="crop_flip", crop_padding=2, cutout=3), (8, 8, 3), [0.5, 0.4, 0.3])
    assert [op["op"] for op in spec["ops"]] == ["RandomCrop", "RandomHorizontalFlip", "Cutout"]
    assert spec["ops"][2]["fill"] == [128, 102, 76]
    images = images_of(count=10)
    build_transform(spec)(torch.from_numpy(images[0]).permute(2, 0, 1))  # the per-image path accepts it
    batches = DeviceBatches(images, np.arange(10), spec, prep_for(images), CPU, batch_size=5)
    shapes = [tuple(inputs.shape) for inputs, _ in batches.epoch(torch.Generator().manual_seed(0), 1)]
    assert shapes == [(5, 3, 8, 8)] * 2
    with pytest.raises(ConfigError, match="cannot run augmentation op\\(s\\) Solarize; set train.data_path=loader"):
        DeviceBatches(images, np.arange(10), {"ops": [{"op": "Solarize"}]}, prep_for(images), CPU, 5)


def _train(tmp_path: Path, name: str, flip: str = "random", watch=None,
           **settings) -> tuple[list[dict], torch.nn.Module]:  # fmt: skip
    """fit on small blobs; `watch(model)` after every epoch."""
    data = make_blobs_dataset(classes=3, per_class_train=32, size=8)
    images, labels = data.train_images, data.train_labels
    augment = AugmentConfig(policy="crop_flip", crop_padding=1, cutout=2, flip=flip)
    spec = resolve_policy(augment, images.shape[1:])
    config = TrainConfig(**{"model": "simple_cnn", "epochs": 4, "batch_size": 16, "lr": 3e-3, **settings})
    runtime = resolve_runtime(config.device, config.precision)
    torch.manual_seed(config.seed)
    model = build_model(ModelSpec(config.model, images.shape[1:], 3))
    on_epoch = None if watch is None else (lambda row: watch(model))
    history = fit(model, AugmentedImages(images, labels, build_transform(spec), spec), None, prep_for(images),
                  config, runtime, tmp_path / f"{name}.pt", on_epoch)  # fmt: skip
    return history, model


def test_training_on_the_device_path_lowers_the_loss_and_repeats_exactly_from_its_seed(tmp_path):
    history, _ = _train(tmp_path, "first", data_path="device")
    repeat, _ = _train(tmp_path, "second", data_path="device")
    assert [row["data_path"] for row in history] == ["device"] * 4
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [row["train_loss"] for row in repeat] == [row["train_loss"] for row in history]  # bit-for-bit on the CPU
    other_seed, _ = _train(tmp_path, "third", data_path="device", seed=1)
    assert [row["train_loss"] for row in other_seed] != [row["train_loss"] for row in history]


WHITENING_SCHEDULE = {"model": "fastnet", "optimizer": "sgd", "lr": 0.05, "momentum": 0.85, "bias_lr_scale": 8,
                      "decay_biases": True, "whiten_bias_epochs": 3}  # the bias stops after the resume


MUON = {"model": "fastnet", "optimizer": "muon", "lr": 0.05, "momentum": 0.85, "bias_lr_scale": 8, "muon_lr": 0.1}
# airbench's Muon record: the whitening bias at the shifts' lr, falling to 0 over 3 epochs, across the resume
MUON_RECORD = {**MUON, "decay_biases": True, "whiten_bias_epochs": 3, "whiten_bias_schedule": "shift_lr_to_zero"}


@pytest.mark.parametrize("settings, flip", [({}, "random"), ({"lookahead_steps": 2}, "alternate"),
                                            (WHITENING_SCHEDULE, "random"), (MUON, "random"),
                                            (MUON_RECORD, "alternate"), ({"keep_hardest": 0.5}, "random")],
                         ids=["plain", "lookahead-alternating-flip", "fastnet-whitening-schedule",
                              "fastnet-muon", "fastnet-muon-record", "hard-examples"])  # fmt: skip
def test_an_interrupted_device_path_run_resumes_to_the_same_curve(tmp_path, settings, flip):
    straight, straight_model = _train(tmp_path, "straight", flip=flip, data_path="device", **settings)

    class Interrupt(Exception):
        pass

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Interrupt

    data = make_blobs_dataset(classes=3, per_class_train=32, size=8)
    augment = AugmentConfig(policy="crop_flip", crop_padding=1, cutout=2, flip=flip)
    spec = resolve_policy(augment, data.train_images.shape[1:])
    config = TrainConfig(**{"model": "simple_cnn", "lr": 3e-3, **settings, "epochs": 4, "batch_size": 16,
                            "data_path": "device"})  # fmt: skip
    train_set = AugmentedImages(data.train_images, data.train_labels, build_transform(spec), spec)
    runtime = resolve_runtime("cpu", "fp32")
    checkpoint = tmp_path / "interrupted.pt"
    for on_epoch in (stop_after_two, None):
        torch.manual_seed(0)
        model = build_model(ModelSpec(config.model, data.train_images.shape[1:], 3))
        try:
            resumed = fit(model, train_set, None, prep_for(data.train_images), config, runtime, checkpoint, on_epoch)
        except Interrupt:
            continue
    assert [row["train_loss"] for row in resumed] == [row["train_loss"] for row in straight]
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_the_whitening_bias_trains_for_its_epochs_then_stays_where_it_is(tmp_path):
    snapshots = []
    _, model = _train(tmp_path, "whitening", data_path="device", **WHITENING_SCHEDULE,
                      watch=lambda model: snapshots.append(model.whiten.bias.detach().clone()))  # fmt: skip
    _, untrained = _train(tmp_path, "never", data_path="device", **{**WHITENING_SCHEDULE, "whiten_bias_epochs": 0})
    prepared = untrained.whiten.bias  # the same data-derived start, never moved
    assert not torch.equal(snapshots[0], prepared)
    assert not torch.equal(snapshots[1], snapshots[0]) and not torch.equal(snapshots[2], snapshots[1])
    assert torch.equal(snapshots[3], snapshots[2])  # epochs 1-3 train it, epoch 4 does not
    assert torch.equal(model.whiten.bias, snapshots[3])


def test_muon_lowers_the_loss_and_repeats_exactly_from_its_seed(tmp_path):
    history, _ = _train(tmp_path, "muon", data_path="device", **MUON)
    repeat, _ = _train(tmp_path, "again", data_path="device", **MUON)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [row["train_loss"] for row in repeat] == [row["train_loss"] for row in history]


def test_weight_averaging_leaves_the_averaged_weights_in_the_model(tmp_path):
    history, model = _train(tmp_path, "ema", data_path="device", ema_decay=0.9)
    plain, plain_model = _train(tmp_path, "plain", data_path="device")
    assert [row["train_loss"] for row in history] == [row["train_loss"] for row in plain]  # same steps taken
    differs = [name for name, tensor in model.state_dict().items()
               if tensor.is_floating_point() and not torch.equal(tensor, plain_model.state_dict()[name])]  # fmt: skip
    assert differs  # ... but the model now holds the moving average of them


def test_lookahead_trains_and_leaves_the_slow_weights_in_the_model(tmp_path):
    history, model = _train(tmp_path, "lookahead", data_path="device", lookahead_steps=2)  # 24 steps: 12 pulls
    plain, plain_model = _train(tmp_path, "plain", data_path="device")
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], abs=1e-3)  # early pulls: decay ~0
    assert history[-1]["train_loss"] != plain[-1]["train_loss"]  # later pulls do
    assert any(not torch.equal(tensor, plain_model.state_dict()[name])
               for name, tensor in model.state_dict().items() if tensor.is_floating_point())  # fmt: skip


def test_gpu_only_settings_degrade_on_the_cpu(tmp_path, caplog):
    history, _ = _train(tmp_path, "gpu-asks", device="cuda", precision="fp16", compile="auto", data_path="auto")
    assert history[0]["data_path"] == "loader"  # auto on the CPU: the DataLoader path, as before
    runtime = resolve_runtime("cuda", "fp16")
    assert runtime.device.type == "cpu" and runtime.precision == "fp32" and len(runtime.notes) == 2


@pytest.mark.parametrize("mode, asked", [("default", None), ("reduce-overhead", "reduce-overhead"),
                                         ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_mode_is_the_mode_torch_compile_gets(monkeypatch, mode, asked):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: calls.append(options) or model)
    model = torch.nn.Linear(2, 2)
    config = TrainConfig(compile="on", compile_mode=mode)
    assert compiled(model, config, resolve_runtime("cpu", "fp32"), total_steps=10) is model
    assert calls == [{"mode": asked, "dynamic": False}]
    calls.clear()  # compile=auto on the CPU compiles nothing, whatever the mode
    assert compiled(model, TrainConfig(compile_mode=mode), resolve_runtime("cpu", "fp32"), 10**6) is model
    assert calls == []


def test_cuda_graphs_are_refused_for_data_parallel_training_before_anything_starts(tmp_path):
    from kiln.distributed import launch_training

    config = TrainConfig(model="simple_cnn", compile="on", compile_mode="reduce-overhead", devices=2, device="cpu")
    with pytest.raises(ConfigError, match=r"reduce-overhead \(CUDA graphs\) trains in one process only.*"
                                          r"--set train.devices=1, or --set train.compile_mode=default"):
        launch_training(tmp_path / "nowhere", {"ops": []}, config, tmp_path / "x.pt", tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_transform_without_its_policy_falls_back_to_the_loader_path(caplog):
    images = images_of()
    spec = resolve_policy(AugmentConfig(policy="crop"), images.shape[1:])
    train_set = AugmentedImages(images, np.arange(20), build_transform(spec))  # no spec: cannot run on the device
    batches = training_batches(train_set, prep_for(images), TrainConfig(data_path="device", batch_size=8),
                               resolve_runtime("cpu", "fp32"))  # fmt: skip
    assert batches.name == "loader"
    assert "device data path not used: no augmentation policy spec was given" in caplog.text


def test_an_alternating_flip_on_the_loader_path_says_it_flips_at_random(caplog):
    images = images_of()
    spec = resolve_policy(AugmentConfig(policy="crop_flip", flip="alternate"), images.shape[1:])
    train_set = AugmentedImages(images, np.arange(20), build_transform(spec), spec)
    with caplog.at_level("INFO", logger="kiln"):
        batches = training_batches(train_set, prep_for(images), TrainConfig(data_path="loader", batch_size=8),
                                   resolve_runtime("cpu", "fp32"))  # fmt: skip
    assert batches.name == "loader" and "the DataLoader path flips at random" in caplog.text
    assert len(list(batches.epoch(torch.Generator().manual_seed(0), 1))) == 2


def test_lookahead_is_off_in_a_run_too_short_for_it_and_the_last_score_is_of_the_returned_weights(tmp_path):
    data = make_blobs_dataset(classes=3, per_class_train=32, size=8)
    images, labels = data.train_images, data.train_labels
    spec = resolve_policy(AugmentConfig(policy="none"), images.shape[1:])
    held_out = (data.test_images, data.test_labels)

    def run(name: str, batch_size: int = 16, **settings):
        config = TrainConfig(model="simple_cnn", batch_size=batch_size, lr=3e-3, data_path="device", **settings)
        torch.manual_seed(0)
        model = build_model(ModelSpec("simple_cnn", images.shape[1:], 3))
        history = fit(model, AugmentedImages(images, labels, None, spec), held_out, prep_for(images), config,
                      resolve_runtime("cpu", "fp32"), tmp_path / f"{name}.pt")  # fmt: skip
        return history, model

    _, short = run("short", epochs=1, lookahead_steps=5)  # 6 steps: fewer than 10 pulls, so plain training
    _, plain = run("plain", epochs=1)
    assert all(torch.equal(tensor, plain.state_dict()[name]) for name, tensor in short.state_dict().items())
    history, model = run("long", epochs=7, batch_size=32, lookahead_steps=2)  # 21 steps: the last is not a pull
    probabilities = predict_probabilities(model, *held_out[:1], prep_for(images), resolve_runtime("cpu", "fp32"))
    assert history[-1]["val_accuracy"] == round(float((probabilities.argmax(axis=1) == held_out[1]).mean()), 5)
    saved = torch.load(tmp_path / "long.pt", weights_only=True)["model"]  # a resumed finished run returns these
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items())


def test_with_a_checkpoint_interval_only_the_last_epoch_of_a_short_run_is_saved(tmp_path):
    straight, _ = _train(tmp_path, "straight", data_path="device")
    saved_epochs = []

    def note_checkpoint(row):
        checkpoint = tmp_path / "spaced.pt"
        saved_epochs.append(torch.load(checkpoint, weights_only=True)["epoch"] if checkpoint.exists() else None)

    data = make_blobs_dataset(classes=3, per_class_train=32, size=8)
    spec = resolve_policy(AugmentConfig(policy="crop_flip", crop_padding=1, cutout=2), data.train_images.shape[1:])
    config = TrainConfig(model="simple_cnn", epochs=4, batch_size=16, lr=3e-3, data_path="device",
                         checkpoint_interval_s=3600)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(ModelSpec("simple_cnn", data.train_images.shape[1:], 3))
    history = fit(model, AugmentedImages(data.train_images, data.train_labels, build_transform(spec), spec), None,
                  prep_for(data.train_images), config, resolve_runtime("cpu", "fp32"), tmp_path / "spaced.pt",
                  note_checkpoint)  # fmt: skip
    assert saved_epochs == [None, None, None, 4]
    assert [row["train_loss"] for row in history] == [row["train_loss"] for row in straight]  # training unchanged
    assert TrainConfig(checkpoint_interval_s=30).key_fields() == TrainConfig().key_fields()  # not in the stage key
