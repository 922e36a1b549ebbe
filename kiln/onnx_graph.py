"""Turn a tensor-in classifier graph into one that takes raw images: preprocessing and top-1 inside the model.

    image        uint8   [N, H, W, C]   what a camera or an image decoder produces
      -> Cast float32 -> Div 255 -> Sub mean -> Div std -> Transpose to [N, C, H, W]
      -> the classifier graph (fp32 or int8 QDQ, unchanged)
    probabilities float32 [N, classes]
    class_index   int64   [N]           ArgMax of probabilities

The arithmetic mirrors kiln.runtime.preprocess.Preprocessing.normalize operation by operation, in float32, so the
raw-image model computes the tensor-in model's input bit for bit (the package stage checks this on the test set).
Works on any exported or quantized model with kiln's `input`/`probabilities` interface, so the shipped variant,
whichever it is, gets the same front end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import ExportError
from kiln.runtime.onnx_runtime import CLASS_INDEX_NAME, INPUT_NAME, OUTPUT_NAME, RAW_INPUT_NAME
from kiln.runtime.preprocess import Preprocessing

_PREFIX = "kiln_preprocess_"  # names of the added nodes and constants, unlikely to clash with exporter names


def add_image_preprocessing(model_path: Path, prep: Preprocessing, out_path: Path, classes: list[str]) -> None:
    """Write to `out_path` the model at `model_path` with an `image` uint8 NHWC input and a `class_index` output.

    The class names go into the model's metadata (`classes`, JSON), so the file alone says what it predicts.
    Raises ExportError if the model lacks kiln's `input` [N, C, H, W] / `probabilities` interface or its input
    size differs from `prep`'s.
    """
    model = onnx.load(str(model_path))
    graph = model.graph
    tensor_input = _single(graph.input, INPUT_NAME, "input", model_path)
    _single(graph.output, OUTPUT_NAME, "output", model_path)
    batch_dim = tensor_input.type.tensor_type.shape.dim[0]
    _check_input_size(tensor_input, prep, model_path)

    scale = np.asarray(255.0, dtype=np.float32)
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    constants = {"scale": scale, "mean": mean, "std": std}
    graph.initializer.extend(numpy_helper.from_array(value, _PREFIX + name) for name, value in constants.items())
    front = [
        helper.make_node("Cast", [RAW_INPUT_NAME], [_PREFIX + "float"], to=TensorProto.FLOAT),
        helper.make_node("Div", [_PREFIX + "float", _PREFIX + "scale"], [_PREFIX + "unit"]),
        helper.make_node("Sub", [_PREFIX + "unit", _PREFIX + "mean"], [_PREFIX + "centered"]),
        helper.make_node("Div", [_PREFIX + "centered", _PREFIX + "std"], [_PREFIX + "normalized"]),
        helper.make_node("Transpose", [_PREFIX + "normalized"], [INPUT_NAME], perm=[0, 3, 1, 2]),
    ]
    back = helper.make_node("ArgMax", [OUTPUT_NAME], [CLASS_INDEX_NAME], axis=1, keepdims=0)
    nodes = [*front, *graph.node, back]
    del graph.node[:]
    graph.node.extend(nodes)  # topological order: the front end first, ArgMax last

    image = helper.make_tensor_value_info(RAW_INPUT_NAME, TensorProto.UINT8, [None, prep.height, prep.width, prep.channels])
    image.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    class_index = helper.make_tensor_value_info(CLASS_INDEX_NAME, TensorProto.INT64, [None])
    class_index.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    graph.input.remove(tensor_input)
    graph.input.insert(0, image)
    graph.output.append(class_index)
    del model.metadata_props[:]
    for key, value in {"classes": json.dumps(classes), "preprocessing": json.dumps(prep.to_json())}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out_path))


def _single(values, name: str, kind: str, path: Path):
    names = [value.name for value in values]
    if names != [name]:
        raise ExportError(f"{path} has {kind}s {names}, expected [{name!r}]: it is not a kiln tensor-in model")
    return values[0]


def _check_input_size(tensor_input, prep: Preprocessing, path: Path) -> None:
    dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_input.type.tensor_type.shape.dim]
    expected = [prep.channels, prep.height, prep.width]
    if len(dims) != 4 or dims[1:] != expected:
        raise ExportError(f"{path} takes input of shape {dims}, but preprocess.json says [N, {', '.join(map(str, expected))}]")


def expose_model_input(raw_model_path: Path) -> bytes:
    """The raw-image model, serialized, with the tensor it feeds the classifier (`input`) as an extra output.

    Probabilities alone can hide a wrong front end (a confident model barely moves when its input is scaled), so
    the package stage compares this tensor with numpy's preprocessing directly.
    """
    model = onnx.load(str(raw_model_path))
    model.graph.output.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, None))
    return model.SerializeToString()
