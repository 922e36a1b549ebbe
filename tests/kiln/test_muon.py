import math

import pytest
import torch

from kiln.muon import Muon, orthogonalized


def _matrix(rows: int, columns: int, condition: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rows, columns] matrix with singular values spread over `condition` decades, and its U V^T."""
    generator = torch.Generator().manual_seed(seed)
    rank = min(rows, columns)
    left, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(columns, rank, generator=generator, dtype=torch.float64))
    singular = torch.logspace(0, -condition, rank, dtype=torch.float64)
    return (left * singular) @ right.T, left @ right.T


@pytest.mark.parametrize("rows, columns", [(64, 216), (256, 64), (10, 10)], ids=["wide", "tall", "square"])
def test_orthogonalized_keeps_the_singular_vectors_and_brings_the_values_near_one(rows, columns):
    matrix, polar = _matrix(rows, columns, condition=2)
    result = orthogonalized(matrix.float(), steps=5)
    assert result.shape == matrix.shape and result.dtype == torch.float32
    singular = torch.linalg.svdvals(result.double())
    # Large and middling singular values land near 1 (the iteration aims for roughly [0.7, 1.2], not exactly 1);
    # the input's spread of 100x is gone.
    assert singular.max() < 1.25 and singular[: len(singular) // 2].min() > 0.6
    cosine = (result.double() * polar).sum() / (result.double().norm() * polar.norm())
    assert cosine > 0.95  # the direction of U V^T, not of the input (whose cosine with it is far lower)
    assert (matrix * polar).sum() / (matrix.norm() * polar.norm()) < 0.7


def test_the_sgd_groups_take_exactly_torch_sgds_steps():
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    ours = [torch.nn.Parameter(tensor.clone()) for tensor in start]
    theirs = [torch.nn.Parameter(tensor.clone()) for tensor in start]
    groups = lambda params: [{"params": [params[0]], "weight_decay": 0.01}, {"params": [params[1]], "lr": 2.0}]  # noqa: E731
    muon = Muon(groups(ours), lr=0.1, momentum=0.85)
    sgd = torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.85, nesterov=True)
    for step in range(4):
        gradients = [torch.randn_like(tensor) for tensor in start]
        for params in (ours, theirs):
            for parameter, gradient in zip(params, gradients):
                parameter.grad = gradient.clone()
        muon.step()
        sgd.step()
        for mine, reference in zip(ours, theirs):
            assert torch.equal(mine, reference), step


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (64, 3, 3, 3)], ids=["wide", "tall"])
def test_an_orthogonalized_group_holds_the_filter_norm_and_steps_along_the_orthogonalized_momentum(shape):
    torch.manual_seed(0)
    rows, columns = shape[0], math.prod(shape[1:])
    scale = math.sqrt(max(1.0, rows / columns))  # a tall matrix's step grows with it, relative to its norm
    filters = torch.nn.Parameter(torch.randn(shape) * 5)
    optimizer = Muon([{"params": [filters], "orthogonalize": True}], lr=0.2, momentum=0.5)
    expected, buffer = filters.detach().clone(), None
    for _ in range(2):
        gradient = torch.randn(shape)
        buffer = gradient.clone() if buffer is None else buffer * 0.5 + gradient
        update = gradient + 0.5 * buffer  # Nesterov
        expected = expected * (math.sqrt(rows) / expected.norm())
        held = expected.clone()
        expected = expected - 0.2 * scale * orthogonalized(update.reshape(rows, columns)).view(shape)
        filters.grad = gradient
        optimizer.step()
        assert torch.allclose(filters.detach(), expected, atol=1e-5)
        # The step itself, at the default number of iterations: roughly orthogonal, whatever the update's spectrum.
        step = (held - filters.detach()).reshape(rows, columns) / (0.2 * scale)
        singular = torch.linalg.svdvals(step.double())
        assert singular.max() < 1.25 and singular.min() > 0.5, singular
    assert torch.equal(optimizer.state[filters]["momentum_buffer"], buffer)


def test_orthogonalized_groups_refuse_vectors_and_weight_decay():
    with pytest.raises(ValueError, match="not vectors or scalars"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4))], "orthogonalize": True}], lr=0.1, momentum=0.5)
    with pytest.raises(ValueError, match="fixed norm: give it weight_decay 0"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "orthogonalize": True, "weight_decay": 1e-3}],
             lr=0.1, momentum=0.5)  # fmt: skip
