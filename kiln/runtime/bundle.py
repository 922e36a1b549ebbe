"""Open a deployment bundle, verify every file against its manifest, and classify images with it.

    <name>-<version>/
        model.onnx         raw-image model: `image` uint8 [N, H, W, C] -> `probabilities`, `class_index`
        model.fp32.onnx    tensor-in fp32 model: `input` float32 [N, C, H, W] (see preprocess.json) -> `probabilities`
        labels.json        class names, index = output position
        preprocess.json    the tensor-in model's resize, channels and normalization
        manifest.json      every file's size and sha256, checked before any model is loaded
        ...                model card, metrics, provenance, Triton repository, Dockerfile, this runtime

Images of any size and channel count are converted and resized to the model's input exactly as the training
images were (kiln.runtime.images).
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checksums import verify_files
from .errors import BundleError, IntegrityError
from .images import UnreadableImage, fit_to_input, open_image
from .onnx_runtime import RAW_INPUT_NAME, ort_session, run_onnx
from .preprocess import Preprocessing

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 2  # 2: model.onnx takes raw uint8 images
RAW_MODEL_FILE = "model.onnx"
TENSOR_MODEL_FILE = "model.fp32.onnx"
REQUIRED_FILES = (RAW_MODEL_FILE, TENSOR_MODEL_FILE, "labels.json", "preprocess.json", "metrics.json")
VARIANTS = ("shipped", "fp32")  # shipped: model.onnx (the variant the pipeline chose); fp32: model.fp32.onnx
_CHUNK = 256  # images per onnxruntime call, to bound memory on large batches


@dataclass
class Prediction:
    source: str
    label: str
    index: int
    probability: float
    top: list[dict[str, Any]] = field(default_factory=list)  # [{"label", "index", "probability"}], best first


class Bundle:
    """A verified bundle, ready to classify. Build with `load_bundle`."""

    def __init__(self, directory: Path, manifest: dict[str, Any], variant: str = "shipped"):
        self.directory = directory
        self.manifest = manifest
        self.variant = variant
        self.labels: list[str] = json.loads((directory / "labels.json").read_text())
        self.metrics: dict[str, Any] = json.loads((directory / "metrics.json").read_text())
        self.preprocessing = Preprocessing.from_json(json.loads((directory / "preprocess.json").read_text()))
        self.session = ort_session(directory / (RAW_MODEL_FILE if variant == "shipped" else TENSOR_MODEL_FILE))
        prep = self.preprocessing
        self.input_shape = (prep.height, prep.width, prep.channels)

    @property
    def name(self) -> str:
        return self.manifest["model_name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def variant_name(self) -> str:
        """What runs: the pipeline's chosen variant (e.g. int8) for `shipped`, else fp32."""
        return self.manifest.get("chosen_variant", "unknown") if self.variant == "shipped" else "fp32"

    def predict_arrays(self, images_nhwc: np.ndarray) -> np.ndarray:
        """Probabilities float32 [N, classes] for uint8 [N, H, W, C] images already at the bundle's input shape."""
        if images_nhwc.ndim != 4 or tuple(images_nhwc.shape[1:]) != self.input_shape:
            raise ValueError(f"images must be uint8 [N, {', '.join(map(str, self.input_shape))}], got {images_nhwc.shape}")
        images = np.ascontiguousarray(images_nhwc, dtype=np.uint8)
        if self.variant != "shipped":
            return run_onnx(self.session, self.preprocessing.normalize(images), batch_size=_CHUNK)
        chunks = [
            self.session.run(None, {RAW_INPUT_NAME: images[start : start + _CHUNK]})[0]
            for start in range(0, len(images), _CHUNK)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)), np.float32)

    def fit(self, pixels: np.ndarray) -> np.ndarray:
        """Any uint8 [H, W, 1|3] image -> the model's input shape (channels converted, resized as in training)."""
        return fit_to_input(pixels, *self.input_shape)

    def predict_images(self, images: list[np.ndarray], sources: list[str], top_k: int = 1) -> list[Prediction]:
        """Classify uint8 [H, W, 1|3] images of any size in one batch; `top` holds the best `top_k` classes."""
        probabilities = self.predict_arrays(np.stack([self.fit(pixels) for pixels in images]))
        top_k = max(1, min(top_k, len(self.labels)))
        predictions = []
        for source, row in zip(sources, probabilities):
            ranked = np.argsort(-row, kind="stable")[:top_k]
            top = [{"label": self.labels[i], "index": int(i), "probability": float(row[i])} for i in ranked]
            predictions.append(Prediction(source, top[0]["label"], top[0]["index"], top[0]["probability"], top))
        return predictions

    def predict_files(self, paths: list[Path], top_k: int = 1) -> list[Prediction]:
        """Classify image files. Raises BundleError naming a file that is not a readable image."""
        images = []
        for path in paths:
            try:
                images.append(open_image(Path(path)))
            except UnreadableImage as error:
                raise BundleError(f"{path}: {error}; pass PNG/JPEG/BMP/GIF/WebP image files") from None
        return self.predict_images(images, [str(path) for path in paths], top_k)


def load_bundle(path: str | Path, extract_to: Path | None = None, variant: str = "shipped") -> Bundle:
    """Open a bundle folder or .tar.gz, verify every file against its manifest, and load the model.

    Raises BundleError (not a bundle, or made by an incompatible kiln) or IntegrityError (a file differs from its
    recorded sha256: corrupted or tampered).
    """
    if variant not in VARIANTS:
        raise BundleError(f"unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist; pass the folder or .tar.gz that `kiln run` printed")
    if path.is_file():
        path = _extract(path, extract_to or Path(tempfile.mkdtemp(prefix="kiln-bundle-")))
    manifest = read_manifest(path)
    listed = {entry["path"] for entry in manifest["files"]}
    # Python writes __pycache__ when the bundle's own runtime runs from inside it; nothing else may be added.
    unlisted = sorted(
        relative for relative in (item.relative_to(path).as_posix() for item in path.rglob("*") if item.is_file())
        if relative not in listed and relative != MANIFEST_FILE and "__pycache__" not in relative.split("/")
    )  # fmt: skip
    try:
        if unlisted:
            raise IntegrityError(
                f"{path} holds files its manifest does not list: {', '.join(unlisted[:5])}; remove them or re-create "
                "the bundle"
            )
        verify_files(path, [(entry["path"], entry["sha256"]) for entry in manifest["files"]], "re-create the bundle")
    except IntegrityError as error:
        raise IntegrityError(f"bundle verification failed, refusing to load it: {error}") from None
    return Bundle(path, manifest, variant)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The bundle's manifest.json, checked for shape, schema version and required files (not yet checksums)."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{directory} has no {MANIFEST_FILE}: not a kiln bundle (expected the folder `kiln run` printed)")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = {entry["path"] for entry in manifest["files"]}
        schema = manifest.get("schema_version")
        fields_ok = all(isinstance(manifest.get(name), str) for name in ("model_name", "version")) and all(
            isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str) for entry in manifest["files"]
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BundleError(f"{manifest_path} is malformed ({error}); re-create the bundle with `kiln run`") from None
    if not fields_ok:
        raise BundleError(
            f"{manifest_path} is malformed (model_name, version and every file's path and sha256 must be strings); "
            "re-create the bundle with `kiln run`"
        )
    if schema != SCHEMA_VERSION:
        raise BundleError(
            f"{directory} is a bundle of schema version {schema}, this runtime reads version {SCHEMA_VERSION}; "
            "re-package it with this kiln version (`kiln run` reuses everything up to the package stage)"
        )
    missing = [name for name in REQUIRED_FILES if name not in listed]
    if missing:
        raise BundleError(f"{directory} lacks {', '.join(missing)}; re-create the bundle with `kiln run`")
    return manifest


def _extract(archive_path: Path, target: Path) -> Path:
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            archive.extractall(target, filter="data")  # the stdlib's safe filter: no escapes, no devices
    except (tarfile.TarError, OSError) as error:
        raise BundleError(f"{archive_path} is not a readable bundle archive ({error})") from None
    folders = [entry for entry in target.iterdir() if entry.is_dir()]
    if len(folders) != 1:
        raise BundleError(f"{archive_path} should hold exactly one bundle folder, found {len(folders)}")
    return folders[0]
