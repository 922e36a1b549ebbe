"""kiln.onnx_tools on a tiny hand-built ONNX classifier (no torch needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import ExportError
from kiln.onnx_tools import (
    check_onnx_file,
    measure_latency,
    measure_throughput,
    ort_session,
    run_onnx,
    top1_agreement,
)

CHANNELS, SIZE, CLASSES = 3, 2, 4


def write_linear_softmax(path: Path, seed: int = 0) -> np.ndarray:
    """A [N, 3, 2, 2] -> Flatten -> MatMul -> Softmax model; returns its weight matrix."""
    weights = np.random.default_rng(seed).normal(size=(CHANNELS * SIZE * SIZE, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "linear_softmax",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", CHANNELS, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(weights, "weights")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return weights


def reference_probabilities(inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    logits = inputs.reshape(len(inputs), -1) @ weights
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "linear.onnx"
    write_linear_softmax(path)
    return path


@pytest.fixture
def inputs() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(10, CHANNELS, SIZE, SIZE)).astype(np.float32)


class CountingSession:
    """Stands in for an InferenceSession: counts run() calls, so bounds are checked without timing anything."""

    def __init__(self, session):
        self.session, self.calls = session, 0

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feed):
        self.calls += 1
        return self.session.run(outputs, feed)


def test_run_onnx_matches_numpy_reference_in_any_batching(tmp_path: Path, inputs: np.ndarray):
    weights = write_linear_softmax(tmp_path / "m.onnx")
    session = ort_session(tmp_path / "m.onnx", threads=1)
    expected = reference_probabilities(inputs, weights)

    whole = run_onnx(session, inputs)
    in_threes = run_onnx(session, inputs, batch_size=3)

    assert whole.shape == (10, CLASSES) and whole.dtype == np.float32
    np.testing.assert_allclose(whole, expected, atol=1e-6)
    np.testing.assert_array_equal(in_threes, whole)
    np.testing.assert_allclose(whole.sum(axis=1), 1.0, atol=1e-6)


def test_run_onnx_rejects_non_image_batches(model_path: Path, inputs: np.ndarray):
    session = ort_session(model_path)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        run_onnx(session, inputs[0])
    with pytest.raises(ValueError, match="batch_size"):
        run_onnx(session, inputs, batch_size=0)


def test_top1_agreement_counts_matching_argmax():
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    candidate = np.array([[0.8, 0.2], [0.4, 0.6], [0.4, 0.6], [0.1, 0.9]])
    assert top1_agreement(candidate, reference) == 0.75
    assert top1_agreement(reference[:0], reference[:0]) == 1.0


def test_measure_latency_reports_ordered_percentiles_over_the_requested_runs(model_path: Path, inputs: np.ndarray):
    session = CountingSession(ort_session(model_path))
    latency = measure_latency(session, inputs[:1], runs=7, warmup=2)
    assert set(latency) == {"p50_ms", "p95_ms"}
    assert 0 <= latency["p50_ms"] <= latency["p95_ms"]
    assert session.calls == 7 + 2
    with pytest.raises(ValueError, match="runs"):
        measure_latency(session, inputs[:1], runs=0)


def test_measure_throughput_is_bounded_by_runs_and_positive(model_path: Path, inputs: np.ndarray):
    session = CountingSession(ort_session(model_path))
    images_per_second = measure_throughput(session, inputs, seconds_budget=60.0, max_runs=4, warmup=1)
    assert np.isfinite(images_per_second) and images_per_second > 0
    assert session.calls == 4 + 1  # the run cap stopped it, long before the 60 s budget


def test_measure_throughput_always_times_at_least_one_run(model_path: Path, inputs: np.ndarray):
    session = CountingSession(ort_session(model_path))
    assert measure_throughput(session, inputs, seconds_budget=0.0, max_runs=10, warmup=0) > 0
    assert session.calls == 1
    with pytest.raises(ValueError, match="non-empty"):
        measure_throughput(session, inputs[:0])


def test_check_onnx_file_accepts_valid_and_names_broken_models(model_path: Path, tmp_path: Path):
    check_onnx_file(model_path)
    model = onnx.load(model_path)
    model.graph.node[1].input[1] = "missing_weights"  # MatMul now reads a tensor nobody produces
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    with pytest.raises(ExportError, match="broken.onnx"):
        check_onnx_file(broken)


def test_importing_onnx_tools_does_not_import_torch():
    """The deployment bundle's predictor imports run_onnx and must work where torch is not installed."""
    code = "import sys, kiln.onnx_tools; print('torch' in sys.modules, 'onnx' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
