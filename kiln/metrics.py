"""Classification metrics from label vectors, with numpy only (the same code scores PyTorch and ONNX models)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


def per_class_table(matrix: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """precision, recall, F1 and support per class (0 where undefined, never NaN)."""
    true_positive = np.diag(matrix).astype(np.float64)
    predicted_count = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = np.divide(true_positive, predicted_count, out=np.zeros_like(true_positive), where=predicted_count > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return pd.DataFrame(
        {
            "class": class_names,
            "precision": precision.round(4),
            "recall": recall.round(4),
            "f1": f1.round(4),
            "support": support,
        }
    )


def accuracy(true: np.ndarray, predicted: np.ndarray) -> float:
    return float((np.asarray(true) == np.asarray(predicted)).mean()) if len(true) else 0.0
