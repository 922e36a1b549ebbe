"""Muon for convolution filters, SGD for everything else, in one torch optimizer (train.optimizer=muon).

Muon (Keller Jordan, 2024, "Muon: an optimizer for hidden layers in neural networks") takes SGD's Nesterov
momentum update of a weight matrix and replaces it by the nearest semi-orthogonal matrix, U V^T of its singular
value decomposition, computed approximately by a few Newton-Schulz iterations. Every direction the update spans then
moves by the same amount, instead of the few dominant ones taking nearly all of the step. On CIFAR-10 it reached
airbench94's 94 % in about 20 % less training (the "airbench94_muon" record, batch 2000, 8 epochs). A convolution's
filters [out, in, k, k] are treated as the matrix [out, in * k * k].

In an orthogonalized group each filter tensor is also scaled back to Frobenius norm sqrt(out) before every update,
as in that record. A BatchNorm after the convolution makes the loss indifferent to that scale (make_optimizer uses
Muon only for families that normalize after every convolution), so this replaces weight decay: without it the
weights grow with every orthogonal step and the effective learning rate decays on its own.

Groups whose `orthogonalize` is False get exactly torch.optim.SGD's update (torch's own functional sgd: coupled
weight decay, Nesterov momentum, fused or foreach kernels), so one optimizer, one LR scheduler, one checkpoint and
one GradScaler serve the whole model. Written from the published description; no code copied.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.sgd import sgd

LOGGER = logging.getLogger(__name__)

# Quintic Newton-Schulz coefficients from the Muon write-up: chosen to push singular values anywhere in (0, 1] to
# roughly [0.7, 1.2] in very few steps, rather than to converge to exactly 1 (which the update does not need).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 3  # the CIFAR-10 record used 3 (5 is the usual default): enough for a run of a few hundred steps


def orthogonalized(update: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """Approximately U V^T for `update` = U S V^T [rows, cols], or for each of a batch [n, rows, cols] of matrices of
    one shape: the same shape and dtype, singular values near 1.

    Runs in bfloat16 on CUDA (tensor cores; the result only needs to be roughly orthogonal) and in float32
    elsewhere, where bfloat16 matmuls are slow and a seeded CPU run must stay exactly reproducible. Each iteration is
    three matrix products, the polynomial's scaling and sums taken inside them (addmm): in eager mode on a GPU every
    separate operation is a kernel launch the host must issue, and a short run's steps wait on the host (on CUDA an
    addmm is two: a copy of the added matrix, then the product; five launches an iteration instead of eight)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    matrix = update.to(torch.bfloat16 if update.is_cuda else torch.float32)
    # spectral norm <= Frobenius norm <= 1: inside the iteration's range
    matrix = matrix / (matrix.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    wide = matrix.shape[-2] <= matrix.shape[-1]
    if not wide:
        matrix = matrix.mT  # iterate on the smaller Gram matrix
    multiply_add = torch.baddbmm if matrix.ndim == 3 else torch.addmm
    for _ in range(steps):
        gram = matrix @ matrix.mT
        polynomial = multiply_add(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        matrix = multiply_add(matrix, polynomial, matrix, beta=a)  # a * matrix + polynomial @ matrix
    if not wide:
        matrix = matrix.mT
    return matrix.to(update.dtype)


class CompiledOrthogonalization:
    """`orthogonalized` through torch.compile (or `compiled`, for tests); eager for good, with one warning, once
    compiling fails, so that later optimizers in the process (a proxy's, the next run's) do not try again."""

    def __init__(self, compiled: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self._compiled = compiled or torch.compile(orthogonalized)
        self.failed = False

    def __call__(self, matrix: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            try:
                return self._compiled(matrix)
            except torch.OutOfMemoryError:
                raise  # the step itself does not fit: eager would not either
            except Exception as error:  # e.g. no C compiler for the CPU backend: a slower step, not a failed run
                LOGGER.warning(f"muon: compiling the orthogonalization failed ({error.__class__.__name__}: {error}); "
                               "running it eagerly")  # fmt: skip
                self.failed = True
        return orthogonalized(matrix)


@functools.cache
def compiled_orthogonalized() -> CompiledOrthogonalization:
    """The process's one CompiledOrthogonalization, which every optimizer shares with its kernels: on a GPU, eager
    mode launches some 15 small kernels per filter shape and step, which a short run's steps may wait on (the
    CIFAR-10 record compiles it too). Dynamo compiles a few graphs (one more once a tall matrix or a batch of them
    comes), then one dynamic-shape graph serves every further shape."""
    return CompiledOrthogonalization()


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum; in param groups with `orthogonalize`, each parameter is first scaled to norm
    sqrt(rows), then its momentum update is orthogonalized (Muon) and applied as lr x sqrt(max(1, rows / cols)) x
    that matrix (the factor keeps a tall matrix's step as large, relative to its norm, as a wide one's). Per-group
    options: lr, momentum, weight_decay (coupled, as SGD's; orthogonalized groups take none: their norm is fixed),
    orthogonalize. `fused` runs the SGD groups' step as torch's fused kernel (CUDA); `compile_orthogonalization`
    runs the Newton-Schulz iteration through torch.compile (compiled_orthogonalized; eager, with a warning, if
    compiling fails). `lr` may be a float or, per group, a 0-d tensor on the parameters' device, which the step
    reads on the device (kiln/step_graph.py). Under fp16 a GradScaler unscales the gradients first and checks them
    for inf on the host, so each step waits for the GPU (torch's fused SGD alone takes that check on the device):
    prefer bf16."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float,
        weight_decay: float = 0.0,
        orthogonalize: bool = False,
        fused: bool = False,
        compile_orthogonalization: bool = False,
    ):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"Muon needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, "
                             f"{weight_decay}")  # fmt: skip
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "orthogonalize": orthogonalize}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if not group["orthogonalize"]:
                continue
            if any(parameter.ndim < 2 for parameter in group["params"]):
                raise ValueError("Muon orthogonalizes matrices and convolution filters, not vectors or scalars: put "
                                 "biases and norm parameters in a group without orthogonalize")  # fmt: skip
            if group["weight_decay"] > 0:
                raise ValueError("an orthogonalized group holds its weights at a fixed norm: give it weight_decay 0")
        self.fused = fused
        self._orthogonalized = compiled_orthogonalized() if compile_orthogonalization else orthogonalized

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            parameters = [parameter for parameter in group["params"] if parameter.grad is not None]
            if not parameters:
                continue
            buffers = [self.state[parameter].get("momentum_buffer") for parameter in parameters]
            if group["orthogonalize"]:
                buffers = self._orthogonal_steps(parameters, buffers, group)
            else:
                sgd(
                    parameters, [parameter.grad for parameter in parameters], buffers,
                    fused=self.fused or None,
                    weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                    nesterov=group["momentum"] > 0, maximize=False,
                )  # fmt: skip
            for parameter, buffer in zip(parameters, buffers):
                self.state[parameter]["momentum_buffer"] = buffer
        return loss

    def _orthogonal_steps(self, parameters: list[torch.Tensor], buffers: list[torch.Tensor | None],
                          group: dict[str, Any]) -> list[torch.Tensor]:  # fmt: skip
        """One Muon step of every filter in `group`; returns the momentum buffers. The element-wise parts run as
        multi-tensor (foreach) operations over all the filters (on CUDA one launch each, except the renormalization's
        multiply by a scalar per filter, a launch per filter), and filters of one shape are orthogonalized as one
        batch: on a GPU, eager mode pays a host-side launch per operation, which a small network's steps may wait
        on. The same arithmetic as a filter at a time, up to rounding (addmm scales a product, not a factor)."""
        gradients = [parameter.grad for parameter in parameters]
        momentum = group["momentum"]
        held = [index for index, buffer in enumerate(buffers) if buffer is not None]
        if held:
            kept = [buffers[index] for index in held]
            torch._foreach_mul_(kept, momentum)
            torch._foreach_add_(kept, [gradients[index] for index in held])
        buffers = [gradient.clone() if buffer is None else buffer for gradient, buffer in zip(gradients, buffers)]
        updates = torch._foreach_add(gradients, buffers, alpha=momentum)  # Nesterov: look one momentum step ahead
        shapes = [(parameter.shape[0], parameter.numel() // parameter.shape[0]) for parameter in parameters]
        scales = torch._foreach_norm(parameters)  # each filter back to norm sqrt(rows)
        torch._foreach_clamp_min_(scales, 1e-12)
        torch._foreach_reciprocal_(scales)
        torch._foreach_mul_(scales, [math.sqrt(rows) for rows, _ in shapes])
        torch._foreach_mul_(parameters, scales)
        directions = self._orthogonalized_by_shape(updates, shapes)
        step_scales = [math.sqrt(max(1.0, rows / columns)) for rows, columns in shapes]
        if any(scale != 1.0 for scale in step_scales):  # a tall filter steps further (see the class doc)
            torch._foreach_mul_(directions, step_scales)
        # lr: a float, or a 0-d device tensor that a captured step reads at every replay (kiln/step_graph.py); both
        # round alike this way, which an add with alpha (a fused multiply-add on a CPU) would not.
        torch._foreach_mul_(directions, group["lr"])
        torch._foreach_sub_(parameters, directions)
        return buffers

    def _orthogonalized_by_shape(self, updates: list[torch.Tensor], shapes: list[tuple[int, int]]
                                 ) -> list[torch.Tensor]:  # fmt: skip
        """Each update orthogonalized as a [rows, cols] matrix, returned in the update's shape and memory layout."""
        directions: list[torch.Tensor | None] = [None] * len(updates)
        for shape in dict.fromkeys(shapes):
            indices = [index for index, other in enumerate(shapes) if other == shape]
            matrices = [_matrix_in_memory_order(updates[index]) for index in indices]
            if len(matrices) == 1:
                orthogonal = [self._orthogonalized(matrices[0])]
            else:
                orthogonal = list(self._orthogonalized(torch.stack(matrices)).unbind(0))
            for index, matrix in zip(indices, orthogonal):
                directions[index] = _shaped_like(matrix, updates[index])
        return directions  # type: ignore[return-value]


def _matrix_in_memory_order(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` [rows, ...] as a [rows, cols] matrix whose columns follow its memory order: a view, not a copy, for a
    contiguous or a channels_last filter. Orthogonalizing commutes with permuting columns ((A P) -> (U V^T) P), so
    the order of a filter's columns does not change its step, only whether reshaping it costs a copy."""
    if _channels_last_filter(tensor):
        return tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
    return tensor.reshape(tensor.shape[0], -1)


def _shaped_like(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of _matrix_in_memory_order for a tensor shaped and laid out like `like`."""
    if _channels_last_filter(like):
        rows, channels, height, width = like.shape
        return matrix.reshape(rows, height, width, channels).permute(0, 3, 1, 2)
    return matrix.reshape(like.shape)


def _channels_last_filter(tensor: torch.Tensor) -> bool:
    return tensor.ndim == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)
