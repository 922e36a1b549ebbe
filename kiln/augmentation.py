"""Augmentation policies as versioned JSON specs, turned into torchvision transforms v2 pipelines.

A spec is data (`{"version": 1, "ops": [{"op": "RandomCrop", ...}, ...]}`) so the train stage, the preview and a
later reader all build exactly the same transform from the augment stage's output.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from kiln.config import AugmentConfig
from kiln.errors import ConfigError

POLICY_SPEC_VERSION = 1
_OPS = {
    "RandomCrop": v2.RandomCrop,
    "RandomHorizontalFlip": v2.RandomHorizontalFlip,
}


def resolve_policy(config: AugmentConfig, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The spec for `config.policy` on images of (height, width, channels).

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
        ops.append({"op": "RandomHorizontalFlip", "p": 0.5})
    return {"version": POLICY_SPEC_VERSION, "policy": policy, "image_shape": list(image_shape), "ops": ops}


def build_transform(spec: dict[str, Any]) -> v2.Compose | v2.Identity:
    """A v2 pipeline for uint8 CHW tensors from a policy spec. Raises ConfigError on an unknown op or version."""
    if spec.get("version") != POLICY_SPEC_VERSION:
        raise ConfigError(f"augmentation policy version {spec.get('version')!r} is not supported by this kiln")
    transforms = []
    for op in spec["ops"]:
        arguments = {name: value for name, value in op.items() if name != "op"}
        if op["op"] not in _OPS:
            raise ConfigError(f"unknown augmentation op {op['op']!r}; known: {', '.join(_OPS)}")
        if "padding_mode" in arguments and min(spec["image_shape"][:2]) <= arguments.get("padding", 0):
            arguments["padding_mode"] = "constant"  # reflect padding needs the image larger than the pad
        transforms.append(_OPS[op["op"]](**arguments))
    return v2.Compose(transforms) if transforms else v2.Identity()


def augment_batch(transform: v2.Transform, images_nchw: torch.Tensor) -> torch.Tensor:
    """Apply `transform` to each image independently (v2 would share one random draw across a batch)."""
    return torch.stack([transform(image) for image in images_nchw])
