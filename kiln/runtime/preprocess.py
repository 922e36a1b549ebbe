"""How raw uint8 images become the tensor-in model's input: shared by training, evaluation, export and the bundle.

The bundle's raw-image model computes the same steps inside its ONNX graph (kiln.onnx_graph).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """Resize to (height, width), convert to `channels`, scale to [0, 1], subtract mean, divide by std (NCHW)."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    input_dtype: str = "float32"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Preprocessing":
        return cls(
            height=int(raw["height"]),
            width=int(raw["width"]),
            channels=int(raw["channels"]),
            mean=tuple(float(value) for value in raw["mean"]),
            std=tuple(float(value) for value in raw["std"]),
            layout=raw.get("layout", "NCHW"),
            input_dtype=raw.get("input_dtype", "float32"),
        )

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["mean"], raw["std"] = list(self.mean), list(self.std)
        raw["pixel_scale"] = "uint8 / 255"
        return raw

    def normalize(self, images_nhwc: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> float32 [N, C, H, W], normalized."""
        scaled = images_nhwc.astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2))
