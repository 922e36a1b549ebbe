"""benchmarks/fit_trace.py: a profiled run reduced to time a step and the operators that took it."""

from __future__ import annotations

import fit_trace  # benchmarks/ (tests/benchmarks/conftest.py)
import pytest
import torch


def test_only_the_traced_epoch_counts_and_the_host_time_is_named_by_operator():
    """Set-up and epoch 1 are the profiler's warm-up and epoch 3 comes after it: only epoch 2's work is summed."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.GELU())
    images = torch.randn(8, 3, 32, 32)
    matrix = torch.randn(256, 256)
    per_epoch = {1: lambda: matrix @ matrix, 2: lambda: model(images).sum().backward(), 3: lambda: matrix @ matrix}

    with fit_trace.EpochTrace(torch.device("cpu")) as trace:
        matrix @ matrix  # set-up
        for epoch in (1, 2, 3):
            for _ in range(5):
                per_epoch[epoch]()
            trace.on_epoch({"epoch": epoch, "seconds": 0.5})
    summary = trace.summary(steps_per_epoch=5)

    operators = [row["operator"] for row in summary["top_host"]]
    assert any("conv" in name for name in operators), operators
    assert not any(name in ("aten::mm", "aten::matmul") for name in operators), operators
    assert summary["steps"] == 5 and summary["training_seconds"] == 0.5 and summary["host_ms_per_step"] > 0
    assert summary["device_ms_per_step"] == 0 and summary["busy_share"] is None and summary["kernels_per_step"] == 0
    assert len(operators) <= fit_trace.TOP_OPERATORS
    host_ms = [row["host_ms"] for row in summary["top_host"]]
    assert host_ms == sorted(host_ms, reverse=True)
    text = fit_trace.format_summary(summary)
    assert text.startswith("5 steps in 0.5 s of training") and "device busy" not in text and "| aten::" in text


def test_a_run_shorter_than_the_traced_epoch_says_so():
    with fit_trace.EpochTrace(torch.device("cpu")) as trace:
        trace.on_epoch({"epoch": 1, "seconds": 0.1})
    with pytest.raises(RuntimeError, match="the run ended before its epoch 2 was traced"):
        trace.summary(steps_per_epoch=1)


class _Event:  # what summarize reads of a profiler's key_averages() row
    def __init__(self, key, device_us=0.0, cpu_us=0.0, count=1, on_device=True, annotation=False):
        self.key, self.count, self.self_cpu_time_total = key, count, cpu_us
        self.self_device_time_total = device_us
        self.device_type = torch.autograd.DeviceType.CUDA if on_device else torch.autograd.DeviceType.CPU
        self.is_user_annotation = annotation


def test_device_time_counts_kernels_once_not_the_annotated_ranges_around_them():
    """On CUDA, record_function ranges (ProfilerStep#, Optimizer.step#...) appear on the device's timeline too,
    spanning the kernels inside them: a 0.4 s epoch whose kernels ran 0.3 s is 75 % busy, not 175 %."""
    events = [
        _Event("void cudnn_conv_kernel", device_us=200_000, count=20),
        _Event("elementwise_kernel", device_us=100_000, count=80),
        _Event("ProfilerStep#2", device_us=400_000, annotation=True),
        _Event("Optimizer.step#Muon.step", device_us=50_000, count=10, annotation=True),
        _Event("aten::convolution", device_us=200_000, cpu_us=30_000, count=20, on_device=False),
    ]
    summary = fit_trace.summarize(events, training_seconds=0.4, steps=10)
    assert summary["busy_share"] == 0.75
    assert summary["device_ms_per_step"] == 30.0 and summary["kernels_per_step"] == 10.0
    assert summary["host_ms_per_step"] == 3.0
    operators = {row["operator"] for row in summary["top_device"] + summary["top_host"]}
    assert operators == {"aten::convolution"}
