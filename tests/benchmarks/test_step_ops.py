import json

import pytest

import device_summary  # benchmarks/ (tests/benchmarks/conftest.py)
import step_ops


def test_counts_one_steps_operations_of_the_profiles_own_loop_without_views_or_allocations(tmp_path, capsys):
    report = tmp_path / "step-ops.json"
    step_ops.main(["--batch-size", "8", "--device", "cpu", "--set", "train.seed=1", "--json-out", str(report)])
    assert "operations dispatched per step" in capsys.readouterr().out
    [counts] = json.loads(report.read_text())["step_ops"]  # cifar10-fast: Muon
    per_step = {row["operation"]: row["per_step"] for row in counts["top"]}
    # fastnet has 7 convolutions (the whitening one and two per group): each runs once forward and once backward
    # in every step, so the count is per step, not per epoch or per run
    assert per_step["convolution"] == 7 and per_step["convolution_backward"] == 7
    assert not step_ops.NO_LAUNCH_OPERATIONS & per_step.keys() and counts["no_launch_per_step"] > 0
    assert counts["optimizer"] == "muon" and counts["operations_per_step"] >= sum(per_step.values())

    device_summary.main(tmp_path)
    summary = capsys.readouterr().out
    assert f"cifar10-fast (cpu, fp32): {counts['operations_per_step']} operations dispatched a step" in summary
    assert "## step-ops: --set train.seed=1" in summary  # which settings, when a GPU call counts more than one way


def test_a_bad_profile_or_device_stops_with_one_line_saying_what_to_do(monkeypatch):
    with pytest.raises(SystemExit, match="step_ops: unknown profile 'nope'; choose one of"):
        step_ops.main(["--profile", "nope", "--device", "cpu"])
    monkeypatch.setattr(step_ops.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no usable CUDA device; use --device cpu"):
        step_ops.main(["--device", "cuda"])


def test_outside_the_graph_the_host_dispatches_the_batch_and_the_lr_updates_not_the_step(tmp_path, capsys):
    report = tmp_path / "step-ops.json"
    step_ops.main(["--batch-size", "8", "--device", "cpu", "--outside-graph", "--json-out", str(report)])
    [counts] = json.loads(report.read_text())["step_ops"]
    per_step = {row["operation"]: row["per_step"] for row in counts["top"]}
    assert counts["overrides"] == ["train.cuda_graph=true"]
    assert "convolution" not in per_step and "convolution_backward" not in per_step  # the step is the graph's
    assert per_step["fill_"] == 4 and per_step["copy_"] == 2  # cifar10-fast's 4 lrs; the captured inputs, labels
    assert counts["operations_per_step"] < 40


def test_outside_graph_is_refused_on_cuda(monkeypatch):
    monkeypatch.setattr(step_ops.torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="on CUDA use --set train.cuda_graph=true"):
        step_ops.main(["--device", "cuda", "--outside-graph"])
