"""Structured pruning rebuilds smaller layers that compute the same function where the removed channels were dead,
keeps residual sums aligned, and refuses what it does not know; unstructured pruning zeroes what it says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.compression.pruning import (
    channel_groups,
    kept_channels,
    make_pruning_permanent,
    prune_channels,
    prune_unstructured,
    slim_copy,
    weight_sparsity,
)
from kiln.errors import ConfigError
from kiln.models import ModelSpec, build_model

FAMILIES = ["mlp", "simple_cnn", "lenet", "resnet9"]


def parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def with_dead_channels(name: str, keep_fraction: float) -> nn.Module:
    """A model (random weights, non-trivial BatchNorm statistics) in which the channels that pruning to
    `keep_fraction` will remove output exactly zero: zero filters and biases, or zero BatchNorm scale and shift."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(name, (8, 8, 3), 5)).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    for group in channel_groups(model):
        dead = torch.randperm(group.width)[: group.width - kept_channels(group.width, keep_fraction)]
        for producer in group.producers:  # for a residual group: the block's input and its body's output alike
            producer.layer.weight.data[dead] = 0
            if producer.layer.bias is not None:
                producer.layer.bias.data[dead] = 0
            if producer.norm is not None:
                producer.norm.weight.data[dead] = 0
                producer.norm.bias.data[dead] = 0
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_removing_dead_channels_leaves_the_function_unchanged(name):
    model = with_dead_channels(name, keep_fraction=0.7)
    pruned, widths = prune_channels(model, amount=0.3)
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), model(images), atol=1e-5, rtol=1e-5)
    assert all(after < before for before, after in widths)
    assert parameters(pruned) < 0.75 * parameters(model)
    assert parameters(model) == parameters(with_dead_channels(name, 0.7))  # the original is left as it was


def test_resnet9_residual_sums_share_one_channel_choice():
    model = build_model(ModelSpec("resnet9", (8, 8, 3), 10))
    groups = channel_groups(model)
    # prep 64 | trunk 128 (conv + residual body output) | residual inner 128 | 256 | trunk 512 | residual inner 512
    assert [(group.width, len(group.producers), len(group.consumers)) for group in groups] == [
        (64, 1, 1), (128, 2, 2), (128, 1, 1), (256, 1, 1), (512, 2, 2), (512, 1, 1),
    ]  # fmt: skip
    assert groups[4].consumers[-1] is model.head  # the last trunk feeds the linear head
    pruned, _ = prune_channels(model, 0.5)
    first, second = pruned.features[3].body
    assert pruned.features[1][0].out_channels == second[0].out_channels == pruned.features[4][0].in_channels == 64
    assert pruned.head.in_features == pruned.features[8].body[1][0].out_channels == 256
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_the_classifier_keeps_every_class_and_linear_inputs_follow_flatten():
    model = build_model(ModelSpec("simple_cnn", (8, 8, 3), 7))
    pruned, widths = prune_channels(model, 0.5)
    assert pruned.classifier[-1].out_features == 7
    last_conv, first_linear = pruned.features[-2], pruned.classifier[1]
    assert first_linear.in_features == last_conv.out_channels * 2 * 2  # 8x8 pooled twice: 2x2 per channel
    assert widths[0] == (32, 16)


@pytest.mark.parametrize(
    ("width", "fraction", "kept"),
    [(64, 0.7, 48), (512, 0.7, 360), (32, 0.5, 16), (16, 0.7, 11), (6, 0.7, 4), (3, 0.1, 1)],
)
def test_kept_channel_counts_round_to_multiples_of_8_only_for_wide_layers(width, fraction, kept):
    assert kept_channels(width, fraction) == kept


def test_unknown_layers_are_refused_not_guessed():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 2, 3))

    with pytest.raises(ConfigError, match="does not know the model Unknown"):
        channel_groups(Unknown())
    mlp = build_model(ModelSpec("mlp", (8, 8, 1), 3))
    mlp.layers[2] = nn.GELU()
    with pytest.raises(ConfigError, match="does not know the layer GELU"):
        prune_channels(mlp, 0.3)


def test_slim_student_is_the_same_design_at_a_fraction_of_the_parameters():
    teacher = build_model(ModelSpec("resnet9", (8, 8, 3), 10))
    student = slim_copy(teacher, 0.45)
    assert 0.15 < parameters(student) / parameters(teacher) <= 0.25
    assert student(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert student.features[0][0].weight.std() > teacher.features[0][0].weight.std()  # re-initialized, smaller fan-in


def test_unstructured_pruning_zeroes_the_smallest_weights_globally_and_survives_training():
    torch.manual_seed(0)
    model = build_model(ModelSpec("simple_cnn", (8, 8, 3), 3))
    sparse = prune_unstructured(model, 0.6)
    assert weight_sparsity(sparse) == pytest.approx(0.6, abs=1e-3) and weight_sparsity(model) < 0.01
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    for _ in range(3):  # the masks keep the pruned weights at zero while fine-tuning
        optimizer.zero_grad()
        sparse(torch.randn(4, 3, 8, 8)).sum().backward()
        optimizer.step()
    make_pruning_permanent(sparse)
    assert not any(name.endswith("_orig") or name.endswith("_mask") for name in sparse.state_dict())
    assert weight_sparsity(sparse) == pytest.approx(0.6, abs=1e-3)
    kept = torch.cat([m.weight.flatten().abs() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    threshold = kept.kthvalue(int(0.6 * kept.numel())).values
    first = sparse.features[0].weight
    assert torch.equal(first == 0, model.features[0].weight.abs() <= threshold)  # global magnitude order


def test_fine_tuning_an_unstructured_fastnet_keeps_its_frozen_whitening(tmp_path):
    """The whitening filters are set from data and frozen: pruning must not mask them (nothing could re-learn
    them), and fine-tuning a trained model must not recompute them from its own sample."""
    import numpy as np
    from torch.nn.utils import prune

    from kiln.compression.finetune import fine_tune
    from kiln.config import TrainConfig
    from kiln.runtime.preprocess import Preprocessing
    from kiln.training import AugmentedImages, resolve_runtime

    torch.manual_seed(0)
    model = build_model(ModelSpec("fastnet", (8, 8, 3), 3))
    model.prepare(torch.randn(64, 3, 8, 8) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1))
    whitening = model.whiten.weight.detach().clone()
    sparse = prune_unstructured(model, 0.5)
    assert not prune.is_pruned(sparse.whiten) and torch.equal(sparse.whiten.weight, whitening)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(48, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=48)
    prep = Preprocessing(8, 8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    recipe = TrainConfig(model="fastnet", batch_size=16, optimizer="sgd", lr=0.1, validation_fraction=0.0)
    fine_tune(sparse, AugmentedImages(images, labels, None), prep, recipe, resolve_runtime("cpu", "fp32"), 1, 0.1,
              tmp_path / "checkpoint.pt")  # fmt: skip
    assert torch.equal(sparse.whiten.weight, whitening)
    assert weight_sparsity(sparse) > 0.45


@pytest.mark.parametrize("whiten_bias_epochs, schedule, stays", [(None, "base_lr", False), (3, "base_lr", True),
                                                                  (3, "shift_lr_to_zero", True)])
def test_fine_tuning_keeps_a_stopped_whitening_bias_where_training_left_it(tmp_path, whiten_bias_epochs, schedule,
                                                                           stays):  # fmt: skip
    import numpy as np

    from kiln.compression.finetune import fine_tune
    from kiln.config import TrainConfig
    from kiln.runtime.preprocess import Preprocessing
    from kiln.training import AugmentedImages, resolve_runtime

    torch.manual_seed(0)
    model = build_model(ModelSpec("fastnet", (8, 8, 3), 3))
    bias = model.whiten.bias.detach().clone()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(48, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=48)
    prep = Preprocessing(8, 8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    recipe = TrainConfig(model="fastnet", batch_size=16, optimizer="sgd", lr=0.1, validation_fraction=0.0,
                         whiten_bias_epochs=whiten_bias_epochs, whiten_bias_schedule=schedule)  # fmt: skip
    fine_tune(model, AugmentedImages(images, labels, None), prep, recipe, resolve_runtime("cpu", "fp32"), 2, 1.0,
              tmp_path / "checkpoint.pt")  # fmt: skip
    assert torch.equal(model.whiten.bias, bias) == stays


def test_fine_tuning_a_muon_recipe_scales_the_filters_lr_too(tmp_path, monkeypatch):
    """finetune_lr_scale lowers every peak lr: with muon the filters' (muon_lr) as well as the rest's (lr)."""
    from kiln.compression import finetune
    from kiln.config import TrainConfig

    seen = []
    monkeypatch.setattr(finetune, "fit", lambda model, train_set, validation, prep, config, *rest, **options:
                        seen.append(config) or [])  # fmt: skip
    recipe = TrainConfig(model="fastnet", optimizer="muon", lr=1.5, muon_lr=0.24, cuda_graph=True)
    finetune.fine_tune(torch.nn.Linear(2, 2), None, None, recipe, None, 2, 0.1, tmp_path / "checkpoint.pt")
    assert (seen[0].lr, seen[0].muon_lr) == (pytest.approx(0.15), pytest.approx(0.024))
    assert not seen[0].cuda_graph  # the recipe captured its steps; fine-tuning runs them eagerly
