"""The device data path: the training split lives on the training device as uint8 and is augmented there per batch.

Why: a small, fast model on a GPU outruns any per-image CPU pipeline (on an H100, a torchvision DataLoader with 16
workers delivered 36.5k img/s to a ResNet-9 that trains at 80-116k img/s), while the same augmentation done on
GPU-resident uint8 tensors runs at millions of images per second. So the dataset is copied to the device once
(CIFAR-10's 50,000 32x32x3 images are 150 MB), reflect-padded once, and each batch is gathered, cropped, flipped,
cut out, normalized and laid out channels_last by a handful of batched tensor operations.

Every random draw of an epoch (order, crop offsets, flips, cutout centres) comes from one CPU `torch.Generator`
and is moved to the device in one transfer per epoch, so a seeded run draws the same numbers on any device and a
resumed run continues the same sequence. The ops implement the augment stage's policy spec (kiln/augmentation.py):
RandomCrop (with padding: a random translation), RandomHorizontalFlip and Cutout, with the same meaning as the
per-image torchvision v2 path of the DataLoader, which remains the fallback for data too large for the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln.errors import ConfigError
from kiln.runtime.preprocess import Preprocessing

DEVICE_OPS = ("RandomCrop", "RandomHorizontalFlip", "Cutout")
MAX_DEVICE_SHARE = 0.25  # the padded dataset may use at most this share of the device's free memory


@dataclass(frozen=True)
class _Crop:
    height: int
    width: int
    padding: int


@dataclass(frozen=True)
class _Cutout:
    size: int
    fill: torch.Tensor  # uint8 [1, C, 1, 1] on the device: made once, as a copy from the host per batch would wait
    # for the GPU to finish its queued work
    inside: bool = False  # the square wholly inside the image (augment.cutout_inside), else centred anywhere


class DeviceBatches:
    """Augmented, normalized training batches drawn from a device-resident copy of the training split."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        policy: dict[str, Any],
        prep: Preprocessing,
        device: torch.device,
        batch_size: int,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        seed: int = 0,
    ):
        """`images` uint8 [N, H, W, C]; `policy` the augment stage's spec; `shard` (rank, world size): in data-parallel
        training each rank takes every world-th sample of each global batch of `batch_size`; `seed` picks which images
        an alternating flip mirrors in odd epochs. Raises ConfigError for an op this path cannot run (use the
        DataLoader path for it)."""
        self.device, self.batch_size, self.channels_last = device, batch_size, channels_last
        self.rank, self.world_size = shard
        self.count = len(labels)
        self.drop_last = self.count > batch_size  # as the DataLoader path: full batches only, unless one is all
        self.crop, self.flip_probability, self.cutout = _parse_policy(policy, device)
        self.odd_epoch_flips = None
        if self.flip_probability > 0 and alternating_flip(policy):
            draws = torch.rand(self.count, generator=torch.Generator().manual_seed(seed))
            self.odd_epoch_flips = draws < self.flip_probability  # on the CPU, like every other draw
        padding = self.crop.padding if self.crop else 0
        nchw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.images = _reflect_pad(nchw.to(device), padding)  # uint8 [N, C, H + 2p, W + 2p], once
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        shape = (1, prep.channels, 1, 1)
        self.scale = (1.0 / (255.0 * torch.tensor(prep.std, device=device))).view(shape)
        self.shift = (-torch.tensor(prep.mean, device=device) / torch.tensor(prep.std, device=device)).view(shape)
        self.height, self.width = images.shape[1], images.shape[2]
        # Index ranges made once: in eager mode each tensor made per batch is one more launch the host must issue
        self.rows = torch.arange(self.height, device=device)
        self.columns = torch.arange(self.width, device=device)
        self.channels = torch.arange(self.images.shape[1], device=device)

    def __len__(self) -> int:
        return self.count // self.batch_size if self.drop_last else -(-self.count // self.batch_size)

    def epoch(self, generator: torch.Generator, number: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Pass `number` (from 1) in a random order: (normalized float images [B, C, H, W], labels [B]) on the
        device."""
        draws = self._draw(generator, number)  # every rank draws the same numbers from one seed: the same batches
        draws["labels"] = self.labels[draws["order"]]
        for batch in range(len(self)):
            start = batch * self.batch_size
            # this rank's share of the batch's positions: a slice, so every draw below is a view, not a gather
            chosen = slice(start + self.rank, min(start + self.batch_size, self.count), self.world_size)
            yield self._augment(draws, chosen), draws["labels"][chosen]

    def _draw(self, generator: torch.Generator, number: int) -> dict[str, torch.Tensor]:
        count = self.count
        draws = {"order": torch.randperm(count, generator=generator)}
        if self.crop is not None:
            span = 2 * self.crop.padding + 1
            draws["dy"] = torch.randint(0, span, (count,), generator=generator)
            draws["dx"] = torch.randint(0, span, (count,), generator=generator)
        if self.odd_epoch_flips is not None:  # mirrored in odd epochs, the others in even ones
            draws["flip"] = self.odd_epoch_flips[draws["order"]] ^ (number % 2 == 0)
        elif self.flip_probability > 0:
            draws["flip"] = torch.rand(count, generator=generator) < self.flip_probability
        if self.cutout is not None and self.cutout.inside:  # centres that keep the whole square on the image
            low, size = self.cutout.size // 2, self.cutout.size
            draws["cy"] = low + torch.randint(0, max(self.height - size, 0) + 1, (count,), generator=generator)
            draws["cx"] = low + torch.randint(0, max(self.width - size, 0) + 1, (count,), generator=generator)
        elif self.cutout is not None:
            draws["cy"] = torch.randint(0, self.height, (count,), generator=generator)
            draws["cx"] = torch.randint(0, self.width, (count,), generator=generator)
        return {name: values.to(self.device, non_blocking=True) for name, values in draws.items()}

    def _augment(self, draws: dict[str, torch.Tensor], chosen: slice) -> torch.Tensor:
        order = draws["order"][chosen]
        if self.crop is not None:
            images = _crop(self.images, order, draws["dy"][chosen], draws["dx"][chosen], self.rows, self.columns,
                           self.channels)  # fmt: skip
        else:
            images = self.images[order]
        if "flip" in draws:
            images = torch.where(draws["flip"][chosen].view(-1, 1, 1, 1), images.flip(3), images)
        if self.cutout is not None:
            images = _cut_out(images, draws["cy"][chosen], draws["cx"][chosen], self.cutout, self.rows, self.columns)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images.float() * self.scale + self.shift  # (x / 255 - mean) / std, in one fused multiply-add


def fits_on_device(images: np.ndarray, policy: dict[str, Any], device: torch.device) -> tuple[bool, str]:
    """Whether the padded training split fits the device's memory budget, and why not."""
    padding = next((int(op.get("padding", 0)) for op in policy.get("ops", []) if op["op"] == "RandomCrop"), 0)
    count, height, width, channels = images.shape
    needed = count * channels * (height + 2 * padding) * (width + 2 * padding)
    if device.type != "cuda":
        return True, ""
    free, _ = torch.cuda.mem_get_info(device)
    if needed > MAX_DEVICE_SHARE * free:
        return False, (
            f"the training split needs {needed / 1e9:.1f} GB on the device, over {MAX_DEVICE_SHARE:.0%} of the "
            f"{free / 1e9:.1f} GB free: using the DataLoader path"
        )
    return True, ""


def unsupported_ops(policy: dict[str, Any]) -> list[str]:
    return [op["op"] for op in policy.get("ops", []) if op["op"] not in DEVICE_OPS]


def _parse_policy(policy: dict[str, Any], device: torch.device) -> tuple[_Crop | None, float, _Cutout | None]:
    unknown = unsupported_ops(policy)
    if unknown:
        raise ConfigError(
            f"the device data path cannot run augmentation op(s) {', '.join(unknown)}; set train.data_path=loader"
        )
    crop, flip, cutout = None, 0.0, None
    for op in policy.get("ops", []):
        if op["op"] == "RandomCrop":
            height, width = op["size"]
            crop = _Crop(int(height), int(width), int(op.get("padding", 0)))
        elif op["op"] == "RandomHorizontalFlip":
            flip = float(op.get("p", 0.5))
        elif op["op"] == "Cutout":
            fill = torch.tensor([int(value) for value in op["fill"]], dtype=torch.uint8, device=device)
            cutout = _Cutout(int(op["size"]), fill.view(1, -1, 1, 1), bool(op.get("inside", False)))
    return crop, flip, cutout


def alternating_flip(policy: dict[str, Any]) -> bool:
    return any(op["op"] == "RandomHorizontalFlip" and op.get("alternate") for op in policy.get("ops", []))


def _reflect_pad(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Reflect-pad uint8 NCHW by gathering rows and columns (F.pad's reflect mode does not take integer tensors).
    Images no larger than the padding get zero padding, as the v2 path does (kiln/augmentation.py)."""
    if padding == 0:
        return images
    height, width = images.shape[2:]
    if min(height, width) <= padding:
        return torch.nn.functional.pad(images, (padding,) * 4)
    rows = _reflected_indices(height, padding, images.device)
    columns = _reflected_indices(width, padding, images.device)
    return images[:, :, rows][:, :, :, columns]


def _reflected_indices(size: int, padding: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(-padding, size + padding, device=device).abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)


def _crop(padded: torch.Tensor, order: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, rows: torch.Tensor,
          columns: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Per-sample crops of len(rows) x len(columns) at offsets (dy, dx) of the padded images, as one gather;
    `rows`, `columns`, `channels`: arange(height), arange(width), arange(channels) on the images' device."""
    height, width = len(rows), len(columns)
    crop_rows = (dy.view(-1, 1) + rows).view(-1, 1, height, 1)
    crop_columns = (dx.view(-1, 1) + columns).view(-1, 1, 1, width)
    return padded[order.view(-1, 1, 1, 1), channels.view(1, -1, 1, 1), crop_rows, crop_columns]


def _cut_out(images: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, cutout: _Cutout, rows: torch.Tensor,
             columns: torch.Tensor) -> torch.Tensor:
    """Fill a size x size square centred at (cy, cx) (clipped at the border) with the fill colour; `rows`,
    `columns`: arange(height), arange(width) on the images' device."""
    height, width = images.shape[2:]
    low = cutout.size // 2
    rows, columns = rows.view(1, height), columns.view(1, width)
    inside_rows = (rows >= (cy.view(-1, 1) - low)) & (rows < (cy.view(-1, 1) - low + cutout.size))
    inside_columns = (columns >= (cx.view(-1, 1) - low)) & (columns < (cx.view(-1, 1) - low + cutout.size))
    mask = (inside_rows.view(-1, 1, height, 1) & inside_columns.view(-1, 1, 1, width))
    return torch.where(mask, cutout.fill, images)
