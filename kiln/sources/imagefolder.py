"""The imagefolder source: a local folder, a local archive or an http(s) URL of one, laid out as class folders.

A `.csv` data.uri is a manifest listing images and labels instead (kiln/sources/csv_manifest.py).

Layouts (hidden entries and `__MACOSX` are ignored; everything may be wrapped in one top-level folder):
    train/<class>/...  +  test/<class>/...   (also training; testing, validation, val, valid)
    <class>/...                               split stratified by data.test_fraction and data.seed
Class folders may nest files at any depth. Files Pillow cannot decode fully are skipped and listed with the reason.
Archives are read in memory (see kiln.sources.archives), so the layout is worked out from a listing of paths.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np

from kiln.config import DataConfig
from kiln.dataset import UNREADABLE, ImageDataset, stratified_indices
from kiln.errors import DataError
from kiln.sources import SourceData
from kiln.sources.archives import ARCHIVE_HINT, open_archive
from kiln.sources.csv_manifest import is_csv_manifest, load_csv_manifest
from kiln.sources.http import fetch, is_url
from kiln.decoding import decode_images
from kiln.progress import ProgressCallback, ignore_progress
from kiln.runtime.images import to_channels

TRAIN_FOLDER_NAMES = ("train", "training")
TEST_FOLDER_NAMES = ("test", "testing", "validation", "val", "valid")  # the first one present is used
_UNSPLIT = "unsplit"  # a layout with no test folder: train and test are drawn from it by a stratified split

ReadFiles = Callable[[Iterable[str]], Iterator[tuple[str, Path | bytes]]]  # names -> (name, path or bytes)


@dataclass(frozen=True)
class _Listing:
    """What a source holds, as relative posix paths (hidden entries included)."""

    files: list[str]  # sorted
    folders: set[str]  # including folders only implied by a file's path


@dataclass(frozen=True)
class _Layout:
    root: str  # the dataset root inside the listing: "" or the one wrapping folder
    groups: dict[str, str]  # "train"/"test" or _UNSPLIT -> its folder, relative to the listing


@dataclass(frozen=True)
class _ImageFile:
    group: str
    class_name: str
    class_folder: str  # relative to the listing
    path: str  # relative to the listing: how the source is read
    source: str  # relative to the dataset root: what samples.csv and skipped.csv show


def load_imagefolder(config: DataConfig, on_progress: ProgressCallback = ignore_progress) -> SourceData:
    """Read `config.uri` (folder, archive, URL of an archive, or a CSV manifest) as a labelled image set.

    Raises DataError for a missing path, an unsafe or unreadable archive, no or only one class, a class folder
    without usable images, and mixed image sizes when data.image_size is not set; DownloadError for transient
    network failures.
    """
    uri = config.uri
    if not uri:
        raise DataError("data.uri is not set; pass --set data.uri=PATH_OR_URL (a folder, archive or http(s) URL)")
    with tempfile.TemporaryDirectory(prefix="kiln-imagefolder-") as scratch:
        if is_url(uri):
            download = Path(scratch, "download")
            archive = fetch(
                uri, download, timeout_s=config.timeout_s, max_bytes=config.max_archive_bytes, on_progress=on_progress
            )
        else:
            archive = local_path(uri)
            if not archive.exists():
                raise DataError(
                    f"data.uri {uri} does not exist; pass an existing folder, {ARCHIVE_HINT}, CSV manifest or URL"
                )
            if is_csv_manifest(uri) and archive.is_file():
                return load_csv_manifest(config, archive, on_progress)
            if archive.is_dir():
                return _read_images(_folder_listing(archive), _folder_reader(archive), config, uri, [], on_progress)
        with open_archive(archive, config.max_archive_bytes) as contents:
            listing = _Listing(sorted(member.name for member in contents.files), contents.folders)
            return _read_images(listing, contents.read, config, uri, contents.skipped, on_progress)


def local_path(uri: str) -> Path:
    """data.uri as a local path (`file://` URLs included)."""
    parts = urlsplit(uri)
    return Path(parts.path if parts.scheme == "file" else uri).expanduser()


def dataset_name(uri: str) -> str:
    """A readable name: the folder's or archive's name without its extensions."""
    name = PurePosixPath(urlsplit(uri).path).name if is_url(uri) else local_path(uri).name
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name or "imagefolder"


def folder_files(folder: Path) -> list[str]:
    """Every file below `folder` as a sorted relative posix path (following symlinked folders)."""
    return _folder_listing(folder).files


def _folder_listing(folder: Path) -> _Listing:
    files, folders = [], set()
    for directory, subdirectories, names in os.walk(folder, followlinks=True):
        relative = Path(directory).relative_to(folder).as_posix()
        prefix = "" if relative == "." else relative + "/"
        folders.update(prefix + name for name in subdirectories)
        files.extend(prefix + name for name in names)
    return _Listing(sorted(files), folders)


def _folder_reader(folder: Path) -> ReadFiles:
    # Paths, not bytes: the decoders open the files themselves (in parallel worker processes for large sets).
    return lambda names: ((name, folder / name) for name in names)


def _read_images(
    listing: _Listing, read: ReadFiles, config: DataConfig, uri: str, skipped: list[dict[str, str]],
    on_progress: ProgressCallback,
) -> SourceData:  # fmt: skip
    layout = _find_layout(listing)
    skipped = skipped + _unused_entries(listing, layout)
    files = _image_files(listing, layout, skipped)
    classes = sorted({file.class_name for file in files})
    if len(classes) < 2:
        raise DataError(
            f"{uri} has {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a classifier needs at least "
            f"two: put images in one folder per class (<class>/*.jpg), optionally under train/ and test/"
        )
    _check_no_empty_class_folder(listing, layout, files, uri)
    decoded = decode_images(read(file.path for file in files), len(files), config.image_size, on_progress)
    usable = _keep_usable(files, decoded, skipped, uri)
    images = stack_uniform([(file.source, pixels) for file, pixels in usable])
    label_of = {class_name: label for label, class_name in enumerate(classes)}
    labels = np.array([label_of[file.class_name] for file, _ in usable], dtype=np.int64)
    sources = np.array([file.source for file, _ in usable])
    if _UNSPLIT in layout.groups:
        train_index, test_index = stratified_indices(labels, config.test_fraction, config.seed)
    else:
        group_of = np.array([file.group for file, _ in usable])
        train_index, test_index = np.flatnonzero(group_of == "train"), np.flatnonzero(group_of == "test")
    dataset = ImageDataset.from_indices(dataset_name(uri), classes, images, labels, sources, train_index, test_index)
    return SourceData(dataset, skipped)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # hidden entries and macOS resource forks


def _children(listing: _Listing, folder: str) -> tuple[list[str], list[str]]:
    """The visible (folder names, file names) directly inside `folder` ("" for the top), sorted."""
    prefix = folder + "/" if folder else ""

    def direct(paths: Iterable[str]) -> list[str]:
        names = (path[len(prefix) :] for path in paths if path.startswith(prefix))
        return sorted(name for name in names if "/" not in name and not _ignored(name))

    return direct(listing.folders), direct(listing.files)


def _find_layout(listing: _Listing) -> _Layout:
    folders, files = _children(listing, "")
    root = ""
    # Archives often wrap everything in one folder; unwrap it unless it is itself a class folder of images.
    if len(folders) == 1 and not files and _children(listing, folders[0])[0]:
        root = folders[0]
    by_name = {name.lower(): posixpath.join(root, name) for name in _children(listing, root)[0]}
    train = next((by_name[name] for name in TRAIN_FOLDER_NAMES if name in by_name), None)
    test = next((by_name[name] for name in TEST_FOLDER_NAMES if name in by_name), None)
    if train is None:
        return _Layout(root, {_UNSPLIT: root})
    return _Layout(root, {"train": train, "test": test} if test is not None else {_UNSPLIT: train})


def _unused_entries(listing: _Listing, layout: _Layout) -> list[dict[str, str]]:
    """Entries beside the split folders, which are not read (e.g. val/ when test/ is used, a README)."""
    if list(layout.groups.values()) == [layout.root]:
        return []
    folders, files = _children(listing, layout.root)
    used = {posixpath.basename(folder) for folder in layout.groups.values()}
    reason = "not used: only the train and test folders are read"
    return [{"source": name, "reason": reason} for name in folders + files if name not in used]


def _image_files(listing: _Listing, layout: _Layout, skipped: list[dict[str, str]]) -> list[_ImageFile]:
    """Every visible file inside a class folder, in sorted order; loose files are recorded in `skipped`."""
    files = []
    for group, folder in layout.groups.items():
        prefix = folder + "/" if folder else ""
        for path in listing.files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if any(_ignored(part) for part in parts):
                continue
            source = posixpath.relpath(path, layout.root) if layout.root else path
            if len(parts) == 1:
                skipped.append({"source": source, "reason": "not inside a class folder"})
                continue
            files.append(_ImageFile(group, parts[0], prefix + parts[0], path, source))
    return files


def _check_no_empty_class_folder(listing: _Listing, layout: _Layout, files: list[_ImageFile], uri: str) -> None:
    filled = {file.class_folder for file in files}
    for folder in layout.groups.values():
        for name in _children(listing, folder)[0]:
            class_folder = posixpath.join(folder, name)
            if class_folder not in filled:
                raise DataError(f"class folder {class_folder!r} in {uri} is empty; remove it or add images")


def _keep_usable(
    files: list[_ImageFile], decoded: dict[str, np.ndarray | str], skipped: list[dict[str, str]], uri: str
) -> list[tuple[_ImageFile, np.ndarray]]:
    """(file, pixels) for the files that decoded, in order; the others go to `skipped`."""
    usable, usable_folders, failure_in = [], set(), {}
    for file in files:
        result = decoded[file.path]
        if isinstance(result, str):
            skipped.append({"source": file.source, "reason": result, "kind": UNREADABLE})
            failure_in.setdefault(file.class_folder, f"{file.source}: {result}")
        else:
            usable.append((file, result))
            usable_folders.add(file.class_folder)
    for folder, example in failure_in.items():
        if folder not in usable_folders:
            raise DataError(
                f"class folder {folder!r} in {uri} has no usable images (e.g. {example}); remove it or add images"
            )
    return usable


def stack_uniform(usable: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """(source, pixels) pairs stacked to uint8 [N, H, W, C]: one channel if every image is grayscale, else three.
    DataError naming two examples when the sizes differ."""
    first_of_size: dict[tuple[int, ...], str] = {}
    for source, pixels in usable:
        first_of_size.setdefault(pixels.shape[:2], source)
    if len(first_of_size) > 1:
        (size_a, source_a), (size_b, source_b) = list(first_of_size.items())[:2]
        raise DataError(
            f"images have different sizes, e.g. {source_a} is {size_a[1]}x{size_a[0]} and {source_b} is "
            f"{size_b[1]}x{size_b[0]} (width x height); pass --set data.image_size=N to resize all to NxN"
        )
    channels = max(pixels.shape[2] for _, pixels in usable)
    return np.stack([to_channels(pixels, channels) for _, pixels in usable])
