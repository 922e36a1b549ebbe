"""Where a training run's time goes: torch.profiler around one `fit`, reduced to what decides the next change.

On a GPU, a small network's step is either bound by the device's arithmetic or by the host issuing its kernels.
`busy_share` (the device's summed kernel time over the run's training seconds) tells which: near 1, the GPU is
the limit; well below it, the host is, and fewer launches (compiling, CUDA graphs) or a quieter host would pay.
The profiler adds host overhead of its own, so compare traces taken the same way, not with untraced timings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

TOP_OPERATORS = 12


@contextlib.contextmanager
def profiled(device: torch.device) -> Iterator[torch.profiler.profile]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        yield profiler


def summarize(profiler: torch.profiler.profile, training_seconds: float, steps: int) -> dict[str, Any]:
    """The trace's totals per step and its top operators by device time and by host time (milliseconds)."""
    events = profiler.key_averages()
    device_us = sum(_device_us(event) for event in events)
    host_us = sum(event.self_cpu_time_total for event in events)
    steps = max(steps, 1)
    return {
        "training_seconds": round(training_seconds, 3),
        "steps": steps,
        "device_ms_per_step": round(device_us / 1e3 / steps, 3),
        "host_ms_per_step": round(host_us / 1e3 / steps, 3),
        "busy_share": round(device_us / 1e6 / training_seconds, 3) if device_us and training_seconds > 0 else None,
        "kernels_per_step": round(sum(event.count for event in events if _device_us(event) > 0) / steps, 1),
        "top_device": _top(events, _device_us),
        "top_host": _top(events, lambda event: event.self_cpu_time_total),
    }


def format_summary(summary: dict[str, Any], rows: int = 2 * TOP_OPERATORS) -> str:
    busy = summary["busy_share"]
    busy_text = f"; the device busy {busy:.0%} of the time" if busy is not None else ""
    lines = [
        f"{summary['steps']} steps in {summary['training_seconds']} s of training: device "
        f"{summary['device_ms_per_step']} ms a step ({summary['kernels_per_step']} timed device operations), host "
        f"{summary['host_ms_per_step']} ms a step{busy_text}",
        "| operator | calls | device ms | host ms |",
        "|---|---|---|---|",
    ]
    operators = {row["operator"]: row for row in summary["top_device"] + summary["top_host"]}
    ranked = sorted(operators.values(), key=lambda row: (-row["device_ms"], -row["host_ms"]))[:rows]
    for row in ranked:
        lines.append(f"| {row['operator'][:70]} | {row['calls']} | {row['device_ms']} | {row['host_ms']} |")
    return "\n".join(lines)


def _device_us(event: Any) -> float:
    # torch renamed the CUDA-only field to a device-neutral one; either is the event's own kernel time
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) or 0.0)


def _top(events: Any, measure: Any) -> list[dict[str, Any]]:
    ranked = sorted((event for event in events if measure(event) > 0), key=measure, reverse=True)[:TOP_OPERATORS]
    return [
        {"operator": event.key, "calls": event.count, "device_ms": round(_device_us(event) / 1e3, 3),
         "host_ms": round(event.self_cpu_time_total / 1e3, 3)}  # fmt: skip
        for event in ranked
    ]
