"""benchmarks/fit_trace.py: a profiled run reduced to time a step and the operators that took it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SPEC = importlib.util.spec_from_file_location(
    "fit_trace", Path(__file__).resolve().parents[2] / "benchmarks" / "fit_trace.py"
)
fit_trace = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fit_trace)


def test_a_cpu_trace_names_the_operators_that_took_the_host_time_and_claims_no_device_time():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, labels = torch.randn(128, 256), torch.randint(0, 10, (128,))

    with fit_trace.profiled(torch.device("cpu")) as profiler:
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    summary = fit_trace.summarize(profiler, training_seconds=0.5, steps=5)

    assert summary["steps"] == 5 and summary["host_ms_per_step"] > 0
    assert summary["device_ms_per_step"] == 0 and summary["busy_share"] is None and summary["kernels_per_step"] == 0
    operators = [row["operator"] for row in summary["top_host"]]
    assert any(name in operators for name in ("aten::addmm", "aten::mm")), operators
    assert len(operators) <= fit_trace.TOP_OPERATORS
    assert [row["host_ms"] for row in summary["top_host"]] == sorted(
        (row["host_ms"] for row in summary["top_host"]), reverse=True
    )
    text = fit_trace.format_summary(summary)
    assert text.startswith("5 steps in 0.5 s of training") and "device busy" not in text
    assert "| aten::" in text
