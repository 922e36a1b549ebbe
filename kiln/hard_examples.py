"""Training on the hardest examples of each batch, as a small proxy network ranks them (train.keep_hardest).

airbench96_faster (Keller Jordan, 2024) reached airbench96's 96 % on CIFAR-10 in about 20 % less time this way: a
network of a few percent of the main one's arithmetic sees every batch, and the main network takes its forward and
backward pass only on the share of the batch the proxy finds hardest (highest loss). Late in a long run most
examples are already fitted, so their gradients add little; skipping them halves the main network's work per
step. The proxy learns alongside, from its own hardest examples of every 4th batch, so its ranking keeps up.
Both losses are taken at the full batch's scale (summed over the kept examples, divided by the batch size), as
airbench sums them under a learning rate set per full batch: each kept example moves the weights as much as it
would in a full-batch step, so a recipe's lr and weight decay keep their meaning.

Written from that description; no code copied. The proxy is a FastNet whatever the main model (its ranking only
needs the images and labels), with its own random start and its whitening bias frozen, trained with the main
recipe's optimizer settings and schedule (so they should suit a fastnet, as the cifar10 profiles' do) and kept in
training mode. Its state is part of fit's checkpoint, so a resumed run ranks exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PROXY_WIDTHS = (32, 64, 64)  # airbench96_faster's proxy: about 1/40 of fastnet_wide's arithmetic, 1/7 of fastnet's
PROXY_TRAIN_INTERVAL = 4  # the proxy learns from every 4th batch: its ranking needs no more, and it stays cheap
ONE_PROCESS_ONLY = (
    "train.keep_hardest trains in one process only (each data-parallel process would rank just its own part of the "
    "batch): add --set train.devices=1, or --set train.keep_hardest=null"
)


def kept_count(batch: int, keep_fraction: float) -> int:
    """How many examples of a batch of `batch` the main model trains on: at least one."""
    return max(1, round(batch * keep_fraction))


class HardExampleSelector:
    """Per batch: rank the examples by the proxy's loss, keep the hardest `keep_fraction`, and (every
    PROXY_TRAIN_INTERVAL-th batch) take one proxy step on those. Built by `build_selector`."""

    def __init__(self, proxy: nn.Module, forward: Callable, optimizer: torch.optim.Optimizer, scheduler: Any,
                 autocast: Callable, precision: str, keep_fraction: float, label_smoothing: float):  # fmt: skip
        self.proxy, self.forward, self.optimizer, self.scheduler = proxy, forward, optimizer, scheduler
        self.autocast, self.keep_fraction, self.label_smoothing = autocast, keep_fraction, label_smoothing
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.steps = 0

    def select(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        learn = self.steps % PROXY_TRAIN_INTERVAL == 0
        with torch.set_grad_enabled(learn), self.autocast():
            logits = self.forward(inputs)
        losses = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing, reduction="none")
        # In batch order: which examples are kept must not depend on how topk orders its result.
        kept = losses.detach().topk(kept_count(len(labels), self.keep_fraction), sorted=False).indices.sort().values
        if learn:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses[kept].sum() / len(labels)).backward()  # at full-batch scale: see the module doc
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()  # every batch, so the proxy's lr follows the main run's schedule
        self.steps += 1
        chosen = inputs[kept]
        if inputs.is_contiguous(memory_format=torch.channels_last):
            chosen = chosen.contiguous(memory_format=torch.channels_last)
        return chosen, labels[kept]

    def state_dict(self) -> dict[str, Any]:
        return {
            "proxy": self.proxy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.proxy.load_state_dict(state["proxy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps = int(state["steps"])


def build_selector(sample: torch.Tensor, num_classes: int, config: Any, runtime: Any, total_steps: int,
                   channels_last: bool) -> HardExampleSelector:  # fmt: skip
    """A fresh proxy for `config` (a TrainConfig with keep_hardest set) on `runtime`'s device: whitened from
    `sample` (normalized training images, NCHW), with the main recipe's optimizer and schedule over `total_steps`."""
    from kiln.models.fastnet import FastNet
    from kiln.training import compiled, make_scheduler, optimizer_for_run

    _, channels, height, width = sample.shape
    with torch.random.fork_rng(devices=[]):  # a start of its own, not a copy of the main model's first filters
        torch.manual_seed(config.seed + 1)
        proxy = FastNet(channels, height, width, num_classes, widths=PROXY_WIDTHS)
    proxy.to(runtime.device)
    if channels_last:
        proxy.to(memory_format=torch.channels_last)
    if config.identity_init:
        proxy.identity_init()
    proxy.prepare(sample)
    proxy.whitening_bias().requires_grad_(False)  # as airbench's proxy: the data-derived centring is enough to rank
    proxy.train()
    optimizer = optimizer_for_run(proxy, config, runtime, total_steps)
    scheduler = make_scheduler(optimizer, config, total_steps)
    forward = compiled(proxy, config, runtime, total_steps)
    return HardExampleSelector(proxy, forward, optimizer, scheduler, runtime.autocast, runtime.precision,
                               config.keep_hardest, config.label_smoothing)  # fmt: skip
