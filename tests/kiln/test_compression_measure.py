"""The report's static figures (parameters, multiply-accumulates, zero weights) and the interleaved timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.compression.measure import count_macs, count_parameters, gzip_size, time_sessions, zero_weight_fraction
from kiln.compression.pruning import make_pruning_permanent, prune_unstructured
from kiln.compression.quantization import convert_fp16
from kiln.models import ModelSpec, build_model
from kiln.onnx_export import export_onnx
from kiln.onnx_tools import ort_session
from kiln.runtime.preprocess import Preprocessing

PREP = Preprocessing(8, 8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> tuple[Path, Path, Path]:
    """simple_cnn on 8x8x3 exported as is, with half its weights zeroed, and converted to fp16."""
    folder = tmp_path_factory.mktemp("measure")
    torch.manual_seed(0)
    model = build_model(ModelSpec("simple_cnn", (8, 8, 3), 3)).eval()
    export_onnx(model, PREP, folder / "dense.onnx", 18)
    export_onnx(make_pruning_permanent(prune_unstructured(model, 0.5)), PREP, folder / "sparse.onnx", 18)
    convert_fp16(folder / "dense.onnx", folder / "fp16.onnx")
    return folder / "dense.onnx", folder / "sparse.onnx", folder / "fp16.onnx"


def test_macs_and_parameters_match_a_hand_count(onnx_models):
    dense, _, fp16 = onnx_models
    # conv 3->32 at 8x8, pool; conv 32->64 at 4x4, pool; conv 64->64 at 2x2; linear 256->64; linear 64->3
    macs = 64 * 32 * 27 + 16 * 64 * 288 + 4 * 64 * 576 + 256 * 64 + 64 * 3
    params = (27 * 32 + 32) + (288 * 64 + 64) + (576 * 64 + 64) + (256 * 64 + 64) + (64 * 3 + 3)
    assert count_macs(dense) == count_macs(fp16) == macs
    assert count_parameters(dense) == count_parameters(fp16) == params


def test_zero_weights_show_in_the_sparsity_and_the_gzip_size_only(onnx_models):
    dense, sparse, _ = onnx_models
    assert zero_weight_fraction(dense) == 0.0
    assert zero_weight_fraction(sparse) == pytest.approx(0.5, abs=0.01)
    assert count_macs(sparse) == count_macs(dense) and count_parameters(sparse) == count_parameters(dense)
    assert abs(sparse.stat().st_size - dense.stat().st_size) < 1000  # a dense file stores the zeros too
    assert gzip_size(sparse) < 0.75 * gzip_size(dense)


def test_every_session_is_timed_with_the_requested_runs(onnx_models):
    dense, sparse, fp16 = onnx_models
    sessions = {name: ort_session(path) for name, path in (("dense", dense), ("sparse", sparse), ("fp16", fp16))}
    sample = np.zeros((1, 3, 8, 8), np.float32)
    batch = np.zeros((64, 3, 8, 8), np.float32)
    timings = time_sessions(sessions, sample, batch, latency_runs=7, throughput_seconds=0.02, rounds=3)
    assert list(timings) == ["dense", "sparse", "fp16"]
    for figures in timings.values():
        assert 0 < figures["p50_ms"] <= figures["p95_ms"] and figures["throughput_ips"] > 0
    with pytest.raises(ValueError, match="latency_runs >= 1"):
        time_sessions(sessions, sample, batch, latency_runs=0, throughput_seconds=0.1)
