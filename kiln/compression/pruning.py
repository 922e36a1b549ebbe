"""Pruning a trained kiln model: structured (whole channels removed, layers rebuilt smaller) and unstructured
(individual weights set to zero).

Structured pruning removes the same share of output channels from every prunable layer, keeping the channels whose
BatchNorm-folded filters have the largest L1 norm (Li et al., 2017, "Pruning Filters for Efficient ConvNets"). The
layers are rebuilt with fewer channels, so parameters, multiply-accumulates and dense CPU/GPU time all shrink.
Channels that must stay aligned are pruned together: the two producers of a residual sum (the block's input and its
body's last convolution) share one choice, and every consumer of a channel (the next convolution, or the columns of
a linear layer after Flatten) loses exactly the removed inputs. Kept counts are rounded to multiples of 8 for layers
of 32 channels or more, the widths CPU and GPU kernels vectorize best.

Why not torch-pruning (DepGraph, PyPI `torch-pruning`)? It is the maintained library for arbitrary graphs, and it
would be the right choice for user-defined architectures. kiln builds only four families (kiln/models: mlp,
simple_cnn, lenet, resnet9) whose channel coupling is one pattern (a chain, plus ResNet-9's residual sums): the
walker below covers them in about a hundred lines, refuses any layer it does not know instead of guessing, and
costs no dependency in the training image. Revisit this if kiln grows branching or grouped/depthwise layers.

Unstructured pruning uses torch.nn.utils.prune (maintained in torch): global L1 magnitude over every conv and linear
weight. The zeros make the file compress well (gzip), but a dense ONNX graph still multiplies by them: it does not
speed up dense kernels, and the report says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from kiln.errors import ConfigError
from kiln.models.cnn import LeNet, SimpleCNN
from kiln.models.mlp import MLP
from kiln.models.resnet import Residual, ResNet9

ROUND_TO = 8  # kept channel counts are multiples of this ...
ROUND_FROM = 32  # ... in layers at least this wide (in narrower ones a step of 8 is too coarse)
# Layers that neither mix nor reorder channels: a channel choice passes through them unchanged.
CHANNEL_PRESERVING = (
    nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Flatten,
    nn.Dropout,
)  # fmt: skip
PrunableLayer = nn.Conv2d | nn.Linear


@dataclass
class Producer:
    """A layer whose output channels (conv filters, linear rows) form a group, with the BatchNorm that follows it."""

    layer: PrunableLayer
    norm: nn.BatchNorm2d | None = None


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together: produced by `producers`, read by `consumers`."""

    producers: list[Producer]
    consumers: list[PrunableLayer] = field(default_factory=list)

    @property
    def width(self) -> int:
        return _out_channels(self.producers[0].layer)


# Both prune_structured and a "slim" distillation student (slim_copy) need the channel groups.
_HANDLED_FAMILIES = (
    "it handles kiln's families mlp, simple_cnn, lenet and resnet9. Remove prune_structured from compress.variants, "
    "and for distill/distill_int8 set compress.distill_student to a model family instead of slim"
)


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The prunable channel groups of a kiln model, in forward order. The classifier's outputs are never in one.

    Raises ConfigError for a model whose layer sequence kiln does not know how to prune safely.
    """
    groups: list[ChannelGroup] = []
    current: ChannelGroup | None = None

    def visit(module: nn.Module) -> None:
        nonlocal current
        if isinstance(module, PrunableLayer):
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ConfigError(f"structured pruning does not handle grouped convolutions ({module})")
            if current is not None:
                current.consumers.append(module)
            current = ChannelGroup([Producer(module)])
            groups.append(current)
        elif isinstance(module, nn.BatchNorm2d):
            if current is None or current.producers[-1].norm is not None:
                raise ConfigError(f"structured pruning found a BatchNorm without a convolution before it ({module})")
            current.producers[-1].norm = module
        elif isinstance(module, Residual):
            trunk = current
            visit(module.body)
            body_output = current
            if trunk is None or body_output is None or body_output is trunk:
                raise ConfigError("structured pruning needs a residual block between two layers, with a layer inside")
            # x + body(x): the body's output channels are added to the trunk's, so they are one group.
            trunk.producers += body_output.producers
            trunk.consumers += body_output.consumers
            groups.remove(body_output)
            current = trunk
        elif isinstance(module, nn.Sequential):
            for child in module:
                visit(child)
        elif not isinstance(module, CHANNEL_PRESERVING):
            raise ConfigError(
                f"structured pruning does not know the layer {module.__class__.__name__}; {_HANDLED_FAMILIES}"
            )

    for module in _forward_sequence(model):
        visit(module)
    return [group for group in groups if group.consumers]


def prune_channels(model: nn.Module, amount: float) -> tuple[nn.Module, list[tuple[int, int]]]:
    """A copy of `model` with `amount` (0..1) of the channels of every group removed, least important first.

    Returns the smaller model and each group's (width before, width after).
    """
    pruned = copy.deepcopy(model).cpu().eval()
    groups = channel_groups(pruned)
    keeps = [_most_important(group, kept_channels(group.width, 1.0 - amount)) for group in groups]
    widths = [(group.width, len(keep)) for group, keep in zip(groups, keeps)]
    for group, keep in zip(groups, keeps):  # every choice is made on the original weights, then applied
        _apply(group, keep)
    return pruned, widths


def slim_copy(model: nn.Module, width: float) -> nn.Module:
    """A freshly initialized copy of `model`'s architecture with every channel group scaled by `width`.

    The student for knowledge distillation: same design as the teacher, about width² of its parameters.
    """
    slim = copy.deepcopy(model).cpu()
    for group in channel_groups(slim):
        _apply(group, torch.arange(kept_channels(group.width, width)))
    for module in slim.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            module.reset_parameters()  # initialized for the new fan-in, not the teacher's
    return slim


def kept_channels(width: int, keep_fraction: float) -> int:
    """How many of `width` channels to keep: round(width × keep_fraction), at least 1, multiples of ROUND_TO for
    layers of ROUND_FROM channels or more, never more than `width`."""
    kept = round(width * keep_fraction)
    if width >= ROUND_FROM:
        kept = ROUND_TO * round(kept / ROUND_TO)
    return min(max(kept, ROUND_TO if width >= ROUND_FROM else 1), width)


def prune_unstructured(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of `model` whose smallest-magnitude conv/linear weights (a `sparsity` share of all of them, chosen
    globally) are masked to zero. The masks stay attached (torch.nn.utils.prune) so fine-tuning keeps them at zero;
    call `make_pruning_permanent` before exporting. Frozen weights (FastNet's data-derived whitening filters) are
    left whole: they are not learned, so fine-tuning could not make up for them."""
    sparse = copy.deepcopy(model).cpu().eval()
    weights = [
        (module, "weight")
        for module in sparse.modules()
        if isinstance(module, PrunableLayer) and module.weight.requires_grad
    ]
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=sparsity)
    return sparse


def make_pruning_permanent(model: nn.Module) -> nn.Module:
    """Fold torch.nn.utils.prune masks into plain weights (zeros included), so the model exports like any other."""
    for module in model.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
    return model


def weight_sparsity(model: nn.Module) -> float:
    """Share of conv/linear weights that are exactly zero."""
    weights = [module.weight for module in model.modules() if isinstance(module, PrunableLayer)]
    total = sum(weight.numel() for weight in weights)
    return float(sum(int((weight == 0).sum()) for weight in weights) / max(total, 1))


def _forward_sequence(model: nn.Module) -> list[nn.Module]:
    """The top-level modules of a kiln model in the order its forward() applies them."""
    if isinstance(model, ResNet9):
        return [model.features, model.head]  # the head_scale multiply after it touches no channel
    if isinstance(model, (SimpleCNN, LeNet)):
        return [model.features, model.classifier]
    if isinstance(model, MLP):
        return [model.layers]
    raise ConfigError(
        f"structured pruning does not know the model {model.__class__.__name__}; {_HANDLED_FAMILIES}"
    )


def _out_channels(layer: PrunableLayer) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


@torch.no_grad()
def _importance(group: ChannelGroup) -> torch.Tensor:
    """Per channel: the L1 norm of its effective (BatchNorm-folded) filters and bias, summed over the producers."""
    score = torch.zeros(group.width)
    for producer in group.producers:
        weight = producer.layer.weight.detach().float()
        bias = producer.layer.bias.detach().float() if producer.layer.bias is not None else torch.zeros(group.width)
        if producer.norm is not None:
            norm = producer.norm
            scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
            weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
            bias = norm.bias.detach() + (bias - norm.running_mean) * scale
        score += weight.abs().flatten(1).sum(dim=1) + bias.abs()
    return score


def _most_important(group: ChannelGroup, count: int) -> torch.Tensor:
    return torch.sort(torch.topk(_importance(group), count).indices).values


@torch.no_grad()
def _apply(group: ChannelGroup, keep: torch.Tensor) -> None:
    """Rebuild the group's layers in place with only the `keep` channels."""
    width = group.width
    for producer in group.producers:
        layer = producer.layer
        layer.weight = nn.Parameter(layer.weight[keep].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[keep].clone())
        if isinstance(layer, nn.Conv2d):
            layer.out_channels = len(keep)
        else:
            layer.out_features = len(keep)
        if producer.norm is not None:
            norm = producer.norm
            norm.weight = nn.Parameter(norm.weight[keep].clone())
            norm.bias = nn.Parameter(norm.bias[keep].clone())
            norm.running_mean = norm.running_mean[keep].clone()
            norm.running_var = norm.running_var[keep].clone()
            norm.num_features = len(keep)
    for layer in group.consumers:
        if isinstance(layer, nn.Conv2d):
            layer.weight = nn.Parameter(layer.weight[:, keep].clone())
            layer.in_channels = len(keep)
        else:
            # After Flatten a channel is `per_channel` consecutive inputs (its H x W positions, channel-major).
            per_channel = layer.in_features // width
            columns = (keep.view(-1, 1) * per_channel + torch.arange(per_channel)).flatten()
            layer.weight = nn.Parameter(layer.weight[:, columns].clone())
            layer.in_features = len(columns)
