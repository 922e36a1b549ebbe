"""How many operations the host dispatches in one training step of a profile: the work that bounds a small network's
speed when its GPU waits on the host (benchmarks/fit_trace.py's `busy_share` tells whether it does).

Runs kiln's own `fit` (the train stage's loop, on the device data path, uncompiled) for 3 epochs of synthetic images
and counts every aten operation dispatched in epoch 2 (a TorchDispatchMode between two `on_epoch` calls), leaving
out views and allocations, which launch nothing. On CUDA each counted operation is about one kernel launch: a fused
or multi-tensor (foreach) operation counts once, though one whose tensors differ in shape or layout runs as a launch
per tensor there (torch's slow path), and an addmm with a nonzero beta is two (a copy of the added matrix, then the
product). On a CPU torch's SGD and AdamW step one parameter at a time, where on CUDA
they are fused (fit asks for that), so CPU counts overstate an SGD step's. Counts, not timings: they do not depend
on the machine's load, and the batch size changes none of them (so a small one is the default).

    python benchmarks/step_ops.py --profile cifar10-fast --profile cifar10-long
    python benchmarks/step_ops.py --profile cifar10-fast --set train.optimizer=sgd --device cuda
    python benchmarks/step_ops.py --device cpu --outside-graph --set train.precision=bf16 --profile cifar10-long

The record-speed profiles capture their steps as CUDA graphs (train.cuda_graph, kiln/step_graph.py): on CUDA their
count is what the host dispatches around a captured step; `--set train.cuda_graph=false` counts the eager step. A
CPU has no graphs and runs the steps eagerly. `--outside-graph` counts there what the host still dispatches per
captured step: the step is "captured" by a stand-in that records nothing, and each replay does nothing, where on
CUDA one graph launch does the step's work.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import platform
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing kiln

from kiln import step_graph  # noqa: E402
from kiln.config import load_config  # noqa: E402
from kiln.dataset import ImageDataset  # noqa: E402
from kiln.errors import ConfigError  # noqa: E402
from kiln.training import resolve_runtime  # noqa: E402
from train_speed import train_once  # noqa: E402  (benchmarks/, the script's own folder)

COUNTED_EPOCH = 2  # the first epoch draws the first batches and fills the optimizer's state; the last one saves
STEPS_PER_EPOCH = 4
IMAGE_SHAPE = (32, 32, 3)
CLASSES = 10
NO_LAUNCH_OPERATIONS = frozenset({  # views, and allocations without a fill
    "alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice", "split", "squeeze", "t",
    "transpose", "unbind", "unsqueeze", "view", "_unsafe_view", "_reshape_alias", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided",
})  # fmt: skip
TOP_OPERATIONS = 15


class DispatchCount(TorchDispatchMode):
    """Counts the aten operations dispatched while active, by name (overload packet)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step_operations(profile: str, overrides: list[str], device: str = "cpu", batch_size: int = 64
                          ) -> dict[str, Any]:  # fmt: skip
    """Dispatched operations per step of the profile's training loop, with `overrides` (--set), on `device`."""
    settings = [f"train.batch_size={batch_size}", f"train.device={device}", "train.compile=off",
                "train.data_path=device", *overrides]  # fmt: skip
    config = load_config(profile, overrides=settings)
    runtime = resolve_runtime(config.train.device, config.train.precision)
    count = batch_size * STEPS_PER_EPOCH
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (count, *IMAGE_SHAPE), dtype=np.uint8)
    labels = generator.integers(0, CLASSES, count)
    dataset = ImageDataset("synthetic", [str(label) for label in range(CLASSES)], images, labels, images, labels)
    counter = DispatchCount()

    def on_epoch(row: dict[str, Any]) -> None:
        if row["epoch"] == COUNTED_EPOCH - 1:
            counter.__enter__()
        elif row["epoch"] == COUNTED_EPOCH:
            counter.__exit__(None, None, None)

    run = train_once(dataset, config, config.train.seed, epochs=3, evaluate=False, on_epoch=on_epoch)
    if run["data_path"] != "device":
        raise RuntimeError(f"{profile} trained on the {run['data_path']} path, not the device data path")
    launched = {name: calls for name, calls in counter.calls.items() if name not in NO_LAUNCH_OPERATIONS}
    top = sorted(launched.items(), key=lambda item: (-item[1], item[0]))[:TOP_OPERATIONS]
    return {
        "profile": profile,
        "overrides": overrides,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "model": config.train.model,
        "optimizer": config.train.optimizer,
        "operations_per_step": round(sum(launched.values()) / STEPS_PER_EPOCH, 2),
        "no_launch_per_step": round((sum(counter.calls.values()) - sum(launched.values())) / STEPS_PER_EPOCH, 2),
        "top": [{"operation": name, "per_step": round(calls / STEPS_PER_EPOCH, 2)} for name, calls in top],
    }


@contextlib.contextmanager
def steps_outside_the_graph() -> Iterator[None]:
    """train.cuda_graph captures through a stand-in: capture records nothing, a replay does nothing
    (--outside-graph)."""
    original = step_graph.backend_for
    skipped = step_graph.GraphBackend(contextlib.nullcontext, lambda function: lambda: None)
    step_graph.backend_for = lambda device: skipped
    try:
        yield
    finally:
        step_graph.backend_for = original


def format_counts(counts: dict[str, Any]) -> str:
    overrides = " ".join(f"--set {setting}" for setting in counts["overrides"])
    lines = [
        f"## {counts['profile']} {overrides}".rstrip() + f" ({counts['model']}, {counts['optimizer']}, "
        f"{counts['device']}, {counts['precision']})",
        f"{counts['operations_per_step']} operations dispatched per step (and {counts['no_launch_per_step']} views and "
        "allocations)",
        "| operation | per step |",
        "|---|---|",
        *(f"| {row['operation']} | {row['per_step']:g} |" for row in counts["top"]),
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="append", help="repeatable (default: cifar10-fast)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override the profile")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if present")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json-out", type=Path, help="also write the counts here (device_summary.py prints them)")
    parser.add_argument("--outside-graph", action="store_true", help="with train.cuda_graph on and a stand-in for "
                        "CUDA's capture: what the host dispatches around a captured step (see above)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.outside_graph:
        args.overrides = ["train.cuda_graph=true", *args.overrides]
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no usable CUDA device; use --device cpu (or auto)")
    if args.outside_graph and device == "cuda":
        raise SystemExit("--outside-graph stands in for CUDA graphs where there are none; on CUDA use --set "
                         "train.cuda_graph=true, which captures for real")  # fmt: skip
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    report: dict[str, Any] = {"device": name, "date": str(date.today()), "command": argv,
                              "overrides": args.overrides, "step_ops": []}  # fmt: skip
    for profile in args.profile or ["cifar10-fast"]:
        try:
            with steps_outside_the_graph() if args.outside_graph else contextlib.nullcontext():
                counts = count_step_operations(profile, args.overrides, device, args.batch_size)
        except ConfigError as error:  # an unknown profile or a --set the config refuses: its message, no traceback
            raise SystemExit(f"step_ops: {error}") from None
        print(format_counts(counts), flush=True)
        report["step_ops"].append(counts)
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
