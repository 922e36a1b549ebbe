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


def _filter_steps(optimizer_options: dict, shapes=((8, 4, 3, 3), (64, 3, 3, 3), (16, 8, 3, 3))) -> list[torch.Tensor]:
    torch.manual_seed(0)
    filters = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer = Muon([{"params": filters, "orthogonalize": True}], lr=0.2, momentum=0.5, **optimizer_options)
    for _ in range(2):
        for parameter in filters:
            parameter.grad = torch.randn_like(parameter)
        optimizer.step()
    return [parameter.detach().clone() for parameter in filters]


def test_the_compiled_orthogonalization_traces_as_one_graph_and_steps_as_the_eager_one(monkeypatch, caplog):
    """compile_orthogonalization (on CUDA runs that compile) must trace without graph breaks for every filter shape,
    wide, tall and a batch of one shape, and move the filters as the eager iteration does. Dynamo's eager backend
    checks the tracing without paying for code generation; inductor's kernels are torch's to get right."""
    import kiln.muon

    traced = torch.compile(orthogonalized, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    calls = []

    def counted(matrix):
        calls.append(matrix.shape)
        return traced(matrix)

    shared = kiln.muon.CompiledOrthogonalization(counted)
    monkeypatch.setattr(kiln.muon, "compiled_orthogonalized", lambda: shared)
    shapes = ((8, 4, 3, 3), (64, 3, 3, 3), (16, 8, 3, 3), (16, 8, 3, 3))  # wide, tall, and a batch of two
    with caplog.at_level("WARNING", logger="kiln.muon"):
        compiled = _filter_steps({"compile_orthogonalization": True}, shapes)
    assert len(calls) == 6 and not shared.failed and "eagerly" not in caplog.text  # 3 shapes, 2 steps, no fallback
    assert sorted({tuple(shape) for shape in calls}) == [(2, 16, 72), (8, 36), (64, 27)]
    eager = _filter_steps({}, shapes)
    for mine, reference in zip(compiled, eager):
        assert torch.allclose(mine, reference, atol=1e-6)


def test_a_failing_compiled_orthogonalization_warns_once_and_every_optimizer_then_steps_eagerly(monkeypatch, caplog):
    import kiln.muon

    calls = []

    def broken(matrix):
        calls.append(matrix.shape)
        raise RuntimeError("no C compiler")

    shared = kiln.muon.CompiledOrthogonalization(broken)
    monkeypatch.setattr(kiln.muon, "compiled_orthogonalized", lambda: shared)
    with caplog.at_level("WARNING", logger="kiln.muon"):
        first = _filter_steps({"compile_orthogonalization": True})
        second = _filter_steps({"compile_orthogonalization": True})  # a later optimizer does not try again
    assert len(calls) == 1 and shared.failed and caplog.text.count("running it eagerly") == 1
    for steps in (first, second):
        for mine, reference in zip(steps, _filter_steps({})):
            assert torch.equal(mine, reference)


def _plain_newton_schulz(update: torch.Tensor, steps: int) -> torch.Tensor:
    """The iteration as the Muon write-up states it, one operation at a time (float32, CPU)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    matrix = update / (update.norm() + 1e-7)
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:
        matrix = matrix.T
    for _ in range(steps):
        gram = matrix @ matrix.T
        matrix = a * matrix + (b * gram + c * gram @ gram) @ matrix
    return matrix.T if tall else matrix


@pytest.mark.parametrize("rows, columns", [(64, 216), (256, 64)], ids=["wide", "tall"])
def test_orthogonalized_is_the_plain_iteration_and_a_batch_is_each_matrix_alone(rows, columns):
    matrices = [_matrix(rows, columns, condition=2, seed=seed)[0].float() for seed in range(3)]
    batch = orthogonalized(torch.stack(matrices))
    assert batch.shape == (3, rows, columns)
    for matrix, batched in zip(matrices, batch):
        alone = orthogonalized(matrix)
        assert torch.allclose(alone, _plain_newton_schulz(matrix, steps=3), atol=1e-5)
        assert torch.allclose(batched, alone, atol=1e-5)


def test_filters_of_one_shape_step_together_as_each_would_alone():
    """Same-shaped filters are orthogonalized as one batch: the step must be each filter's own."""
    shapes = ((16, 8, 3, 3), (16, 8, 3, 3), (8, 4, 3, 3), (16, 8, 3, 3))
    together = _filter_steps({}, shapes)
    for index, shape in enumerate(shapes):
        torch.manual_seed(0)
        filters = [torch.nn.Parameter(torch.randn(other)) for other in shapes]  # the same draws as _filter_steps
        alone = Muon([{"params": [filters[index]], "orthogonalize": True}], lr=0.2, momentum=0.5)
        for _ in range(2):
            for parameter in filters:
                parameter.grad = torch.randn_like(parameter)
            alone.step()
        assert torch.allclose(filters[index].detach(), together[index], atol=1e-5), index


def test_channels_last_filters_take_the_same_step_and_keep_their_layout():
    """On CUDA fit lays the filters out channels_last; Muon reads them as matrices in that memory order (no copy),
    which permutes the columns, and orthogonalizing commutes with that."""
    torch.manual_seed(0)
    start = [torch.randn(16, 8, 3, 3), torch.randn(16, 8, 3, 3), torch.randn(32, 16, 3, 3)]
    gradients = [[torch.randn_like(tensor) for tensor in start] for _ in range(3)]
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        filters = [torch.nn.Parameter(tensor.clone().contiguous(memory_format=layout)) for tensor in start]
        optimizer = Muon([{"params": filters, "orthogonalize": True}], lr=0.2, momentum=0.5)
        for step in gradients:
            for parameter, gradient in zip(filters, step):
                parameter.grad = gradient.clone().contiguous(memory_format=layout)
            optimizer.step()
        assert all(parameter.is_contiguous(memory_format=layout) for parameter in filters)
        results.append([parameter.detach() for parameter in filters])
    for contiguous, channels_last in zip(*results):
        assert torch.allclose(contiguous, channels_last, atol=1e-5)
