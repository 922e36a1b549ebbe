"""The artifact store: one content-addressed directory per stage output, each with a manifest.json.

Layout under the root (any fsspec URL; a plain path is local):

    <root>/<stage>/<key>/            manifest.json, and (local stores) the files the stage wrote
    <root>/<stage>/<key>/w-<id>/     (other stores) the files of the writer whose manifest was published
    <root>/<stage>/.tmp-<key>-<id>/  a local write in progress (renamed into place when complete)
    <root>/.corrupt/<stage>-<key>-<time>/  an output whose files stopped matching their sha256, set aside

`key` hashes what produced the output (stage, config section, input digests, code version); `digest` hashes what it
contains (every file's name and sha256). A reader trusts only a directory whose manifest.json exists, reads exactly
the files that manifest lists, where it says they are (`files_prefix`), and verifies every file's sha256 before use;
a stage about to reuse an output verifies it first and, by `on_corrupt`, sets a corrupt one aside and recomputes it
("recompute") or stops with the file named ("stop").

Local writes are atomic by directory rename. On other filesystems each writer uploads its files under a folder of
its own (`w-<id>/`) and then publishes the manifest, which names that folder, with a create-only write: the first
manifest wins, and a writer that loses deletes its files and returns the winner's output. Two writers racing on one
key therefore never mix their files, and a reader never sees an output before its manifest. The create-only write is
atomic where the filesystem implements fsspec's exclusive write (s3fs: a conditional PUT, `If-None-Match: *`, as AWS
S3 and S3-compatible servers that support it honour); elsewhere fsspec checks that the manifest is absent and then
writes it, so two writers finishing within that window can both write it, and the last one stays published: the
manifest is read back after publishing, and whoever finds another writer's manifest there deletes its own files and
returns that output, so even then no manifest lists files that are not there.
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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, field_validator

from kiln.errors import ConfigError, IntegrityError, KilnError
from kiln.runtime.checksums import sha256_file
from kiln.runtime.checksums import verify_files as verify_checksums

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
CORRUPT_DIR = ".corrupt"  # <root>/.corrupt/: corrupt outputs set aside for inspection, never read by kiln
OnCorrupt = Literal["recompute", "stop"]
LOCKS_DIR = ".locks"  # <root>/.locks/<stage>-<key>.lock: one build per output at a time (local stores)
WRITER_PREFIX = "w-"  # <root>/<stage>/<key>/w-<id>/: one writer's files on a non-local store
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
    uri: str  # the directory holding the output's files, as an fsspec URL
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
    # The folder beside manifest.json that holds the files (non-local stores: one per writer, so that racing writers
    # never mix files). None, and absent from the JSON: the files sit beside the manifest (local stores, and every
    # output published before the field existed).
    files_prefix: str | None = None

    @field_validator("files_prefix")
    @classmethod
    def _one_folder_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or "\\" in value or value in {".", ".."}):
            raise ValueError(f"files_prefix {value!r} is not one folder name")
        return value

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude=None if self.files_prefix else {"files_prefix"})


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
        """Where (stage, key)'s manifest.json lives (and, unless the manifest names a files_prefix, its files)."""
        return f"{self.root}/{stage}/{key}"

    def output_uri(self, stage: str, key: str) -> str:
        return f"{self.url}/{stage}/{key}"

    def _manifest_path(self, stage: str, key: str) -> str:
        return f"{self.output_path(stage, key)}/{MANIFEST_NAME}"

    def _files_path(self, stage: str, key: str, manifest: Manifest) -> str:
        """The folder holding the files that (stage, key)'s `manifest` lists, as a path of this store's filesystem."""
        base = self.output_path(stage, key)
        return f"{base}/{manifest.files_prefix}" if manifest.files_prefix else base

    def _ref(self, stage: str, key: str, manifest: Manifest) -> ArtifactRef:
        base = self.output_uri(stage, key)
        uri = f"{base}/{manifest.files_prefix}" if manifest.files_prefix else base
        return ArtifactRef(stage=stage, key=key, digest=manifest.digest, uri=uri)

    # --- lookup -----------------------------------------------------------------------------------------------
    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The published output for (stage, key), or None when there is none."""
        manifest = self._read_manifest(stage, key)
        return None if manifest is None else self._ref(stage, key, manifest)

    def manifest(self, ref: ArtifactRef) -> Manifest:
        manifest = self._read_manifest(ref.stage, ref.key)
        if manifest is None:
            raise IntegrityError(
                f"{self._manifest_path(ref.stage, ref.key)} is missing: the output was never published or was deleted"
            )
        return manifest

    def _read_manifest(self, stage: str, key: str) -> Manifest | None:
        # One read, no existence check first: a remote filesystem's listing cache could answer for a stale listing.
        manifest_path = self._manifest_path(stage, key)
        try:
            data = self.fs.cat_file(manifest_path)
        except FileNotFoundError:
            return None
        try:
            return Manifest.model_validate_json(data)
        except ValueError as error:
            raise IntegrityError(
                f"{manifest_path} is not a valid kiln manifest ({error.__class__.__name__}); "
                f"delete its directory so the stage is recomputed"
            ) from None

    # --- writing ----------------------------------------------------------------------------------------------
    @contextmanager
    def building(self, stage: str, key: str) -> Iterator[None]:
        """Held while `stage`/`key` is built, so that concurrent runs with the same inputs build it once: the
        second waits, then finds the first one's output. An flock: beside a local store, for all its users; for a
        remote store, in this host's scratch area, so runs on one host never share a half-written checkpoint there.
        Runs on different hosts both build a remote output: the first manifest published wins and the other run's
        files are discarded (see `publish`)."""
        lock_dir = Path(self.root if self.is_local else self._host_scratch_base(), LOCKS_DIR)
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
        """Checksum every file in `built_dir`, write manifest.json and publish the output atomically.

        If another writer published the same key first, its output wins, ours is discarded, and its ref is returned.
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
            files_prefix=None if self.is_local else f"{WRITER_PREFIX}{uuid.uuid4().hex[:16]}",
        )
        if not self.is_local:
            return self._publish_remote(built_dir, manifest)
        (built_dir / MANIFEST_NAME).write_text(manifest.to_json())
        self._rename_into_place(built_dir, Path(self.output_path(stage, key)))
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

    def _publish_remote(self, built_dir: Path, manifest: Manifest) -> ArtifactRef:
        """Upload the files under this writer's own folder, then publish the manifest naming it, create-only."""
        stage, key = manifest.stage, manifest.key
        existing = self.lookup(stage, key)
        if existing is not None:  # published while we built: keep it and upload nothing
            return existing
        files_path = self._files_path(stage, key, manifest)
        try:
            self._upload(built_dir, files_path, manifest.files)
        except BaseException:
            self._remove_quietly(files_path)
            raise
        try:
            self._create_only(self._manifest_path(stage, key), manifest.to_json().encode())
        except FileExistsError:
            pass  # another writer's manifest is there: read back which one below
        published = self._read_manifest(stage, key)
        if published is None:
            raise IntegrityError(
                f"{self._manifest_path(stage, key)} vanished right after it was published (another run set it "
                f"aside?); run the pipeline again"
            )
        if published.files_prefix != manifest.files_prefix:
            LOGGER.info(f"{stage}: another run published this output first; reusing it and discarding this copy")
            self._remove_quietly(files_path)
        return self._ref(stage, key, published)

    def _upload(self, built_dir: Path, files_path: str, files: list[FileEntry]) -> None:
        remote = [f"{files_path}/{entry.path}" for entry in files]
        for parent in sorted({path.rsplit("/", 1)[0] for path in remote}):
            self.fs.makedirs(parent, exist_ok=True)
        if files:
            self.fs.put([str(built_dir / entry.path) for entry in files], remote)

    def _create_only(self, path: str, data: bytes) -> None:
        """Write `path` only if it does not exist yet; FileExistsError if it does.

        Atomic where the filesystem implements fsspec's exclusive write (s3fs sends `If-None-Match: *`); other
        filesystems get fsspec's check-then-write, which `_publish_remote` backs by reading the manifest back.
        """
        self.fs.pipe_file(path, data, mode="create")

    def _remove_quietly(self, path: str) -> None:
        """Delete a folder of one writer (a losing or failed upload): best effort, as nothing reads it."""
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except OSError as error:
            LOGGER.warning(f"could not delete {path} ({error}); nothing reads it, delete it by hand to save space")

    def scratch_dir(self, stage: str, key: str) -> Path:
        """A local directory that survives a crash (e.g. training checkpoints), for resuming the same output."""
        base = Path(self.root) if self.is_local else self._host_scratch_base()
        path = base / ".scratch" / stage / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _host_scratch_base(self) -> Path:
        """This host's local area for a remote store: one per store URL, so two stores never share a lock."""
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / "kiln-scratch" / digest

    def verify(self, ref: ArtifactRef) -> None:
        """Check every file of a stored output against its manifest; IntegrityError naming the first bad file."""
        manifest = self.manifest(ref)
        files_path = self._files_path(ref.stage, ref.key, manifest)
        if self.is_local:
            verify_files(Path(files_path), manifest.files)
            return
        for entry in manifest.files:
            try:
                with self.fs.open(f"{files_path}/{entry.path}", "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
            except FileNotFoundError:
                digest = "missing"
            if digest != entry.sha256:
                where = self._ref(ref.stage, ref.key, manifest).uri
                raise IntegrityError(
                    f"{where}/{entry.path} is corrupted: sha256 {digest[:12]}… differs from the manifest's "
                    f"{entry.sha256[:12]}…; delete {self.output_uri(ref.stage, ref.key)} so the stage is recomputed"
                )

    def set_aside(self, ref: ArtifactRef) -> str:
        """Move a corrupt output out of the way (manifest first, so no reader trusts it meanwhile); returns where."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        destination = f"{self.root}/{CORRUPT_DIR}/{ref.stage}-{ref.key}-{stamp}"
        source = self.output_path(ref.stage, ref.key)
        if self.is_local:
            Path(destination).parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, destination)  # one rename: the manifest leaves with the files
            return destination
        # Only the published manifest and the files it lists move: another writer may be uploading beside them.
        manifest_path = self._manifest_path(ref.stage, ref.key)
        manifest = self._read_manifest(ref.stage, ref.key)
        if manifest is None or self._ref(ref.stage, ref.key, manifest).uri != ref.uri:
            return f"{self.url}/{CORRUPT_DIR}"  # another run set it aside first (and may have published a new one)
        self.fs.makedirs(destination, exist_ok=True)
        try:
            self.fs.mv(manifest_path, f"{destination}/{MANIFEST_NAME}")
        except FileNotFoundError:
            return f"{self.url}/{CORRUPT_DIR}"  # the same, a moment later
        files_path = self._files_path(ref.stage, ref.key, manifest)
        for entry in manifest.files:
            try:
                self.fs.mv(f"{files_path}/{entry.path}", f"{destination}/{entry.path}")
            except FileNotFoundError:
                continue  # the corruption may be a missing file
        if manifest.files_prefix:
            self._remove_quietly(files_path)  # anything left in this writer's folder belonged to that output
        return f"{self.url}/{CORRUPT_DIR}/{destination.rsplit('/', 1)[-1]}"

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
        files_path = self._files_path(ref.stage, ref.key, manifest)
        if self.is_local:
            local = Path(files_path)
        else:
            local = (cache_dir or Path(tempfile.gettempdir()) / "kiln-cache") / ref.stage / ref.key
            targets = [local / entry.path for entry in manifest.files]
            for parent in {target.parent for target in targets}:
                parent.mkdir(parents=True, exist_ok=True)
            if targets:
                self.fs.get([f"{files_path}/{entry.path}" for entry in manifest.files], [str(t) for t in targets])
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
