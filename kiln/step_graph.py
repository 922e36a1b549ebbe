"""train.cuda_graph: each whole training step (forward, loss, backward, optimizer step, the epoch's running totals)
replayed as one CUDA graph.

A small network's eager step is a few hundred kernel launches the host issues one by one; when issuing them takes
longer than the GPU takes to run them, the GPU waits, and the step's time follows the host's load (benchmarks/
RESULTS.md: fastnet epochs of one run took 0.23 to 0.41 s on a busy host). torch.compile's reduce-overhead mode
replays only the compiled model's kernels; Muon's step and the totals stay eager. Here the step is captured once,
after a few eager warm-up steps (cuDNN's timing of its algorithms, the optimizer's momentum buffers and any
compiling happen there, as capture cannot), and every later step is two copies into the captured input tensors,
the learning rates' updates and one graph launch.

What a replay cannot see is what the host decided while capturing: so the optimizer reads its learning rates from
device tensors (the LR scheduler fills them in place each step), the totals are added to in place, autocast keeps
no cache of cast weights, and a batch of another shape or layout (a last partial batch) runs eagerly instead.
Steps that do host work of their own are not captured: fp16 (GradScaler checks the gradients for inf on the host),
AdamW (kiln has not checked its capturable mode), the hard-example selector, data-parallel runs and objectives
that keep host-side figures (distillation); `unavailable_reason` names which.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

LOGGER = logging.getLogger("kiln")

WARMUP_STEPS = 3  # eager steps before capture, as torch's CUDA-graph examples take

StepFunction = Callable[[torch.Tensor, torch.Tensor], int]  # (inputs, labels) -> the number of images trained on


@dataclass(frozen=True)
class GraphBackend:
    """How warm-up steps run and how a step is captured: CUDA's, or a stand-in in tests on a CPU."""

    warm_up: Callable[[], ContextManager[None]]
    capture: Callable[[Callable[[], Any]], Callable[[], None]]  # records a function; returns its replay


def cuda_backend(device: torch.device) -> GraphBackend:
    side = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def warm_up() -> Iterator[None]:
        # On a side stream, as torch's docs ask of the steps before a capture (lazily initialised state).
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(device).wait_stream(side)

    def capture(function: Callable[[], Any]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads (Prefect's) may use CUDA
            function()
        return graph.replay

    return GraphBackend(warm_up, capture)


def backend_for(device: torch.device) -> GraphBackend | None:
    """How to capture steps on `device`; None where nothing can (a CPU)."""
    return cuda_backend(device) if device.type == "cuda" else None


def unavailable_reason(optimizer: torch.optim.Optimizer, precision: str, *, distributed: bool, selector: bool,
                       capturable_objective: bool, compiled_graphs: bool = False) -> str | None:  # fmt: skip
    """Why this run's steps cannot be captured (None: they can). Not a config error: the record-speed profiles
    capture their steps, and a setting added to one of them (fp16, adamw, keep_hardest) or a host with several GPUs
    makes them run eagerly instead, as a CPU does."""
    from kiln.muon import Muon

    if not isinstance(optimizer, (torch.optim.SGD, Muon)):
        return f"kiln captures SGD and Muon steps, not {type(optimizer).__name__}'s"
    if precision == "fp16":
        return "fp16's GradScaler checks every step's gradients on the host"
    if compiled_graphs:
        return "train.compile_mode=reduce-overhead replays the compiled model's own CUDA graphs"
    if distributed:
        return "data-parallel steps are not captured"
    if selector:
        return "the hard-example selector picks each batch's examples on the host"
    if not capturable_objective:
        return "this objective keeps figures on the host every step"
    return None


class GraphedSteps:
    """Runs `step` eagerly for WARMUP_STEPS steps, then captures it once on tensors of the next batch's shape and
    layout and replays that capture for every batch like it (any other batch runs eagerly). Call it as `step`:
    (inputs, labels) -> images trained on. The optimizer's learning rates become device tensors at construction."""

    def __init__(self, step: StepFunction, optimizer: torch.optim.Optimizer, device: torch.device,
                 backend: GraphBackend):  # fmt: skip
        self.step, self.optimizer, self.backend = step, optimizer, backend
        device_learning_rates(optimizer, device)
        self.warm_steps = 0
        self.replays = 0
        self.eager_steps = 0  # after the capture: batches unlike the captured one
        self.inputs: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.replay: Callable[[], None] | None = None

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> int:
        if self.replay is None:
            if self.warm_steps < WARMUP_STEPS:
                self.warm_steps += 1
                with self.backend.warm_up():
                    return self.step(inputs, labels)
            self._capture(inputs, labels)
        if not (_same_layout(inputs, self.inputs) and _same_layout(labels, self.labels)):
            if not self.eager_steps:
                LOGGER.info(f"train.cuda_graph: a batch of {len(labels)} (captured: {len(self.labels)}) or of "
                            "another layout runs eagerly")  # fmt: skip
            self.eager_steps += 1
            return self.step(inputs, labels)
        self.inputs.copy_(inputs)  # type: ignore[union-attr]
        self.labels.copy_(labels)  # type: ignore[union-attr]
        self.replay()  # type: ignore[misc]
        self.replays += 1
        return len(labels)

    def _capture(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = torch.empty_like(inputs), torch.empty_like(labels)  # same strides: dense tensors
        # The step sets the gradients to None first, so the captured backward allocates the ones the replays write,
        # in the graph's own memory (torch's whole-network capture recipe).
        self.replay = self.backend.capture(lambda: self.step(self.inputs, self.labels))  # type: ignore[arg-type]
        LOGGER.info(f"train.cuda_graph: captured the training step after {self.warm_steps} eager steps")


def _same_layout(tensor: torch.Tensor, captured: torch.Tensor | None) -> bool:
    return captured is not None and tensor.shape == captured.shape and tensor.stride() == captured.stride()


def device_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each param group's lr as a 0-d float32 tensor on `device`, which torch's LR schedulers fill in place and a
    captured optimizer step reads on the device (torch's fused SGD and kiln's Muon take tensor lrs)."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def host_learning_rates(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's or LR scheduler's state_dict with tensor lrs as plain floats, so that a checkpoint holds no
    device tensors and resumes the same whether or not the resumed run captures its steps. `state` is the fresh
    dict state_dict() returned; its lists are the scheduler's own, so they are replaced, not changed."""

    def plain(value: Any) -> Any:
        return float(value) if isinstance(value, torch.Tensor) else value

    for group in state.get("param_groups", []):  # an optimizer's: each group a fresh dict
        group["lr"] = plain(group.get("lr"))
    for key in ("_last_lr", "base_lrs"):  # a scheduler's
        if key in state:
            state[key] = [plain(value) for value in state[key]]
    return state
