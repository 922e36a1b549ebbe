"""The deployment bundle: a folder (and .tar.gz) that runs with onnxruntime + numpy + pillow alone.

    <name>-<version>/
        model.onnx         the chosen variant (int8 or fp32), input `input` float32 NCHW, output `probabilities`
        model.fp32.onnx    the full-precision export, for those who want it
        labels.json        class names, index = output position
        preprocess.json    resize, channels, normalization (see kiln.preprocess)
        metrics.json       evaluation and compression results
        model_card.md      what it is, how it was made, how well it does, how to run it
        provenance.json    every stage output it descends from: key, digest, code version, resolved config
        manifest.json      every file's size and sha256; checked before the model is loaded

No torch import here: `kiln predict` must work where only the bundle's runtime dependencies are installed.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import BundleError, IntegrityError
from kiln.preprocess import Preprocessing
from kiln.store import MANIFEST_NAME, FileEntry, list_files, verify_files

BUNDLE_MANIFEST = MANIFEST_NAME
BUNDLE_SCHEMA_VERSION = 1
REQUIRED_FILES = ("model.onnx", "labels.json", "preprocess.json", "metrics.json", "model_card.md")


def write_bundle_manifest(bundle_dir: Path, model_name: str, version: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in `bundle_dir` into its manifest.json; returns the manifest."""
    files = [entry.model_dump() for entry in list_files(bundle_dir)]
    manifest = {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "model_name": model_name,
        "version": version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        **extra,
    }
    (bundle_dir / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def archive_bundle(bundle_dir: Path, archive_path: Path) -> None:
    with tarfile.open(archive_path, "w:gz") as archive:
        archive.add(bundle_dir, arcname=bundle_dir.name)


@dataclass
class Prediction:
    source: str
    label: str
    index: int
    probability: float


class Bundle:
    """A verified bundle, ready to predict. Build with `load_bundle`."""

    def __init__(self, directory: Path):
        from kiln.onnx_tools import ort_session

        self.directory = directory
        self.manifest = json.loads((directory / BUNDLE_MANIFEST).read_text())
        self.labels: list[str] = json.loads((directory / "labels.json").read_text())
        self.preprocessing = Preprocessing.from_json(json.loads((directory / "preprocess.json").read_text()))
        self.session = ort_session(directory / "model.onnx")

    def predict_arrays(self, images_nhwc: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for uint8 NHWC images already at the bundle's size."""
        from kiln.onnx_tools import run_onnx

        return run_onnx(self.session, self.preprocessing.normalize(images_nhwc))

    def predict_files(self, paths: list[Path]) -> list[Prediction]:
        """Top-1 label and probability per image file. Raises BundleError naming an unreadable file."""
        images = []
        for path in paths:
            try:
                images.append(self.preprocessing.load_image(Path(path)))
            except ValueError as error:
                raise BundleError(f"{error}; pass PNG/JPEG/BMP/GIF/WebP image files") from None
        probabilities = self.predict_arrays(np.stack(images))
        indices = probabilities.argmax(axis=1)
        return [
            Prediction(str(path), self.labels[int(index)], int(index), float(probabilities[row, index]))
            for row, (path, index) in enumerate(zip(paths, indices))
        ]


def load_bundle(path: str | Path, extract_to: Path | None = None) -> Bundle:
    """Open a bundle folder or .tar.gz, verify every file against its manifest, and load the model.

    Raises BundleError (not a bundle) or IntegrityError (a file differs from its recorded sha256).
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist; pass the folder or .tar.gz that `kiln run` printed")
    if path.is_file():
        path = _extract(path, extract_to or Path(tempfile.mkdtemp(prefix="kiln-bundle-")))
    manifest_path = path / BUNDLE_MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} has no {BUNDLE_MANIFEST}: not a kiln bundle (expected the folder `kiln run` printed)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = [FileEntry(**entry) for entry in manifest["files"]]
    except (ValueError, KeyError, TypeError) as error:
        raise BundleError(f"{manifest_path} is malformed ({error}); re-create the bundle with `kiln run`") from None
    missing = [name for name in REQUIRED_FILES if name not in {entry.path for entry in files}]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}; re-create the bundle with `kiln run`")
    try:
        verify_files(path, files)
    except IntegrityError as error:
        raise IntegrityError(f"bundle verification failed: {error}") from None
    return Bundle(path)


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
