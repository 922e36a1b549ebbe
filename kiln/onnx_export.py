"""The torch side of ONNX: wrap a classifier so it outputs probabilities, and export it with a dynamic batch axis.

The exported graph takes `input` float32 [N, C, H, W] (normalized, see kiln.runtime.preprocess) and returns
`probabilities` float32 [N, classes]. kiln.onnx_tools runs it without torch.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kiln.errors import ExportError
from kiln.onnx_tools import INPUT_NAME, OUTPUT_NAME
from kiln.runtime.preprocess import Preprocessing

EXAMPLE_BATCH = 2  # torch.export specializes sizes 0 and 1, so a dynamic axis needs an example of at least 2
BATCH_AXIS = "batch"  # the symbolic name of the input's and output's first dimension

logger = logging.getLogger("kiln")


class ProbabilityModel(nn.Module):
    """A classifier whose output is softmax probabilities instead of logits: what the ONNX graph computes."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the name becomes the graph input's
        return torch.softmax(self.classifier(input), dim=-1)


@dataclass(frozen=True)
class ExportInfo:
    """How a model was exported: which exporter, at which opset, and why dynamo was not used when it was not."""

    exporter: str  # "dynamo" (torch.export based) or "torchscript" (the legacy fallback)
    opset: int
    example_batch: int
    dynamo_error: str | None = None


def export_onnx(model: nn.Module, prep: Preprocessing, path: Path, opset: int) -> ExportInfo:
    """Write `model` (eval mode, CPU) wrapped in ProbabilityModel to `path` as one self-contained ONNX file.

    Tries the dynamo exporter first; if it raises, or cannot produce the requested opset (its version converter
    does not go below 18 for every operator), falls back to the TorchScript exporter and records why.
    Raises ExportError when both exporters fail.
    """
    wrapped = ProbabilityModel(model).eval()
    example = torch.zeros(EXAMPLE_BATCH, prep.channels, prep.height, prep.width)
    try:
        _export_dynamo(wrapped, example, path, opset)
        return ExportInfo(exporter="dynamo", opset=opset, example_batch=EXAMPLE_BATCH)
    except Exception as error:  # any dynamo failure is recorded and the legacy exporter tried; see below
        dynamo_error = f"{error.__class__.__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        logger.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", dynamo_error)
    path.unlink(missing_ok=True)
    try:
        _export_torchscript(wrapped, example, path, opset)
    except Exception as error:
        raise ExportError(
            f"could not export {model.__class__.__name__} to ONNX opset {opset}: the dynamo exporter failed with "
            f"{dynamo_error}; the TorchScript exporter failed with {error.__class__.__name__}: {error}. "
            f"Try another export.opset (18 or later suits the dynamo exporter)"
        ) from error
    return ExportInfo(exporter="torchscript", opset=opset, example_batch=EXAMPLE_BATCH, dynamo_error=dynamo_error)


def _export_dynamo(wrapped: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    program = torch.onnx.export(
        wrapped,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes={INPUT_NAME: {0: BATCH_AXIS}},
        external_data=False,
        optimize=True,
        verbose=False,
    )
    produced = default_opset(program.model_proto)
    if produced != opset:
        raise RuntimeError(f"it produced opset {produced} instead of the requested {opset}")
    program.save(path, external_data=False)


def _export_torchscript(wrapped: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # we chose the legacy exporter knowingly, as a fallback
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
        )


def default_opset(model_proto) -> int:
    """The version of the default (ai.onnx) operator set a ModelProto imports."""
    return next(entry.version for entry in model_proto.opset_import if entry.domain in ("", "ai.onnx"))


@torch.inference_mode()
def torch_probabilities(model: nn.Module, inputs_nchw: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities float32 [N, classes] of `model` (fp32, eval, CPU) for normalized [N, C, H, W] inputs."""
    wrapped = ProbabilityModel(model).eval()
    batches = [
        wrapped(torch.from_numpy(np.ascontiguousarray(inputs_nchw[start : start + batch_size], dtype=np.float32)))
        for start in range(0, len(inputs_nchw), batch_size)
    ]
    return torch.cat(batches).numpy().astype(np.float32, copy=False)
