"""benchmarks/device_summary.py: what it brings forward from a GPU call's reports."""

from __future__ import annotations

import json

import device_summary  # benchmarks/ (tests/benchmarks/conftest.py)


def test_a_sections_log_lines_that_change_how_to_read_its_times_are_shown_once_each(tmp_path):
    log = tmp_path / "fast-cudagraphs.log"
    log.write_text("I an ordinary line\nskipping cudagraphs due to mutated inputs (2 instances)\n"
                   "skipping cudagraphs due to mutated inputs (2 instances)\nW Recompiling function forward\n"
                   "I train.cuda_graph: captured the training step after 3 eager steps\n")
    assert device_summary.warnings_of(log) == ["skipping cudagraphs due to mutated inputs (2 instances)",
                                               "W Recompiling function forward",
                                               "I train.cuda_graph: captured the training step after 3 eager steps"]
    assert device_summary.warnings_of(tmp_path / "absent.log") == []


def test_the_summary_shows_the_host_the_epochs_spread_and_the_trace(tmp_path, capsys):
    run = {"seed": 1, "train_seconds": 1.9, "fit_wall_seconds": 2.1, "epoch_seconds": [0.25, 0.23, 0.41],
           "accuracy": 0.9, "accuracy_tta": 0.91}  # fmt: skip
    trace = {"training_seconds": 0.5, "steps": 50, "device_ms_per_step": 4.0, "host_ms_per_step": 9.0,
             "busy_share": 0.4, "kernels_per_step": 120.0,
             "top_device": [{"operator": "aten::convolution", "calls": 300, "device_ms": 150.0, "host_ms": 20.0}],
             "top_host": [{"operator": "Optimizer.step#Muon.step", "calls": 50, "device_ms": 0.0, "host_ms": 80.0}]}
    report = {"device": "GPU", "date": "2026-11-27", "overrides": [],
              "host": {"cpus": 16, "cpu_model": "Xeon", "load_average": [3.5, 2.0, 1.0]},
              "host_after": {"load_average": [4.0, 2.0, 1.0]},
              "recipe": [{"profile": "cifar10-fast", "epochs": 3, "runs": [run]}], "trace": trace}  # fmt: skip
    (tmp_path / "fast.json").write_text(json.dumps(report))

    device_summary.main(tmp_path)

    text = capsys.readouterr().out
    assert "host: 16 CPUs (Xeon), load average 3.5 at the start, 4.0 at the end" in text
    assert "epochs: fastest 0.230 s, median 0.250 s, slowest 0.410 s" in text
    assert "the device busy 40% of the time" in text
    assert text.index("aten::convolution") < text.index("Optimizer.step#Muon.step")  # device time ranks first
