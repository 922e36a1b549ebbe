"""Running an exported classifier with onnxruntime on CPU: sessions and batched inference, numpy in and out.

Two graph interfaces exist. The tensor-in model (`model.fp32.onnx`, and every model the export and compress
stages produce) takes `input` float32 [N, C, H, W], normalized as preprocess.json says. The raw-image model that
bundles serve (`model.onnx`) takes `image` uint8 [N, H, W, C] and does that normalization itself. Both return
`probabilities` float32 [N, classes]; the raw-image model also returns `class_index` int64 [N].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
RAW_INPUT_NAME = "image"
CLASS_INDEX_NAME = "class_index"


def ort_session(path: str | Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for the model file at `path` (or a serialized model), all graph optimizations on.

    `threads` caps intra-op threads (None: onnxruntime's default, one per physical core). Operators run one at a
    time (inter-op 1): these are small sequential CNNs, where parallel operators only add contention.
    Raises onnxruntime's own exceptions for a missing or invalid file.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise to users
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, inputs_nchw: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities float32 [N, classes] for normalized float32 [N, C, H, W] inputs, in batches.

    Raises ValueError when `inputs_nchw` is not 4-dimensional or `batch_size` < 1.
    """
    if inputs_nchw.ndim != 4:
        raise ValueError(f"inputs must be [N, C, H, W], got shape {inputs_nchw.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    input_name = session.get_inputs()[0].name
    inputs = np.ascontiguousarray(inputs_nchw, dtype=np.float32)
    outputs = [
        session.run(None, {input_name: inputs[start : start + batch_size]})[0]
        for start in range(0, len(inputs), batch_size)
    ]
    if not outputs:
        classes = session.get_outputs()[0].shape[-1]
        return np.zeros((0, classes if isinstance(classes, int) else 0), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)
