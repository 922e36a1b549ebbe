"""Where a training run's time goes: torch.profiler over one whole epoch of a `fit`, reduced to what decides the
next change.

`EpochTrace` profiles the second epoch of a run through fit's `on_epoch` callback: the set-up (model, whitening,
the upload to the GPU) and the first epoch (compiling, recording CUDA graphs, cuDNN timing its algorithms) are the
profiler's warm-up and are discarded; the last epoch's checkpoint is after it.

On a GPU, a small network's step is either bound by the device's arithmetic or by the host issuing its kernels.
`busy_share` (the device's summed kernel time over the epoch's seconds) tells which: near 1, the GPU is the limit;
well below it, the host is, and fewer launches (compiling, CUDA graphs) or a quieter host would pay. The profiler
adds host overhead of its own, so compare traces taken the same way, not with untraced timings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import DeviceType

TOP_OPERATORS = 12
TRACED_EPOCH = 2


class EpochTrace:
    """with EpochTrace(device) as trace: fit(..., on_epoch=trace.on_epoch) for at least TRACED_EPOCH epochs; then
    trace.summary(steps_per_epoch)."""

    def __init__(self, device: torch.device):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=0, warmup=TRACED_EPOCH - 1, active=1, repeat=1)
        self.profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._ready)
        self.events: Any = None
        self.seconds: float | None = None

    def __enter__(self) -> EpochTrace:
        self.profiler.__enter__()
        return self

    def __exit__(self, *exception: Any) -> None:
        self.profiler.__exit__(*exception)

    def on_epoch(self, row: dict[str, Any]) -> None:
        if row["epoch"] == TRACED_EPOCH:
            self.seconds = row["seconds"]
        self.profiler.step()

    def summary(self, steps_per_epoch: int) -> dict[str, Any]:
        if self.events is None or self.seconds is None:
            raise RuntimeError(f"the run ended before its epoch {TRACED_EPOCH} was traced")
        return summarize(self.events, self.seconds, steps_per_epoch)

    def _ready(self, profiler: torch.profiler.profile) -> None:
        self.events = profiler.key_averages()


def summarize(events: Any, training_seconds: float, steps: int) -> dict[str, Any]:
    """Totals per step and the top operators by device time and by host time (milliseconds), from a profiler's
    key_averages(). Device time is summed over the device's own events (kernels, copies) only: an operator on the
    host also carries the time of the kernels it launched, which would count them twice."""
    events = [event for event in events if not _device_annotation(event)]
    on_device = [event for event in events if _on_device(event)]
    operators = [event for event in events if not _on_device(event)]
    device_us = sum(_device_us(event) for event in on_device)
    host_us = sum(event.self_cpu_time_total for event in operators)
    steps = max(steps, 1)
    return {
        "training_seconds": round(training_seconds, 3),
        "steps": steps,
        "device_ms_per_step": round(device_us / 1e3 / steps, 3),
        "host_ms_per_step": round(host_us / 1e3 / steps, 3),
        "busy_share": round(device_us / 1e6 / training_seconds, 3) if device_us and training_seconds > 0 else None,
        "kernels_per_step": round(sum(event.count for event in on_device) / steps, 1),
        "top_device": _top(operators, _device_us),
        "top_host": _top(operators, lambda event: event.self_cpu_time_total),
    }


def format_summary(summary: dict[str, Any], rows: int = 2 * TOP_OPERATORS) -> str:
    busy = summary["busy_share"]
    busy_text = f"; the device busy {busy:.0%} of the time" if busy is not None else ""
    lines = [
        f"{summary['steps']} steps in {summary['training_seconds']} s of training: device "
        f"{summary['device_ms_per_step']} ms a step ({summary['kernels_per_step']} device operations), host "
        f"{summary['host_ms_per_step']} ms a step{busy_text}",
        "| operator | calls | device ms | host ms |",
        "|---|---|---|---|",
    ]
    operators = {row["operator"]: row for row in summary["top_device"] + summary["top_host"]}
    ranked = sorted(operators.values(), key=lambda row: (-row["device_ms"], -row["host_ms"]))[:rows]
    for row in ranked:
        lines.append(f"| {row['operator'][:70]} | {row['calls']} | {row['device_ms']} | {row['host_ms']} |")
    return "\n".join(lines)


def _on_device(event: Any) -> bool:
    return getattr(event, "device_type", DeviceType.CPU) != DeviceType.CPU


def _device_annotation(event: Any) -> bool:
    """A record_function range (ProfilerStep#, an optimizer's step, a compiled graph's call) as it also appears on
    the device's timeline, spanning the kernels inside it: counting it would count them twice (torch's own table
    leaves it out too; an epoch's ProfilerStep alone would add 100 % to busy_share), and it is no operator. Its
    host-side row, the operator, stays."""
    return bool(getattr(event, "is_user_annotation", False)) and _on_device(event)


def _device_us(event: Any) -> float:
    # torch renamed the CUDA-only field to a device-neutral one; either is the event's own device time
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) or 0.0)


def _top(events: Any, measure: Any) -> list[dict[str, Any]]:
    ranked = sorted((event for event in events if measure(event) > 0), key=measure, reverse=True)[:TOP_OPERATORS]
    return [
        {"operator": event.key, "calls": event.count, "device_ms": round(_device_us(event) / 1e3, 3),
         "host_ms": round(event.self_cpu_time_total / 1e3, 3)}  # fmt: skip
        for event in ranked
    ]
