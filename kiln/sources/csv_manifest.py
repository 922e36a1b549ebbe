"""A CSV manifest as a dataset: one row per image, `path,label[,split]`, for images that are not laid out in class
folders (exports from labelling tools, images shared between tasks, a subset of a large bucket).

    path,label,split
    photos/0001.jpg,cat,train
    /data/shared/0002.png,dog,test

- `path`: relative to the CSV file's folder, or absolute. A file that is missing or does not decode is left out and
  listed in skipped.csv as unreadable (the validate stage quarantines or fails on those, by validate.on_bad_sample).
- `label`: the class name. With `data.classes` set, every label must be one of them (and the class order is that
  list's); otherwise the classes are the sorted distinct labels.
- `split` (optional): train or test; without the column, the split is stratified by data.test_fraction.
Other columns are ignored. Every structural problem (missing columns, empty labels, unknown labels or splits, one
path given two labels) is one DataError naming the rows and the fix, before any image is decoded.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from kiln.config import DataConfig
from kiln.dataset import SPLITS, UNREADABLE, ImageDataset, stratified_indices
from kiln.decoding import decode_images
from kiln.errors import DataError
from kiln.progress import ProgressCallback, ignore_progress
from kiln.sources import SourceData

REQUIRED_COLUMNS = ("path", "label")
_EXAMPLE_ROWS = 5  # offending rows named in an error


def is_csv_manifest(uri: str) -> bool:
    return uri.lower().endswith(".csv")


def load_csv_manifest(config: DataConfig, manifest: Path, on_progress: ProgressCallback = ignore_progress) -> SourceData:
    """Read the images `manifest` lists; see the module docstring. Raises DataError."""
    from kiln.sources.imagefolder import stack_uniform  # imported here: imagefolder dispatches to this module

    rows = read_manifest(manifest, config.classes)
    classes = list(config.classes) if config.classes else sorted(rows["label"].unique())
    files = [_resolve(manifest, path) for path in rows["path"]]
    decoded = decode_images(((str(path), path) for path in files), len(files), config.image_size, on_progress)
    usable, skipped = [], []
    for index, (path, source) in enumerate(zip(files, rows["path"])):
        result = decoded[str(path)] if path.is_file() else "file not found"
        if isinstance(result, str):
            skipped.append({"source": source, "reason": result, "kind": UNREADABLE})
        else:
            usable.append(index)
    if not usable:
        raise DataError(f"none of the {len(rows)} images listed in {manifest} could be read (e.g. "
                        f"{skipped[0]['source']}: {skipped[0]['reason']}); check the paths in its path column")  # fmt: skip
    kept = rows.iloc[usable].reset_index(drop=True)
    _check_every_class_has_images(kept, classes, manifest)
    images = stack_uniform([(source, decoded[str(files[index])]) for index, source in zip(usable, kept["path"])])
    label_of = {name: label for label, name in enumerate(classes)}
    labels = kept["label"].map(label_of).to_numpy(dtype=np.int64)
    if "split" in kept:
        train_index = np.flatnonzero(kept["split"].to_numpy() == "train")
        test_index = np.flatnonzero(kept["split"].to_numpy() == "test")
    else:
        train_index, test_index = stratified_indices(labels, config.test_fraction, config.seed)
    dataset = ImageDataset.from_indices(manifest.stem, classes, images, labels, kept["path"].to_numpy(), train_index,
                                        test_index)  # fmt: skip
    return SourceData(dataset, skipped)


def read_manifest(manifest: Path, classes: list[str] | None = None) -> pd.DataFrame:
    """The manifest's rows (path, label[, split]) as text, checked; raises DataError naming what is wrong."""
    try:
        rows = pd.read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(
            f"{manifest} is not a readable CSV manifest ({error.__class__.__name__}: {str(error).strip()}); it needs "
            f"a header row path,label[,split] and one row per image"
        ) from None
    rows.columns = [str(column).strip().lower() for column in rows.columns]
    missing = [column for column in REQUIRED_COLUMNS if column not in rows.columns]
    if missing:
        raise DataError(
            f"{manifest} lacks the column(s) {', '.join(missing)}; a CSV manifest needs a header row with path and "
            f"label (and optionally split), found: {', '.join(rows.columns) or 'no columns'}"
        )
    if rows.empty:
        raise DataError(f"{manifest} lists no images; add one row per image (path,label[,split])")
    rows = rows[[column for column in ("path", "label", "split") if column in rows.columns]].apply(
        lambda column: column.str.strip()
    )
    _refuse_rows(rows, rows["path"] == "", manifest, "have an empty path", "fill in each image's path")
    _refuse_rows(rows, rows["label"] == "", manifest, "have an empty label", "label every image or remove the row")
    if classes:
        _refuse_rows(rows, ~rows["label"].isin(classes), manifest, f"have labels outside data.classes "
                     f"({', '.join(classes)})", "fix those labels, or add the classes to data.classes")  # fmt: skip
    if "split" in rows:
        rows["split"] = rows["split"].str.lower()
        _refuse_rows(rows, ~rows["split"].isin(SPLITS), manifest, "have a split other than train or test",
                     "use train or test, or drop the split column to split by data.test_fraction")  # fmt: skip
    labels_per_path = rows.groupby("path")["label"].nunique()
    conflicting = rows["path"].isin(labels_per_path[labels_per_path > 1].index)
    _refuse_rows(rows, conflicting, manifest, "give one image two different labels", "keep one label per path")
    if rows["label"].nunique() < 2 and not classes:
        raise DataError(
            f"{manifest} has one label ({rows['label'].iloc[0]}); a classifier needs at least two classes"
        )
    return rows.reset_index(drop=True)


def _refuse_rows(rows: pd.DataFrame, bad: pd.Series, manifest: Path, problem: str, fix: str) -> None:
    if not bad.any():
        return
    # Line numbers as in an editor: the header is line 1.
    examples = [f"line {index + 2}: {row.path},{row.label}" for index, row in rows[bad].head(_EXAMPLE_ROWS).iterrows()]
    raise DataError(f"{int(bad.sum())} rows of {manifest} {problem} ({'; '.join(examples)}); {fix}")


def _resolve(manifest: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else manifest.parent / candidate


def _check_every_class_has_images(kept: pd.DataFrame, classes: list[str], manifest: Path) -> None:
    splits = SPLITS if "split" in kept else ("train",)  # without a split column, test is drawn from the same rows
    for split in splits:
        rows = kept[kept["split"] == split] if "split" in kept else kept
        empty = [name for name in classes if not (rows["label"] == name).any()]
        if empty:
            where = f" in the {split} split" if "split" in kept else ""
            raise DataError(
                f"{manifest} has no readable images of class(es) {', '.join(empty)}{where}; every class needs images "
                f"in both splits: add readable images of them (or drop them from data.classes, if you set it)"
            )


def manifest_fingerprint(manifest: Path) -> str:
    """The CSV's bytes and every listed file's size and mtime, so edited images make a new download key."""
    import hashlib

    digest = hashlib.sha256(manifest.read_bytes())
    try:
        paths = read_manifest(manifest)["path"]
    except DataError:
        return digest.hexdigest()  # loading reports the problem; the key must still be computable
    for path in paths:
        resolved = _resolve(manifest, path)
        try:
            info = resolved.stat()
            digest.update(f"{path}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\tmissing\n".encode())
    return digest.hexdigest()
