"""kiln.triton on a tiny hand-built raw-image classifier, checked against onnxruntime's view of the same model.

The generated config.pbtxt is read back with a small protobuf-text-format parser written here, independently of
the generator, and also with protobuf's own text_format parser against the relevant subset of Triton's
ModelConfig schema (triton-inference-server/common, protobuf/model_config.proto).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import ExportError
from kiln.triton import Signature, TensorSpec, model_signature, triton_config, write_triton_repository

SIZE, CHANNELS, CLASSES = 8, 1, 10
LABELS = [f"digit_{index}" for index in range(CLASSES)]

# onnxruntime's NodeArg.type strings -> Triton config data types (model_configuration.md, "Datatypes").
ORT_TO_TRITON = {
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(float)": "TYPE_FP32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(double)": "TYPE_FP64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bool)": "TYPE_BOOL",
}


def write_raw_image_classifier(path: Path, batch: str | int = "batch", weights_as_inputs: bool = False) -> None:
    """uint8 [N, 8, 8, 1] -> Cast -> Flatten -> MatMul/Add -> Softmax (probabilities [N, 10]) and ArgMax
    (class_index [N]), like the bundle's serving model. `batch` fixes the batch dim when it is an int;
    `weights_as_inputs` also lists the initializers as graph inputs, as older exporters did."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(SIZE * SIZE * CHANNELS, CLASSES)).astype(np.float32) / 64
    bias = rng.normal(size=(CLASSES,)).astype(np.float32)
    initializers = [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")]
    inputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, [batch, SIZE, SIZE, CHANNELS])]
    if weights_as_inputs:
        inputs += [
            helper.make_tensor_value_info("weights", TensorProto.FLOAT, list(weights.shape)),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, list(bias.shape)),
        ]
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["image_float"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["image_float"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weights"], ["scaled"]),
            helper.make_node("Add", ["scaled", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["class_index"], axis=1, keepdims=0),
        ],
        "raw_image_classifier",
        inputs,
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, CLASSES]),
            helper.make_tensor_value_info("class_index", TensorProto.INT64, [batch]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    write_raw_image_classifier(path)
    return path


@pytest.fixture
def session(model_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


# --- an independent reader for the protobuf text format subset that Triton configs use ---------------------------


class Ident(str):
    """An unquoted identifier value: an enum constant (TYPE_FP32) or true/false."""


_TOKEN = re.compile(
    r"""(?P<skip>\s+|\#[^\n]*)
      |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      |(?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
      |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      |(?P<punct>[{}\[\]:,;<>])""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _unescape(literal: str) -> str:
    body, out, index = literal[1:-1], [], 0
    while index < len(body):
        char = body[index]
        if char != "\\":
            out.append(char)
            index += 1
            continue
        following = body[index + 1]
        if following in _ESCAPES:
            out.append(_ESCAPES[following])
            index += 2
        elif following in "01234567":
            digits = re.match(r"[0-7]{1,3}", body[index + 1 :]).group()
            out.append(chr(int(digits, 8)))
            index += 1 + len(digits)
        elif following == "x":
            digits = re.match(r"[0-9A-Fa-f]{1,2}", body[index + 2 :]).group()
            out.append(chr(int(digits, 16)))
            index += 2 + len(digits)
        else:
            raise ValueError(f"unknown escape \\{following} in {literal}")
    return "".join(out)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"unexpected character {text[position]!r} at offset {position}")
        if match.lastgroup != "skip":
            tokens.append((match.lastgroup, match.group()))
        position = match.end()
    return tokens


def parse_pbtxt(text: str) -> dict[str, list]:
    """A message as {field: [values]}: every field is a list (repeated or not); sub-messages are dicts, strings
    are str, enums Ident, numbers int/float. `field: [ a, b ]` and repeated `field ...` lines both accumulate."""
    tokens = _tokens(text)
    position = 0

    def peek() -> tuple[str, str] | None:
        return tokens[position] if position < len(tokens) else None

    def at(*symbols: str) -> bool:
        token = peek()
        return token is not None and token[0] == "punct" and token[1] in symbols

    def take(expected: str | None = None) -> tuple[str, str]:
        nonlocal position
        token = peek()
        if token is None or (expected is not None and token[1] != expected):
            raise ValueError(f"expected {expected or 'a token'}, got {token}")
        position += 1
        return token

    def scalar():
        kind, value = take()
        if kind == "string":
            return _unescape(value)
        if kind == "number":
            return float(value) if re.search(r"[.eE]", value) else int(value)
        if kind == "ident":
            return Ident(value)
        raise ValueError(f"expected a value, got {value!r}")

    def element():
        if at("{", "<"):
            return message(take()[1])
        return scalar()

    def message(opener: str | None) -> dict[str, list]:
        closer = {"{": "}", "<": ">", None: None}[opener]
        fields: dict[str, list] = {}
        while (peek() is not None) if closer is None else not at(closer):
            kind, name = take()
            if kind != "ident":
                raise ValueError(f"expected a field name, got {name!r}")
            has_colon = at(":")
            if has_colon:
                take(":")
            values = fields.setdefault(name, [])
            if at("["):
                take("[")
                while not at("]"):
                    values.append(element())
                    if at(","):
                        take(",")
                take("]")
            elif at("{", "<"):
                values.append(message(take()[1]))
            elif has_colon:
                values.append(scalar())
            else:
                raise ValueError(f"field {name!r} needs ':' before a scalar value")
            if at(",", ";"):
                take()
        if closer is not None:
            take(closer)
        return fields

    return message(None)


def one(message: dict[str, list], field: str):
    values = message.get(field, [])
    assert len(values) == 1, f"expected exactly one {field!r}, got {values!r}"
    return values[0]


def test_parser_handles_the_text_format_forms_triton_configs_use():
    parsed = parse_pbtxt(
        '# comment\nname: "a\\"b" max_batch_size: 8\ninput [ { dims: [ 3, -1 ] reshape: { shape: [ ] } }, '
        "{ dims: 2 dims: 5 } ]\ndynamic_batching { }\ninstance_group < kind: KIND_CPU >\n"
    )
    assert one(parsed, "name") == 'a"b' and one(parsed, "max_batch_size") == 8
    first, second = parsed["input"]
    assert first["dims"] == [3, -1] and one(first, "reshape") == {"shape": []}
    assert second["dims"] == [2, 5]
    assert one(parsed, "dynamic_batching") == {}
    assert one(one(parsed, "instance_group"), "kind") == Ident("KIND_CPU")
    with pytest.raises(ValueError):
        parse_pbtxt("name: ")


# --- the model and its signature ----------------------------------------------------------------------------------


def test_tiny_model_is_valid_and_runs_in_onnxruntime(session: ort.InferenceSession):
    images = np.random.default_rng(1).integers(0, 256, size=(5, SIZE, SIZE, CHANNELS), dtype=np.uint8)
    probabilities, class_index = session.run(["probabilities", "class_index"], {"image": images})
    assert probabilities.shape == (5, CLASSES) and probabilities.dtype == np.float32
    assert class_index.shape == (5,) and class_index.dtype == np.int64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(class_index, probabilities.argmax(axis=1))


@pytest.mark.parametrize("weights_as_inputs", [False, True])
def test_model_signature_reads_graph_inputs_and_outputs_without_initializers(tmp_path: Path, weights_as_inputs):
    path = tmp_path / "m.onnx"
    write_raw_image_classifier(path, weights_as_inputs=weights_as_inputs)
    assert model_signature(path) == Signature(
        inputs=(TensorSpec("image", "uint8", (None, SIZE, SIZE, CHANNELS)),),
        outputs=(TensorSpec("probabilities", "float32", (None, CLASSES)), TensorSpec("class_index", "int64", (None,))),
    )


def test_model_signature_rejects_a_file_that_is_not_onnx(tmp_path: Path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\xff\x00 not a model")
    with pytest.raises(ExportError, match="broken.onnx"):
        model_signature(path)


# --- config.pbtxt against onnxruntime's view of the model --------------------------------------------------------


def test_config_matches_the_signature_onnxruntime_reports(model_path: Path, session: ort.InferenceSession):
    config = parse_pbtxt(triton_config("digits", model_signature(model_path), max_batch_size=32))

    assert one(config, "name") == "digits"
    assert one(config, "backend") == "onnxruntime"
    assert "platform" not in config
    assert one(config, "max_batch_size") == 32
    assert one(config, "dynamic_batching") == {}
    assert "instance_group" not in config  # left to Triton's default (GPU when present)

    for section, args in (("input", session.get_inputs()), ("output", session.get_outputs())):
        entries = config[section]
        assert [one(entry, "name") for entry in entries] == [arg.name for arg in args]
        for entry, arg in zip(entries, args):
            assert one(entry, "data_type") == ORT_TO_TRITON[arg.type]
            batch, *rest = arg.shape
            assert isinstance(batch, str) or batch is None, "the model's batch dim must be symbolic"
            if rest:
                assert entry["dims"] == rest
                assert "reshape" not in entry
            else:  # a [batch] tensor: Triton wants dims [ 1 ] reshaped to [ ] (model_configuration.md, Reshape)
                assert entry["dims"] == [1]
                assert one(entry, "reshape") == {"shape": []}

    labelled = {one(entry, "name"): entry.get("label_filename") for entry in config["output"]}
    assert labelled == {"probabilities": ["labels.txt"], "class_index": None}
    assert all("label_filename" not in entry for entry in config["input"])


def test_config_is_accepted_by_protobufs_own_parser_against_tritons_schema(model_path: Path):
    text_format = pytest.importorskip("google.protobuf.text_format")
    config = model_config_class()()
    text_format.Parse(triton_config("digits", model_signature(model_path), max_batch_size=16), config)

    assert config.backend == "onnxruntime" and config.max_batch_size == 16
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    image, = config.input
    assert (image.name, image.data_type, list(image.dims)) == ("image", 2, [SIZE, SIZE, CHANNELS])  # 2: TYPE_UINT8
    assert not image.HasField("reshape")
    probabilities, class_index = config.output
    assert (probabilities.data_type, list(probabilities.dims), probabilities.label_filename) == (11, [10], "labels.txt")
    assert (class_index.data_type, list(class_index.dims)) == (9, [1])  # 9: TYPE_INT64
    assert class_index.HasField("reshape") and list(class_index.reshape.shape) == []


def model_config_class():
    """A ModelConfig message class for the fields kiln writes, with Triton's names, numbers and enum values."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED

    def add(message, name, number, kind, label=optional, type_name=None):
        entry = message.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            entry.type_name = type_name

    proto = descriptor_pb2.FileDescriptorProto(name="kiln_test_model_config.proto", package="inference")
    proto.syntax = "proto3"
    data_type = proto.enum_type.add(name="DataType")
    for number, name in enumerate(
        "INVALID BOOL UINT8 UINT16 UINT32 UINT64 INT8 INT16 INT32 INT64 FP16 FP32 FP64 STRING BF16".split()
    ):
        data_type.value.add(name=f"TYPE_{name}", number=number)
    reshape = proto.message_type.add(name="ModelTensorReshape")
    add(reshape, "shape", 1, field.TYPE_INT64, repeated)
    model_input = proto.message_type.add(name="ModelInput")
    add(model_input, "name", 1, field.TYPE_STRING)
    add(model_input, "data_type", 2, field.TYPE_ENUM, type_name=".inference.DataType")
    add(model_input, "dims", 4, field.TYPE_INT64, repeated)
    add(model_input, "reshape", 5, field.TYPE_MESSAGE, type_name=".inference.ModelTensorReshape")
    model_output = proto.message_type.add(name="ModelOutput")
    add(model_output, "name", 1, field.TYPE_STRING)
    add(model_output, "data_type", 2, field.TYPE_ENUM, type_name=".inference.DataType")
    add(model_output, "dims", 3, field.TYPE_INT64, repeated)
    add(model_output, "label_filename", 4, field.TYPE_STRING)
    add(model_output, "reshape", 5, field.TYPE_MESSAGE, type_name=".inference.ModelTensorReshape")
    batching = proto.message_type.add(name="ModelDynamicBatching")
    add(batching, "preferred_batch_size", 1, field.TYPE_INT32, repeated)
    config = proto.message_type.add(name="ModelConfig")
    config.oneof_decl.add(name="scheduling_choice")
    add(config, "name", 1, field.TYPE_STRING)
    add(config, "platform", 2, field.TYPE_STRING)
    add(config, "max_batch_size", 4, field.TYPE_INT32)
    add(config, "input", 5, field.TYPE_MESSAGE, repeated, ".inference.ModelInput")
    add(config, "output", 6, field.TYPE_MESSAGE, repeated, ".inference.ModelOutput")
    add(config, "dynamic_batching", 11, field.TYPE_MESSAGE, type_name=".inference.ModelDynamicBatching")
    config.field[-1].oneof_index = 0
    add(config, "backend", 17, field.TYPE_STRING)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def test_config_without_labels_has_no_label_filename(model_path: Path):
    config = parse_pbtxt(triton_config("digits", model_signature(model_path), 8, labels_file=None))
    assert all("label_filename" not in entry for entry in config["input"] + config["output"])


def test_tensor_names_are_quoted_so_they_read_back_exactly():
    name = 'odd "name" \\ with\ttab and ünïcode'
    signature = Signature((TensorSpec(name, "float32", (None, 3)),), (TensorSpec("scores", "float32", (None, 2)),))
    config = parse_pbtxt(triton_config("m", signature, 4))
    assert one(config["input"][0], "name") == name


def test_variable_non_batch_dims_become_minus_one():
    signature = Signature((TensorSpec("x", "float32", (None, None, 3)),), (TensorSpec("y", "float32", (None, 2)),))
    assert parse_pbtxt(triton_config("m", signature, 4))["input"][0]["dims"] == [-1, 3]


# --- the repository on disk --------------------------------------------------------------------------------------


def test_write_triton_repository_lays_out_config_labels_and_versioned_model(tmp_path: Path, model_path: Path):
    repository = tmp_path / "models"
    model_dir = write_triton_repository(repository, "digits", model_path, LABELS, max_batch_size=64)

    assert model_dir == repository / "digits"
    assert sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
        "labels.txt",
    ]
    assert (model_dir / "1" / "model.onnx").read_bytes() == model_path.read_bytes()
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text(encoding="utf-8"))
    assert one(config, "name") == model_dir.name  # Triton: name must match the model's directory
    assert one(config, "max_batch_size") == 64
    label_file = model_dir / one(config["output"][0], "label_filename")
    assert label_file.read_text(encoding="utf-8").splitlines() == LABELS
    # the copy is the same servable model
    copy = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [arg.name for arg in copy.get_outputs()] == ["probabilities", "class_index"]


def test_rewriting_a_repository_replaces_its_files(tmp_path: Path, model_path: Path):
    write_triton_repository(tmp_path, "digits", model_path, LABELS, 8)
    model_dir = write_triton_repository(tmp_path, "digits", model_path, [f"c{i}" for i in range(CLASSES)], 16)
    assert (model_dir / "labels.txt").read_text().splitlines()[0] == "c0"
    assert one(parse_pbtxt((model_dir / "config.pbtxt").read_text()), "max_batch_size") == 16


# --- errors -------------------------------------------------------------------------------------------------------


def test_fixed_batch_dim_is_rejected(tmp_path: Path):
    path = tmp_path / "fixed.onnx"
    write_raw_image_classifier(path, batch=4)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # valid for onnxruntime, not for batching
    with pytest.raises(ExportError, match="dynamic first"):
        triton_config("digits", model_signature(path), 8)
    with pytest.raises(ExportError, match="dynamic first"):
        write_triton_repository(tmp_path / "repo", "digits", path, LABELS, 8)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../escape", "a/b", "a\\b", ".hidden", "has space", 'q"uote', "x" * 129]
)
def test_invalid_model_name_is_rejected_before_writing(tmp_path: Path, model_path: Path, name: str):
    with pytest.raises(ExportError, match="not a valid directory"):
        write_triton_repository(tmp_path / "repo", name, model_path, LABELS, 8)
    assert not (tmp_path / "repo").exists()


def test_dtype_without_triton_equivalent_is_rejected():
    signature = Signature((TensorSpec("x", "bfloat16", (None, 3)),), (TensorSpec("y", "float32", (None, 2)),))
    with pytest.raises(ExportError, match="bfloat16"):
        triton_config("m", signature, 4)


def test_scalar_tensor_without_batch_dim_is_rejected():
    signature = Signature((TensorSpec("x", "float32", ()),), (TensorSpec("y", "float32", (None, 2)),))
    with pytest.raises(ExportError, match="dynamic first"):
        triton_config("m", signature, 4)


@pytest.mark.parametrize("max_batch_size", [0, -1])
def test_max_batch_size_below_one_is_rejected(model_path: Path, max_batch_size: int):
    with pytest.raises(ExportError, match="max_batch_size"):
        triton_config("digits", model_signature(model_path), max_batch_size)


@pytest.mark.parametrize(
    "labels, message",
    [(LABELS[:-1], "10 classes but 9 labels"), ([], "non-empty"), (LABELS[:-1] + ["two\nlines"], "line breaks")],
)
def test_labels_that_do_not_fit_the_model_are_rejected(tmp_path: Path, model_path: Path, labels, message):
    with pytest.raises(ExportError, match=message):
        write_triton_repository(tmp_path / "repo", "digits", model_path, labels, 8)
    assert not (tmp_path / "repo").exists()


def test_labels_need_a_float_scores_output():
    signature = Signature((TensorSpec("x", "uint8", (None, 3)),), (TensorSpec("class_index", "int64", (None,)),))
    with pytest.raises(ExportError, match="labels_file=None"):
        triton_config("m", signature, 4)
    assert "label_filename" not in triton_config("m", signature, 4, labels_file=None)


def test_model_with_external_weights_is_rejected_rather_than_copied_without_them(tmp_path: Path, model_path: Path):
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    model = onnx.load(str(model_path))
    onnx.save(model, external, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert model_signature(external).inputs[0].name == "image"  # the signature does not need the weights
    with pytest.raises(ExportError, match="external data"):
        write_triton_repository(tmp_path / "repo", "digits", external, LABELS, 8)
