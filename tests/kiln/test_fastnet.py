"""FastNet (kiln/models/fastnet.py): shapes on kiln's input sizes, the data-derived whitening layer, persistence,
trainability and the ONNX path (export, onnxruntime parity, static int8 quantization)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kiln.config import CompressConfig
from kiln.models import MODEL_FAMILIES, ModelSpec, build_model, load_model, save_model
from kiln.errors import ConfigError
from kiln.models.fastnet import FastNet, FastNetLean, FastNetWide, ResidualConvGroup
from kiln.onnx_export import export_onnx, torch_probabilities
from kiln.onnx_tools import INPUT_NAME
from kiln.runtime.preprocess import Preprocessing

SMALL = (16, 32, 32)  # narrow groups keep CPU tests fast; the structure is the same as the default 64/256/256


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, and on CPU cores shared with
    other jobs it made the training steps ten times slower. Restored afterwards for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_images(count: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images: neighbouring pixels and channels strongly correlated, as in natural images, so that
    the 2x2 patch covariance is far from the identity and whitening has something to undo."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 1, size, size, generator=generator)
    shared = nn.functional.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)
    own = torch.randn(count, channels, size, size, generator=generator) * 0.3
    return 3 * shared + own + 0.5  # non-zero mean too: the whitening biases must centre it


def patch_features(model: FastNet, images: torch.Tensor) -> torch.Tensor:
    """The whitening conv's outputs, one row per 2x2 patch position, in float64."""
    with torch.no_grad():
        features = model.whiten(images)
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()


def test_registered_as_a_model_family():
    assert MODEL_FAMILIES["fastnet"] is FastNet
    assert MODEL_FAMILIES["fastnet_wide"] is FastNetWide
    assert MODEL_FAMILIES["fastnet_lean"] is FastNetLean


@pytest.mark.parametrize("family, widths, activate_after_add", [(FastNetWide, [128, 512, 512], False),
                                                                 (FastNetLean, [128, 384, 512], True)],
                         ids=["wide", "lean"])  # fmt: skip
def test_the_deep_variants_have_three_convolutions_per_group_with_a_skip(family, widths, activate_after_add):
    """fastnet_wide adds the GELU'd body to its input; fastnet_lean (airbench96's later network) applies the GELU
    after the add."""
    model = family(3, 32, 32, 10)
    groups = [module for module in model.features if isinstance(module, ResidualConvGroup)]
    assert [group.entry[0].out_channels for group in groups] == widths
    assert sum(isinstance(module, nn.Conv2d) for module in model.modules()) == 1 + 3 * 3
    group = groups[0].eval()
    features = torch.randn(2, 24, 31, 31)
    with torch.no_grad():
        entry = group.entry(features)
        inner = group.body[:5](entry)  # conv -> BN -> GELU -> conv -> BN
        before_add, after_add = entry + nn.functional.gelu(inner), nn.functional.gelu(entry + inner)
        expected, other = (after_add, before_add) if activate_after_add else (before_add, after_add)
        assert torch.allclose(group(features), expected) and not torch.allclose(group(features), other)
    # GELU has no parameters: both layouts name their weights alike, so saved wide models load as before.
    wide = FastNetWide(3, 32, 32, 10).state_dict()
    assert [key for key in model.state_dict() if "features.1." in key] == [key for key in wide if "features.1." in key]


@pytest.mark.parametrize("family, newest_weight", [(FastNet, 0.4), (FastNetWide, 0.4), (FastNetLean, 0.1)])
def test_running_statistics_keep_their_recipes_weight_on_the_running_value(family, newest_weight):
    """airbench's BatchNorm momentum 0.6 is the running value's weight: one training batch moves the running mean
    0.4 of the way to the batch's mean, in every norm of FastNet and FastNetWide. The later airbench96 network
    (FastNetLean) keeps torch's default, 0.1."""
    model = family(3, 32, 32, 10).train()
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    batch_means = []
    hooks = [norm.register_forward_hook(lambda module, inputs, _: batch_means.append(inputs[0].mean((0, 2, 3))))
             for norm in norms]  # fmt: skip
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    for norm, batch_mean in zip(norms, batch_means, strict=True):
        torch.testing.assert_close(norm.running_mean, newest_weight * batch_mean)


def test_depths_other_than_two_or_three_are_refused():
    with pytest.raises(ConfigError, match="fastnet depth must be 2 or 3"):
        FastNet(3, 32, 32, 10, depth=4)
    with pytest.raises(ConfigError, match="after a residual add, which only depth 3 has"):
        FastNet(3, 32, 32, 10, depth=2, activate_after_add=True)


@pytest.mark.parametrize(("height", "width", "channels"), [(32, 32, 3), (28, 28, 1), (8, 8, 1)])
def test_output_shape_for_kiln_input_sizes(height, width, channels):
    model = build_model(ModelSpec("fastnet", (height, width, channels), 10)).eval()
    images = torch.randn(3, channels, height, width)
    with torch.no_grad():
        logits = model(images)
        channels_last = model.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    assert logits.shape == (3, 10)
    assert torch.allclose(logits, channels_last, atol=1e-5)


def test_parameter_count_for_cifar10():
    model = FastNet(3, 32, 32, 10)
    total = sum(parameter.numel() for parameter in model.parameters())
    frozen = sum(parameter.numel() for parameter in model.parameters() if not parameter.requires_grad)
    # 24 whitening filters of 3x2x2 (frozen) + the groups' convs, BatchNorms (scales frozen) and the head.
    assert total == 1_972_792
    assert frozen == 24 * 12 + (64 + 64) + (256 + 256) + (256 + 256)


def test_images_smaller_than_the_whitening_patch_are_refused():
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 2x2"):
        FastNet(3, 1, 8, 10)


def test_prepare_whitens_the_patches_and_freezes_the_filters():
    images = correlated_images(200, 3, 16)
    model = FastNet(3, 16, 16, 10, widths=SMALL)
    raw = torch.cov(patch_features(model, images).T)  # before: ± raw pixels, strongly correlated
    assert (raw - torch.diag(torch.diag(raw))).abs().max() > 1.0

    model.prepare(images)

    weight = model.whiten.weight
    assert not weight.requires_grad
    assert weight.shape == (24, 3, 2, 2)
    assert torch.equal(weight[:12], -weight[12:])  # both signs of every filter
    features = patch_features(model, images)
    covariance = features.T @ features / len(features)  # uncentred: the biases must have centred the features
    kept = covariance[:12, :12]
    variances = torch.diag(kept)
    # Whitened: uncorrelated, unit variance wherever the data varies. The eps of the filters, 1/sqrt(l + eps),
    # leaves l/(l + eps): 1 for the strong directions, smaller only for directions of very little variance.
    assert (kept - torch.diag(variances)).abs().max() < 1e-6
    assert torch.all(variances <= 1 + 1e-6)
    assert variances[:8].min() > 0.98
    assert torch.all(variances[:-1] >= variances[1:] - 1e-9)  # filters sorted by decreasing eigenvalue
    assert features.mean(dim=0).abs().max() < 1e-6


def test_prepare_is_deterministic_and_independent_of_chunking(monkeypatch):
    import kiln.models.fastnet as fastnet

    images = correlated_images(300, 1, 8)
    first, second, chunked = (FastNet(1, 8, 8, 10, widths=SMALL) for _ in range(3))
    first.prepare(images)
    second.prepare(images)
    monkeypatch.setattr(fastnet, "PREPARE_CHUNK", 7)
    chunked.prepare(images)
    assert torch.equal(first.whiten.weight, second.whiten.weight)
    assert torch.allclose(first.whiten.weight, chunked.whiten.weight, atol=1e-6)
    assert torch.allclose(first.whiten.bias, chunked.whiten.bias, atol=1e-6)


def learnable_batch(count: int = 96, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 grayscale noise with a bright 3x3 square in one of three places: the place is the label."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    images = torch.randn(count, 1, 8, 8, generator=generator) * 0.5
    for index, label in enumerate(labels.tolist()):
        images[index, 0, 1 + 2 * label : 4 + 2 * label, 1 + 2 * label : 4 + 2 * label] += 2.0
    return images, labels


def train_steps(model: nn.Module, images, labels, steps: int, lr: float = 0.4) -> list[float]:
    """Plain nesterov SGD; the lr is high by usual standards because the head scales the logits down by 9."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9, nesterov=True)
    losses = []
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "default-whitening"])
def test_a_few_sgd_steps_lower_the_loss_and_keep_the_frozen_weights(prepared, depth):
    torch.manual_seed(0)
    images, labels = learnable_batch()
    model = FastNet(1, 8, 8, 3, widths=SMALL, depth=depth)
    if prepared:
        model.prepare(images)
    whitening = model.whiten.weight.detach().clone()
    losses = train_steps(model, images, labels, steps=20)
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(model.whiten.weight, whitening)
    norm_scales = [module.weight for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    assert all(torch.equal(scale, torch.ones_like(scale)) for scale in norm_scales)


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "default-whitening"])
def test_training_on_a_constant_background_keeps_the_weights_bounded(prepared):
    # Digits-like images: every pixel not in the bright square is exactly the background value. An identity-
    # initialised conv chain once carried a channel that was constant after pooling there; BatchNorm divided its
    # zero variance by sqrt(eps) and five steps grew the weights ~1e9-fold (float accuracy hid it, int8 did not).
    torch.manual_seed(0)
    images, labels = learnable_batch()
    images = torch.where(images > 1.0, images, torch.full_like(images, -1.0))
    model = FastNet(1, 8, 8, 3, widths=SMALL)
    if prepared:
        model.prepare(images)
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)][1:]  # the trained ones
    before = [float(conv.weight.detach().norm()) for conv in convs]
    train_steps(model, images, labels, steps=5)
    growth = [float(conv.weight.detach().norm()) / norm for conv, norm in zip(convs, before)]
    assert max(growth) < 2.0, growth


@pytest.mark.parametrize("depth", [2, 3])
def test_identity_init_makes_each_square_convolution_pass_its_input_through(depth):
    torch.manual_seed(0)
    model = FastNet(3, 8, 8, 3, widths=SMALL, depth=depth)
    model.identity_init()
    convs = [module for module in model.features.modules() if isinstance(module, nn.Conv2d)]
    square = [conv for conv in convs if conv.in_channels == conv.out_channels]
    assert len(square) >= len(SMALL) * (depth - 1)  # at least the second conv of every group
    for conv in square:
        inputs = torch.randn(2, conv.in_channels, 4, 4)
        assert torch.allclose(conv(inputs), inputs)
    widening = convs[0]  # whitening's 24 channels -> 16: its first 16 filters are identities of input channels
    inputs = torch.randn(2, widening.in_channels, 4, 4)
    assert torch.allclose(widening(inputs), inputs[:, : widening.out_channels])
    assert torch.equal(model.whiten.weight, FastNet(3, 8, 8, 3, widths=SMALL, depth=depth).whiten.weight)


@pytest.mark.parametrize("name", ["fastnet", "fastnet_wide", "fastnet_lean"])
def test_saved_model_reloads_with_identical_outputs_without_preparing_again(tmp_path, name):
    torch.manual_seed(0)
    images, labels = learnable_batch()
    spec = ModelSpec(name, (8, 8, 1), 3)
    model = build_model(spec)
    model.prepare(images)
    train_steps(model, images, labels, steps=3)  # moves the BatchNorm statistics and the trainable weights
    save_model(model.eval(), spec, tmp_path)

    reloaded, reloaded_spec = load_model(tmp_path)

    assert reloaded_spec == spec
    assert torch.equal(reloaded.whiten.weight, model.whiten.weight)
    assert not reloaded.whiten.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


@pytest.mark.parametrize("depth, activate_after_add", [(2, False), (3, False), (3, True)],
                         ids=["fastnet", "fastnet_wide", "fastnet_lean"])  # fmt: skip
def test_onnx_export_matches_torch_and_quantizes_to_int8(tmp_path, depth, activate_after_add):
    from kiln.compression.quantization import quantize_int8

    torch.manual_seed(0)
    images = correlated_images(64, 3, 32)
    labels = torch.arange(64) % 10
    model = FastNet(3, 32, 32, 10, widths=SMALL, depth=depth, activate_after_add=activate_after_add)
    model.prepare(images)
    train_steps(model, images, labels, steps=2)
    model.eval()
    prep = Preprocessing(height=32, width=32, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    fp32_path = tmp_path / "model.fp32.onnx"

    info = export_onnx(model, prep, fp32_path, opset=18)

    assert info.exporter == "dynamo", info.dynamo_error
    inputs = images[:5].numpy()
    session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    onnx_probabilities = session.run(None, {INPUT_NAME: inputs})[0]
    np.testing.assert_allclose(onnx_probabilities, torch_probabilities(model, inputs), atol=1e-4)

    int8_path = tmp_path / "model.int8.onnx"
    quantize_int8(fp32_path, int8_path, images[:16].numpy(), CompressConfig())
    int8_session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    int8_probabilities = int8_session.run(None, {INPUT_NAME: inputs})[0]
    assert int8_probabilities.shape == (5, 10)
    np.testing.assert_allclose(int8_probabilities.sum(axis=1), 1.0, atol=1e-4)
