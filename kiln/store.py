"""The artifact store: one content-addressed directory per stage output, each with a manifest.json.

Layout under the root (any fsspec URL; a plain path is local):

    <root>/<stage>/<key>/            files the stage wrote + manifest.json
    <root>/<stage>/.tmp-<key>-<id>/  a local write in progress (renamed into place when complete)
    <root>/.corrupt/<stage>-<key>-<time>/  an output whose files stopped matching their sha256, set aside

`key` hashes what produced the output (stage, config section, input digests, code version); `digest` hashes what it
contains (every file's name and sha256). A reader trusts only a directory whose manifest.json exists, and verifies
every file's sha256 before use; a stage about to reuse an output verifies it first and, by `on_corrupt`, sets a
corrupt one aside and recomputes it ("recompute") or stops with the file named ("stop"). Local writes are atomic by directory rename; on other filesystems the files are
uploaded first and the manifest last, so a reader never sees a half-written output.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict

from kiln.errors import ConfigError, IntegrityError, KilnError
from kiln.runtime.checksums import sha256_file
from kiln.runtime.checksums import verify_files as verify_checksums

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
CORRUPT_DIR = ".corrupt"  # <root>/.corrupt/: corrupt outputs set aside for inspection, never read by kiln
OnCorrupt = Literal["recompute", "stop"]
LOCKS_DIR = ".locks"  # <root>/.locks/<stage>-<key>.lock: one build per output at a time (local stores)
LOGGER = logging.getLogger("kiln")
_TRACKED_DISTRIBUTIONS = (
    "kiln-pipeline", "torch", "torchvision", "numpy", "pandas", "onnx", "onnxruntime", "prefect",
    "great-expectations", "scikit-learn", "pillow",
)  # fmt: skip


class ArtifactRef(BaseModel):
    """A small, serialisable pointer to one stage output: what tasks pass to each other."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str  # hash of what produced it
    digest: str  # hash of what it contains
    uri: str  # the output directory, as an fsspec URL
    reused: bool = False  # True when this run found the output already in the store

    def __str__(self) -> str:
        return f"{self.stage}@{self.key[:12]} ({self.uri})"


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """What a stage output is, what it came from, and every file's checksum."""

    schema_version: int = MANIFEST_SCHEMA_VERSION
    stage: str
    key: str
    digest: str
    code_version: str
    inputs: dict[str, dict[str, str]]  # name -> {stage, key, digest, uri}
    config: dict[str, Any]
    files: list[FileEntry]
    metrics: dict[str, Any]
    versions: dict[str, str]
    created_at: str
    duration_s: float


REPORT_DIR = "report"  # files under <output>/report/ are for people (previews, plots): checksummed, not in the digest


def list_files(directory: Path) -> list[FileEntry]:
    """Every file under `directory` (but its top-level manifest.json) with size and sha256, sorted by path."""
    return [
        FileEntry(path=path.relative_to(directory).as_posix(), size=path.stat().st_size, sha256=sha256_file(path))
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path != directory / MANIFEST_NAME
    ]


def content_digest(files: list[FileEntry]) -> str:
    """The digest of an output: a hash over the relative paths and sha256s of the files downstream stages read.

    Files under report/ are left out, so that re-drawing a preview does not retrain everything after it.
    """
    consumed = [entry for entry in files if not entry.path.startswith(f"{REPORT_DIR}/")]
    listing = "\n".join(f"{entry.path}\t{entry.sha256}" for entry in sorted(consumed, key=lambda e: e.path))
    return hashlib.sha256(listing.encode()).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class ArtifactStore:
    """Reads and writes stage outputs under one fsspec root. Holds no state besides the root."""

    def __init__(self, root: str | os.PathLike[str], on_corrupt: OnCorrupt = "recompute"):
        root_text = str(root)
        self.on_corrupt = on_corrupt
        try:
            self.fs, path = fsspec.core.url_to_fs(root_text)
        except (ImportError, ValueError) as error:  # e.g. s3:// without s3fs installed
            raise ConfigError(f"store.root {root_text!r} cannot be opened: {error}") from None
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.url = self.root if self.is_local else root_text.rstrip("/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # --- addressing -------------------------------------------------------------------------------------------
    def output_path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def output_uri(self, stage: str, key: str) -> str:
        return f"{self.url}/{stage}/{key}"

    def _path_of(self, ref: ArtifactRef) -> str:
        return self.output_path(ref.stage, ref.key)

    # --- lookup -----------------------------------------------------------------------------------------------
    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The published output for (stage, key), or None when there is none."""
        manifest_path = f"{self.output_path(stage, key)}/{MANIFEST_NAME}"
        if not self.fs.exists(manifest_path):
            return None
        manifest = self._load_manifest(manifest_path)
        return ArtifactRef(stage=stage, key=key, digest=manifest.digest, uri=self.output_uri(stage, key))

    def manifest(self, ref: ArtifactRef) -> Manifest:
        return self._load_manifest(f"{self._path_of(ref)}/{MANIFEST_NAME}")

    def _load_manifest(self, manifest_path: str) -> Manifest:
        try:
            with self.fs.open(manifest_path, "rb") as handle:
                return Manifest.model_validate_json(handle.read())
        except FileNotFoundError:
            raise IntegrityError(f"{manifest_path} is missing: the output was never published or was deleted") from None
        except ValueError as error:
            raise IntegrityError(
                f"{manifest_path} is not a valid kiln manifest ({error.__class__.__name__}); "
                f"delete its directory so the stage is recomputed"
            ) from None

    # --- writing ----------------------------------------------------------------------------------------------
    @contextmanager
    def building(self, stage: str, key: str) -> Iterator[None]:
        """Held while `stage`/`key` is built, so that concurrent runs with the same inputs build it once: the
        second waits, then finds the first one's output. Local stores only (an flock); on other stores both build
        and the first publish wins."""
        if not self.is_local:
            yield
            return
        lock_dir = Path(self.root, LOCKS_DIR)
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{stage}-{key}.lock", "a") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                LOGGER.info(f"{stage}: another run is building this output; waiting to reuse it")
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @contextmanager
    def staging(self, stage: str) -> Iterator[Path]:
        """A local, empty directory to build an output in; removed afterwards whatever happens.

        For a local store it sits beside the final location so that publishing is one rename.
        """
        if self.is_local:
            parent = Path(self.root, stage)
            parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        else:
            work = Path(tempfile.mkdtemp(prefix=f"kiln-{stage}-"))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def publish(
        self,
        stage: str,
        key: str,
        built_dir: Path,
        *,
        code_version: str,
        inputs: dict[str, ArtifactRef],
        config: dict[str, Any],
        metrics: dict[str, Any],
        started_at: float,
    ) -> ArtifactRef:
        """Checksum every file in `built_dir`, write manifest.json and move the output into place atomically.

        If another writer published the same key first, its output wins and ours is discarded.
        """
        files = list_files(built_dir)
        manifest = Manifest(
            stage=stage,
            key=key,
            digest=content_digest(files),
            code_version=code_version,
            inputs={name: ref.model_dump(include={"stage", "key", "digest", "uri"}) for name, ref in inputs.items()},
            config=config,
            files=files,
            metrics=metrics,
            versions=library_versions(),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            duration_s=round(time.time() - started_at, 3),
        )
        (built_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        final_path = self.output_path(stage, key)
        if self.is_local:
            self._rename_into_place(built_dir, Path(final_path))
        else:
            self._upload_manifest_last(built_dir, final_path, files)
        published = self.lookup(stage, key)
        assert published is not None
        return published

    @staticmethod
    def _rename_into_place(built_dir: Path, final_path: Path) -> None:
        # One rename of the whole directory: atomic on one filesystem, so readers see all of it or nothing.
        try:
            os.rename(built_dir, final_path)
        except OSError:
            if not (final_path / MANIFEST_NAME).exists():
                raise
            # Another writer with identical inputs won the race; staging cleanup discards our copy.

    def _upload_manifest_last(self, built_dir: Path, final_path: str, files: list[FileEntry]) -> None:
        if self.fs.exists(f"{final_path}/{MANIFEST_NAME}"):
            return
        for entry in files:
            remote = f"{final_path}/{entry.path}"
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(built_dir / entry.path), remote)
        self.fs.put_file(str(built_dir / MANIFEST_NAME), f"{final_path}/{MANIFEST_NAME}")

    def scratch_dir(self, stage: str, key: str) -> Path:
        """A local directory that survives a crash (e.g. training checkpoints), for resuming the same output."""
        base = Path(self.root) if self.is_local else Path(tempfile.gettempdir()) / "kiln-scratch"
        path = base / ".scratch" / stage / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def verify(self, ref: ArtifactRef) -> None:
        """Check every file of a stored output against its manifest; IntegrityError naming the first bad file."""
        manifest = self.manifest(ref)
        if self.is_local:
            verify_files(Path(self._path_of(ref)), manifest.files)
            return
        path = self._path_of(ref)
        for entry in manifest.files:
            try:
                with self.fs.open(f"{path}/{entry.path}", "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
            except FileNotFoundError:
                digest = "missing"
            if digest != entry.sha256:
                raise IntegrityError(
                    f"{path}/{entry.path} is corrupted: sha256 {digest[:12]}… differs from the manifest's "
                    f"{entry.sha256[:12]}…; delete {ref.uri} so the stage is recomputed"
                )

    def set_aside(self, ref: ArtifactRef) -> str:
        """Move a corrupt output out of the way (manifest first, so no reader trusts it meanwhile); returns where."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        destination = f"{self.root}/{CORRUPT_DIR}/{ref.stage}-{ref.key}-{stamp}"
        source = self._path_of(ref)
        if self.is_local:
            Path(destination).parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, destination)  # one rename: the manifest leaves with the files
        else:
            self.fs.rm(f"{source}/{MANIFEST_NAME}")
            self.fs.mv(source, destination, recursive=True)
        return destination if self.is_local else f"{self.url}/{CORRUPT_DIR}/{destination.rsplit('/', 1)[-1]}"

    # --- reading ----------------------------------------------------------------------------------------------
    def materialize(self, ref: ArtifactRef, cache_dir: Path | None = None) -> Path:
        """A local directory holding `ref`'s files, every sha256 verified. Raises IntegrityError on mismatch.

        Local stores are verified in place; remote ones are downloaded into `cache_dir` (default: a temp dir).
        """
        manifest = self.manifest(ref)
        if manifest.digest != ref.digest:
            raise IntegrityError(
                f"{ref.uri} now holds content {manifest.digest[:12]}, but this run expected {ref.digest[:12]}; "
                f"the output was replaced after it was produced: re-run the pipeline"
            )
        if self.is_local:
            local = Path(self._path_of(ref))
        else:
            local = (cache_dir or Path(tempfile.gettempdir()) / "kiln-cache") / ref.stage / ref.key
            self.fs.get(self._path_of(ref) + "/", str(local), recursive=True)
        verify_files(local, manifest.files)
        return local


def verify_files(directory: Path, files: list[FileEntry]) -> None:
    """Check every listed file's sha256; raise IntegrityError naming the first missing or differing file."""
    verify_checksums(
        directory, [(entry.path, entry.sha256) for entry in files], f"delete {directory} so the stage is recomputed"
    )


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise KilnError(f"cannot read {path}: {error}") from None


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
