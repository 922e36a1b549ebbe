"""Model families, each sized from the dataset's image shape and class count.

A trained model is stored as `model.json` (a ModelSpec) plus `weights.pt` (a state_dict), and loaded back with
`torch.load(weights_only=True)`: no arbitrary object is ever unpickled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.errors import ConfigError, IntegrityError
from kiln.models.cnn import LeNet, SimpleCNN
from kiln.models.fastnet import FastNet, FastNetLean, FastNetWide
from kiln.models.mlp import MLP
from kiln.models.resnet import ResNet9

MODEL_FAMILIES: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "simple_cnn": SimpleCNN,
    "lenet": LeNet,
    "resnet9": ResNet9,
    "fastnet": FastNet,
    "fastnet_wide": FastNetWide,
    "fastnet_lean": FastNetLean,
}
WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "model.json"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the architecture: family, input shape (H, W, C) and class count."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "ModelSpec":
        return cls(name=raw["name"], image_shape=tuple(raw["image_shape"]), num_classes=int(raw["num_classes"]))

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["image_shape"] = list(self.image_shape)
        return raw


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model for `spec`. Raises ConfigError for an unknown family."""
    family = MODEL_FAMILIES.get(spec.name)
    if family is None:
        raise ConfigError(f"unknown model {spec.name!r}; choose one of: {', '.join(MODEL_FAMILIES)}")
    height, width, channels = spec.image_shape
    return family(in_channels=channels, height=height, width=width, num_classes=spec.num_classes)


def family_of(model: nn.Module) -> str | None:
    """The family name `model` was built as (its exact class), or None for a model kiln did not build."""
    return next((name for name, family in MODEL_FAMILIES.items() if type(model) is family), None)


def save_model(model: nn.Module, spec: ModelSpec, out_dir: Path) -> None:
    import json

    (out_dir / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    torch.save({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}, out_dir / WEIGHTS_FILE)


def load_model(directory: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model saved in `directory` (eval mode, CPU). Refuses anything but plain tensors."""
    import json

    spec = ModelSpec.from_json(json.loads((directory / SPEC_FILE).read_text()))
    model = build_model(spec)
    try:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError for unsafe/corrupt files
        raise IntegrityError(
            f"{directory / WEIGHTS_FILE} is not a plain tensor state_dict ({error.__class__.__name__}); "
            f"refusing to load it — retrain or restore the file"
        ) from None
    model.load_state_dict(state)
    return model.eval(), spec
