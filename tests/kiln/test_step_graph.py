"""train.cuda_graph (kiln/step_graph.py): a whole training step captured once and replayed.

On a CPU nothing can be captured, so most tests stand a replaying backend in for CUDA's: capture records the step
without running it, as CUDA's does, and each replay runs it again on the captured input tensors. That checks
everything around the capture (warm-up, the captured inputs, the learning rates as device tensors, the totals, the
eager fallback, checkpoints). A real replay does not run the step's Python again, so what that Python reads must be
the very tensors it read while capturing: `FrozenAtCapture` checks that at every replay. The last test captures
for real and runs only where CUDA is available (the GPU plan, benchmarks/device_checks.sh, runs it)."""

from __future__ import annotations

import contextlib
import logging
import math

import pytest
import torch

from kiln import step_graph
from kiln.augmentation import resolve_policy
from kiln.config import TrainConfig, load_config
from kiln.dataset import write_dataset
from kiln.muon import Muon
from kiln.training import make_scheduler, run_training
from tests.conftest import make_blobs_dataset


class ReplayingBackend:
    """CUDA's capture semantics without CUDA: capture runs nothing; replay runs what was captured."""

    def __init__(self):
        self.captures, self.warm_ups = 0, 0

    def backend(self) -> step_graph.GraphBackend:
        @contextlib.contextmanager
        def warm_up():
            self.warm_ups += 1
            yield

        def capture(function):
            self.captures += 1
            return function

        return step_graph.GraphBackend(warm_up, capture)


def _train(tmp_path, profile: str, overrides: list[str], name: str):
    # On the CPU unless a test asks for CUDA: the replaying stand-in's comparisons are exact only there. Eager steps
    # unless a test asks for captured ones (the profiles capture theirs).
    config = load_config(profile, overrides=["train.batch_size=32", "train.epochs=4", "train.data_path=device",
                                             "train.precision=fp32", "train.device=cpu", "train.cuda_graph=false",
                                             *overrides])  # fmt: skip
    data_dir = tmp_path / "blobs"
    if not data_dir.exists():
        data_dir.mkdir()
        write_dataset(data_dir, make_blobs_dataset(classes=3, per_class_train=48, size=16))
    policy = resolve_policy(config.augment, (16, 16, 3))
    return run_training(data_dir, policy, config.train, tmp_path / f"{name}.pt")


class FrozenAtCapture:
    """Records, when a GraphedSteps captures, the tensors its step reads that a real replay cannot re-read from
    Python (each group's lr, the totals), and checks before every later call that they are still those tensors."""

    def __init__(self, monkeypatch):
        self.runners, self.calls, self.checked = set(), [], 0
        original_capture, original_call = step_graph.GraphedSteps._capture, step_graph.GraphedSteps.__call__
        frozen = {}

        def capture(runner, inputs, labels):
            original_capture(runner, inputs, labels)
            frozen[runner] = self._read(runner)

        def call(runner, inputs, labels):
            self.runners.add(runner)
            self.calls.append(len(labels))
            if runner in frozen:
                assert all(now is then for now, then in zip(self._read(runner), frozen[runner], strict=True))
                self.checked += 1
            return original_call(runner, inputs, labels)

        monkeypatch.setattr(step_graph.GraphedSteps, "_capture", capture)
        monkeypatch.setattr(step_graph.GraphedSteps, "__call__", call)

    @staticmethod
    def _read(runner) -> list[torch.Tensor]:
        lrs = [group["lr"] for group in runner.optimizer.param_groups]
        assert all(isinstance(lr, torch.Tensor) for lr in lrs)
        return [*lrs, runner.step.totals.loss_sum, runner.step.totals.correct]


@pytest.mark.parametrize("profile", ["cifar10-fast", "cifar10-long"])
def test_replayed_steps_train_as_eager_steps_do(profile, tmp_path, monkeypatch):
    """cifar10-fast (Muon, the whitening bias's own lr schedule) and cifar10-long (SGD, Lookahead): captured after
    the warm-up, every later step replayed, bit for bit the eager steps' training."""
    replaying = ReplayingBackend()
    monkeypatch.setattr(step_graph, "backend_for", lambda device: replaying.backend())
    frozen = FrozenAtCapture(monkeypatch)

    eager = _train(tmp_path, profile, [], "eager")
    graphed = _train(tmp_path, profile, ["train.cuda_graph=true"], "graphed")

    (runner,) = frozen.runners
    assert len(frozen.calls) == 4 * 4 and set(frozen.calls) == {32}  # 4 epochs of the 144 images' 4 full batches
    assert replaying.captures == 1 and replaying.warm_ups == step_graph.WARMUP_STEPS
    assert runner.replays == len(frozen.calls) - step_graph.WARMUP_STEPS
    assert frozen.checked == runner.replays - 1 and runner.eager_steps == 0  # (the first replay is the capture's)
    for eager_row, graphed_row in zip(eager.history, graphed.history, strict=True):
        assert {**eager_row, "seconds": 0, "images_per_s": 0} == {**graphed_row, "seconds": 0, "images_per_s": 0}
    assert eager.history[-1]["train_loss"] < 0.8 * math.log(3)
    graphed_weights = graphed.model.state_dict()
    assert all(torch.equal(tensor, graphed_weights[name]) for name, tensor in eager.model.state_dict().items())


def test_a_checkpoint_of_replayed_steps_holds_plain_learning_rates_and_resumes_eagerly(tmp_path, monkeypatch):
    monkeypatch.setattr(step_graph, "backend_for", lambda device: ReplayingBackend().backend())
    _train(tmp_path, "cifar10-long", ["train.cuda_graph=true", "train.epochs=2"], "resumed")
    saved = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert all(type(group["lr"]) is float for group in saved["optimizer"]["param_groups"])

    resumed = _train(tmp_path, "cifar10-long", ["train.epochs=4"], "resumed")  # the same run, continued eagerly
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]


def _replayed_steps(step, backend=None):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return step_graph.GraphedSteps(step, optimizer, torch.device("cpu"), backend or ReplayingBackend().backend())


def test_a_batch_of_another_shape_or_layout_runs_eagerly_and_the_next_like_the_capture_replays():
    seen = []

    def step(inputs, labels):
        seen.append((inputs.shape, inputs.data_ptr()))
        return len(labels)

    steps = _replayed_steps(step)
    batch = torch.zeros(4, 3, 2, 2)
    for _ in range(step_graph.WARMUP_STEPS + 1):
        assert steps(batch, torch.zeros(4, dtype=torch.long)) == 4
    captured = steps.inputs.data_ptr()
    assert seen[-1] == (batch.shape, captured) and steps.replays == 1
    assert steps(torch.zeros(3, 3, 2, 2), torch.zeros(3, dtype=torch.long)) == 3  # a last partial batch
    assert seen[-1][1] != captured and steps.replays == 1
    channels_last = batch.contiguous(memory_format=torch.channels_last)
    steps(channels_last.permute(0, 1, 3, 2), torch.zeros(4, dtype=torch.long))  # same shape, other strides
    assert steps.replays == 1
    steps(batch + 1, torch.ones(4, dtype=torch.long))
    assert steps.replays == 2 and torch.equal(steps.inputs, batch + 1) and torch.equal(steps.labels, torch.ones(4))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_the_scheduler_updates_the_very_lr_tensors_a_capture_reads():
    """A replay reads the lr tensors captured with it: the schedule must fill them in place, never replace them."""
    filters = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    shift = torch.nn.Parameter(torch.zeros(8))
    optimizer = Muon([{"params": [shift]}, {"params": [filters], "lr": 0.2, "orthogonalize": True}], lr=1.0,
                     momentum=0.9)  # fmt: skip
    config = TrainConfig(epochs=2, schedule="onecycle", warmup_fraction=0.5)
    scheduler = make_scheduler(optimizer, config, total_steps=10)
    step_graph.device_learning_rates(optimizer, torch.device("cpu"))
    captured = [group["lr"] for group in optimizer.param_groups]
    for _ in range(3):
        scheduler.step()
    assert all(group["lr"] is tensor for group, tensor in zip(optimizer.param_groups, captured))
    factor = 0.04 + 0.96 * 3 / 5  # onecycle: 3 of its 5 warm-up steps from 0.04 of the peak
    assert [float(tensor) for tensor in captured] == pytest.approx([1.0 * factor, 0.2 * factor])


def test_muon_steps_exactly_alike_with_a_tensor_lr():
    torch.manual_seed(0)
    start = [torch.randn(16, 8, 3, 3), torch.randn(8)]
    gradients = [[torch.randn_like(tensor) for tensor in start] for _ in range(3)]
    results = []
    for tensor_lr in (False, True):
        filters, shift = (torch.nn.Parameter(tensor.clone()) for tensor in start)
        optimizer = Muon([{"params": [shift]}, {"params": [filters], "lr": 0.2, "orthogonalize": True}], lr=0.5,
                         momentum=0.9)  # fmt: skip
        if tensor_lr:
            step_graph.device_learning_rates(optimizer, torch.device("cpu"))
        for step in gradients:
            filters.grad, shift.grad = step
            optimizer.step()
        results.append((filters.detach(), shift.detach()))
    (eager_filters, eager_shift), (tensor_filters, tensor_shift) = results
    assert torch.equal(eager_shift, tensor_shift) and torch.equal(eager_filters, tensor_filters)
    assert not torch.equal(eager_filters, start[0])


def _step_for(config: TrainConfig):
    """What _graphed_if_asked reads of a TrainStep, for `config` (its optimizer's class, precision, selector)."""
    from types import SimpleNamespace

    parameters = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = (torch.optim.AdamW(parameters) if config.optimizer == "adamw"
                 else torch.optim.SGD(parameters, lr=0.1))  # fmt: skip
    return SimpleNamespace(runtime=SimpleNamespace(device=torch.device("cpu"), precision=config.precision),
                           selector=object() if config.keep_hardest else None, optimizer=optimizer,
                           objective=SimpleNamespace(capturable=True))  # fmt: skip


@pytest.mark.parametrize("setting, reason", [
    ("train.precision=fp16", "fp16's GradScaler checks every step's gradients on the host"),
    ("train.optimizer=adamw", "kiln captures SGD and Muon steps, not AdamW's"),
    ("train.compile_mode=reduce-overhead", "train.compile_mode=reduce-overhead replays the compiled model's own CUDA "
                                           "graphs"),
    ("train.keep_hardest=0.5", "the hard-example selector picks each batch's examples on the host"),
])  # fmt: skip
def test_a_setting_added_to_a_capturing_profile_makes_its_steps_run_eagerly_and_say_why(setting, reason, caplog,
                                                                                          monkeypatch):  # fmt: skip
    """The profiles capture their steps; a setting whose steps cannot be captured is no config error on them."""
    from kiln.training import _graphed_if_asked

    monkeypatch.setattr(step_graph, "backend_for", lambda device: ReplayingBackend().backend())
    config = load_config("cifar10-long", overrides=["train.compile=on", "train.precision=bf16", setting]).train
    assert config.cuda_graph
    step = _step_for(config)
    with caplog.at_level(logging.INFO, logger="kiln"):
        assert _graphed_if_asked(step, config, None) is step
    assert f"train.cuda_graph: {reason}; the steps run eagerly" in caplog.text
    as_profiled = load_config("cifar10-long", overrides=["train.compile=on", "train.precision=bf16"]).train
    assert isinstance(_graphed_if_asked(_step_for(as_profiled), as_profiled, None), step_graph.GraphedSteps)


def test_fit_runs_eagerly_what_a_config_copied_without_validation_could_still_ask_for():
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    reason = step_graph.unavailable_reason
    capturable = {"distributed": False, "selector": False, "capturable_objective": True}
    assert reason(torch.optim.SGD(parameters, lr=0.1), "bf16", **capturable) is None
    adamw = reason(torch.optim.AdamW(parameters), "bf16", **capturable)
    assert adamw == "kiln captures SGD and Muon steps, not AdamW's"
    assert "GradScaler" in reason(torch.optim.SGD(parameters, lr=0.1), "fp16", **capturable)
    for setting in ("distributed", "selector"):
        assert reason(torch.optim.SGD(parameters, lr=0.1), "fp32", **{**capturable, setting: True}) is not None
    assert reason(torch.optim.SGD(parameters, lr=0.1), "fp32", **{**capturable, "capturable_objective": False})
    assert "reduce-overhead" in reason(torch.optim.SGD(parameters, lr=0.1), "bf16", **capturable, compiled_graphs=True)


def test_data_parallel_steps_run_eagerly_and_say_why(caplog, monkeypatch):
    """devices=auto finds one GPU or several at run time: a profile that captures its steps still trains on
    several, eagerly, rather than failing there."""
    from kiln.training import Distributed, _graphed_if_asked

    monkeypatch.setattr(step_graph, "backend_for", lambda device: ReplayingBackend().backend())
    config = TrainConfig(model="fastnet", optimizer="sgd", precision="bf16", cuda_graph=True, devices=2)
    step = _step_for(config)
    assert isinstance(_graphed_if_asked(step, config, None), step_graph.GraphedSteps)
    with caplog.at_level(logging.INFO, logger="kiln"):
        assert _graphed_if_asked(step, config, Distributed(rank=1, world_size=2)) is step
    assert "train.cuda_graph: data-parallel steps are not captured; the steps run eagerly" in caplog.text


def test_on_a_cpu_the_steps_run_eagerly_and_say_why(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kiln"):
        result = _train(tmp_path, "cifar10-fast", ["train.cuda_graph=true", "train.epochs=2"], "cpu")
    assert "train.cuda_graph: CUDA graphs need a CUDA device; the steps run eagerly" in caplog.text
    assert len(result.history) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a real CUDA graph: needs a CUDA device")
@pytest.mark.parametrize("profile", ["cifar10-fast", "cifar10-long"])
def test_on_cuda_captured_steps_train_as_eager_steps_do(profile, tmp_path, caplog, monkeypatch):
    """The real capture: every step after the warm-up replayed on the GPU, the loss curve as eager steps' (cuDNN
    times and picks its kernels afresh each run, and fused SGD reads a tensor lr as float32, so not bit for bit)."""
    overrides = ["train.precision=bf16", "train.device=cuda", "train.epochs=6"]
    eager = _train(tmp_path, profile, overrides, "eager")
    frozen = FrozenAtCapture(monkeypatch)
    with caplog.at_level(logging.INFO, logger="kiln"):
        graphed = _train(tmp_path, profile, [*overrides, "train.cuda_graph=true"], "graphed")
    assert f"captured the training step after {step_graph.WARMUP_STEPS} eager steps" in caplog.text
    (runner,) = frozen.runners
    assert runner.replays == len(frozen.calls) - step_graph.WARMUP_STEPS == 6 * 4 - step_graph.WARMUP_STEPS
    for eager_row, graphed_row in zip(eager.history, graphed.history, strict=True):
        assert graphed_row["train_loss"] == pytest.approx(eager_row["train_loss"], rel=0.05, abs=0.01)
        assert graphed_row["lr"] == pytest.approx(eager_row["lr"], rel=1e-5)
    assert graphed.history[-1]["train_loss"] < 0.8 * math.log(3)
