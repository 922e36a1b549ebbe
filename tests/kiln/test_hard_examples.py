"""Training on each batch's hardest examples as a small proxy ranks them (train.keep_hardest, kiln/hard_examples.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kiln.augmentation import build_transform, resolve_policy
from kiln.config import AugmentConfig, TrainConfig
from kiln.distributed import launch_training
from kiln.errors import ConfigError
from kiln.hard_examples import PROXY_TRAIN_INTERVAL, build_selector, kept_count
from kiln.models import ModelSpec, build_model
from kiln.runtime.preprocess import Preprocessing
from kiln.training import AugmentedImages, fit, resolve_runtime
from tests.conftest import make_blobs_dataset

CPU_FP32 = resolve_runtime("cpu", "fp32")


SAMPLE = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # normalized "training images"


def selector_for(keep_hardest: float = 0.25, total_steps: int = 20, **settings):
    config = TrainConfig(model="fastnet", optimizer="sgd", lr=0.05, momentum=0.85, label_smoothing=0.2,
                         keep_hardest=keep_hardest, **settings)  # fmt: skip
    return build_selector(SAMPLE, 3, config, CPU_FP32, total_steps, channels_last=False)


def batch(seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 8, 8, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def test_the_kept_examples_are_those_the_proxy_finds_hardest_in_batch_order():
    selector = selector_for(keep_hardest=0.25)
    inputs, labels = batch(0)
    proxy_before = copy.deepcopy(selector.proxy)  # train mode: the loss is of the batch's own statistics

    kept_inputs, kept_labels = selector.select(inputs, labels)

    losses = F.cross_entropy(proxy_before(inputs), labels, label_smoothing=0.2, reduction="none")
    hardest = losses.argsort(descending=True)[:4].sort().values
    assert kept_inputs.shape == (4, 3, 8, 8)
    assert torch.equal(kept_inputs, inputs[hardest]) and torch.equal(kept_labels, labels[hardest])


def test_the_proxy_learns_from_its_kept_examples_at_the_full_batchs_scale():
    selector = selector_for(keep_hardest=0.25)
    inputs, labels = batch(0)
    proxy_before = copy.deepcopy(selector.proxy)

    selector.select(inputs, labels)  # step 0: the proxy learns; its gradients stay on its parameters

    losses = F.cross_entropy(proxy_before(inputs), labels, label_smoothing=0.2, reduction="none")
    hardest = losses.argsort(descending=True)[:4]
    (losses[hardest].sum() / len(labels)).backward()
    assert torch.allclose(selector.proxy.head.weight.grad, proxy_before.head.weight.grad, atol=1e-7)
    assert not selector.proxy.whiten.bias.requires_grad  # frozen, as airbench's proxy: not trained, not decayed


def test_the_proxy_starts_from_its_own_draw_and_leaves_the_callers_random_stream_alone():
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    main_model = build_model(ModelSpec("fastnet", (8, 8, 3), 3))  # seeded as fit seeds it
    torch.manual_seed(0)
    first = selector_for()
    assert torch.equal(torch.rand(3), expected_next)
    second = selector_for()
    for name, tensor in first.proxy.state_dict().items():
        assert torch.equal(tensor, second.proxy.state_dict()[name]), name  # repeatable
    first_filters = first.proxy.features[1][0].weight  # the first group's 3x3 convolution
    assert not torch.equal(first_filters, main_model.features[1][0].weight[: len(first_filters)])


def test_a_restored_selector_ranks_and_learns_as_the_original_would_have():
    original = selector_for()
    for step in range(6):  # not a multiple of the proxy's interval: the step count must be restored too
        original.select(*batch(step))
    restored = selector_for()
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    for step in range(6, 12):
        kept, _ = original.select(*batch(step))
        assert torch.equal(restored.select(*batch(step))[0], kept)
    for name, tensor in original.proxy.state_dict().items():
        assert torch.equal(tensor, restored.proxy.state_dict()[name]), name


def test_the_proxy_learns_from_every_fourth_batch_only_and_follows_the_schedule():
    selector = selector_for(total_steps=2 * PROXY_TRAIN_INTERVAL)
    moved = []
    for step in range(2 * PROXY_TRAIN_INTERVAL):
        before = selector.proxy.head.weight.detach().clone()
        selector.select(*batch(step))
        moved.append(not torch.equal(before, selector.proxy.head.weight))
    assert moved == [step % PROXY_TRAIN_INTERVAL == 0 for step in range(2 * PROXY_TRAIN_INTERVAL)]
    assert selector.scheduler.last_epoch == 2 * PROXY_TRAIN_INTERVAL  # stepped on every batch


def test_the_proxy_gets_better_at_the_task_it_ranks():
    """Its ranking is only as good as its loss: many steps on one fixed, learnable problem must lower it."""
    selector = selector_for(keep_hardest=0.5, total_steps=400)
    inputs, labels = batch(0, size=32)
    inputs = inputs + 3 * F.one_hot(labels, 3).float().repeat_interleave(64, dim=1).view(32, 3, 8, 8)

    def proxy_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(selector.proxy(inputs), labels).item()

    start = proxy_loss()
    for _ in range(40 * PROXY_TRAIN_INTERVAL):
        selector.select(inputs, labels)
    assert proxy_loss() < 0.75 * start  # from chance (ln 3); a proxy that never learns stays there


def test_kept_count_is_a_share_of_the_batch_and_at_least_one():
    assert kept_count(1024, 0.5) == 512 and kept_count(10, 0.25) == 2 and kept_count(3, 0.01) == 1


def _fit(tmp_path, name: str, keep_hardest: float | None, seen_batches: list[int] | None = None, distributed=None,
         **settings):  # fmt: skip
    data = make_blobs_dataset(classes=3, per_class_train=32, size=8)
    spec = resolve_policy(AugmentConfig(policy="crop_flip", crop_padding=1), data.train_images.shape[1:])
    train_set = AugmentedImages(data.train_images, data.train_labels, build_transform(spec), spec)
    config = TrainConfig(**{"model": "simple_cnn", "epochs": 4, "batch_size": 16, "lr": 3e-3, "data_path": "device",
                            "keep_hardest": keep_hardest, **settings})  # fmt: skip
    torch.manual_seed(config.seed)
    model = build_model(ModelSpec(config.model, data.train_images.shape[1:], 3))
    if seen_batches is not None:
        model.register_forward_pre_hook(lambda module, args: seen_batches.append(len(args[0])) if module.training
                                        else None)  # fmt: skip
    prep = Preprocessing(8, 8, 3, (0.4,) * 3, (0.25,) * 3)
    return fit(model, train_set, None, prep, config, CPU_FP32, tmp_path / f"{name}.pt", distributed=distributed)


def test_fit_trains_the_model_on_the_kept_share_of_every_batch_and_repeats_from_its_seed(tmp_path):
    seen: list[int] = []
    history = _fit(tmp_path, "hard", 0.5, seen)
    repeat = _fit(tmp_path, "again", 0.5)
    plain = _fit(tmp_path, "plain", None)

    assert seen == [8] * (4 * 96 // 16)  # every step of every epoch: half of each batch of 16
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [row["train_loss"] for row in repeat] == [row["train_loss"] for row in history]
    assert [row["train_loss"] for row in plain] != [row["train_loss"] for row in history]


def test_the_models_loss_is_taken_at_the_full_batchs_scale(tmp_path, monkeypatch):
    """A selector that keeps every example twice (share 2) must train as plain SGD at twice the lr: the loss of
    the kept examples is scaled by len(kept) / len(batch). No momentum, decay or BatchNorm (simple_cnn), so that
    is exact up to float rounding."""
    from kiln.hard_examples import HardExampleSelector

    monkeypatch.setattr(HardExampleSelector, "select", lambda self, inputs, labels: (torch.cat([inputs, inputs]),
                                                                                      torch.cat([labels, labels])))
    sgd = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant", "lr": 0.01}
    doubled = _fit(tmp_path, "doubled", 0.5, **sgd)
    plain = _fit(tmp_path, "plain", None, **{**sgd, "lr": 0.02})
    assert [row["train_loss"] for row in doubled] == pytest.approx([row["train_loss"] for row in plain], rel=1e-4)


def test_fit_refuses_a_data_parallel_run_itself(tmp_path):
    from kiln.training import Distributed

    with pytest.raises(ConfigError, match="keep_hardest trains in one process only"):
        _fit(tmp_path, "ddp", 0.5, distributed=Distributed(rank=0, world_size=2))


def test_fine_tuning_after_pruning_drops_the_proxy(tmp_path, monkeypatch):
    from kiln.compression import finetune

    configs = []
    monkeypatch.setattr(finetune, "fit", lambda *args, **kwargs: configs.append(args[4]) or [])
    recipe = TrainConfig(model="simple_cnn", keep_hardest=0.5)
    finetune.fine_tune(torch.nn.Linear(1, 1), None, None, recipe, CPU_FP32, 2, 0.1, tmp_path / "ft.pt")
    assert configs[0].keep_hardest is None


@pytest.mark.parametrize("devices", [2, "auto"])
def test_more_than_one_process_is_refused_before_anything_starts(tmp_path, devices, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = TrainConfig(model="simple_cnn", keep_hardest=0.5, devices=devices, device="cpu")
    with pytest.raises(ConfigError, match="keep_hardest trains in one process only.*--set train.devices=1"):
        launch_training(tmp_path / "data", {"ops": []}, config, tmp_path / "ckpt.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt.pt").exists()
