"""Augmentation policies as versioned JSON specs, turned into torchvision transforms v2 pipelines.

A spec is data (`{"version": 1, "ops": [{"op": "RandomCrop", ...}, ...]}`) so the train stage, the preview and a
later reader all build exactly the same transform from the augment stage's output. The train stage's device data
path (kiln/device_data.py) runs the same ops batched on the GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from kiln.config import AugmentConfig
from kiln.errors import ConfigError

POLICY_SPEC_VERSION = 2  # 2: Cutout may be placed `inside`; a spec without it is still written as version 1,
# which older kilns read the same way; they refuse a version 2 spec instead of ignoring the placement
READABLE_SPEC_VERSIONS = (1, 2)
class Cutout(torch.nn.Module):
    """Fill a `size` x `size` square at a random centre (clipped at the border) with `fill` (DeVries & Taylor,
    2017), on one uint8 CHW image; with `inside`, at a random place wholly inside the image (airbench96).
    `fill` is the dataset's mean colour, which normalization maps to zero."""

    def __init__(self, size: int, fill: list[int], inside: bool = False):
        super().__init__()
        self.size, self.inside = int(size), bool(inside)
        self.fill = torch.tensor(fill, dtype=torch.uint8).view(-1, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if self.inside:
            top = int(torch.randint(0, max(height - self.size, 0) + 1, (1,)))
            left = int(torch.randint(0, max(width - self.size, 0) + 1, (1,)))
        else:
            top = int(torch.randint(0, height, (1,))) - self.size // 2
            left = int(torch.randint(0, width, (1,))) - self.size // 2
        out = image.clone()
        out[..., max(top, 0) : max(top + self.size, 0), max(left, 0) : max(left + self.size, 0)] = self.fill
        return out


_OPS = {
    "RandomCrop": v2.RandomCrop,
    "RandomHorizontalFlip": v2.RandomHorizontalFlip,
    "Cutout": Cutout,
}


def resolve_policy(
    config: AugmentConfig, image_shape: tuple[int, int, int], channel_mean: list[float] | None = None
) -> dict[str, Any]:
    """The spec for `config.policy` on images of (height, width, channels) whose training mean per channel (0..1)
    is `channel_mean` (the Cutout fill; mid-grey when not given).

    `auto` picks crop+flip for colour images and crop alone for grayscale, where flips change meaning
    (a mirrored 2 or 7 is not a digit).
    """
    height, width, channels = image_shape
    policy = config.policy
    if policy == "auto":
        policy = "crop_flip" if channels == 3 else "crop"
    padding = config.crop_padding if config.crop_padding is not None else max(1, min(height, width) // 8)
    ops: list[dict[str, Any]] = []
    if policy in ("crop", "crop_flip"):
        ops.append({"op": "RandomCrop", "size": [height, width], "padding": padding, "padding_mode": "reflect"})
    if policy == "crop_flip":
        flip = {"op": "RandomHorizontalFlip", "p": 0.5}
        ops.append({**flip, "alternate": True} if config.flip == "alternate" else flip)
    if config.cutout > 0 and policy != "none":
        mean = channel_mean if channel_mean is not None else [0.5] * channels
        cutout = {"op": "Cutout", "size": config.cutout, "fill": [int(round(255 * value)) for value in mean]}
        ops.append({**cutout, "inside": True} if config.cutout_inside else cutout)
    version = POLICY_SPEC_VERSION if any(op.get("inside") for op in ops) else 1
    return {"version": version, "policy": policy, "image_shape": list(image_shape), "ops": ops}


def build_transform(spec: dict[str, Any]) -> v2.Compose | v2.Identity:
    """A v2 pipeline for uint8 CHW tensors from a policy spec. Raises ConfigError on an unknown op or version."""
    if spec.get("version") not in READABLE_SPEC_VERSIONS:
        raise ConfigError(f"augmentation policy version {spec.get('version')!r} is not supported by this kiln")
    transforms = []
    for op in spec["ops"]:
        # Per image, without the epoch, an alternating flip can only be a random one (see AugmentConfig.flip).
        arguments = {name: value for name, value in op.items() if name not in ("op", "alternate")}
        if op["op"] not in _OPS:
            raise ConfigError(f"unknown augmentation op {op['op']!r}; known: {', '.join(_OPS)}")
        if "padding_mode" in arguments and min(spec["image_shape"][:2]) <= arguments.get("padding", 0):
            arguments["padding_mode"] = "constant"  # reflect padding needs the image larger than the pad
        transforms.append(_OPS[op["op"]](**arguments))
    return v2.Compose(transforms) if transforms else v2.Identity()


def augment_batch(transform: v2.Transform, images_nchw: torch.Tensor) -> torch.Tensor:
    """Apply `transform` to each image independently (v2 would share one random draw across a batch)."""
    return torch.stack([transform(image) for image in images_nchw])
