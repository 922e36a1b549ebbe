"""Writing deployment bundles (pipeline side). Reading and running them is kiln.runtime.bundle, which bundles ship.

The layout is documented in kiln.runtime.bundle.
"""

from __future__ import annotations

import json
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiln.runtime.bundle import MANIFEST_FILE, SCHEMA_VERSION, Bundle, Prediction, load_bundle  # noqa: F401
from kiln.store import list_files


def write_bundle_manifest(bundle_dir: Path, model_name: str, version: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in `bundle_dir` into its manifest.json; returns the manifest."""
    files = [entry.model_dump() for entry in list_files(bundle_dir)]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model_name": model_name,
        "version": version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        **extra,
    }
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def archive_bundle(bundle_dir: Path, archive_path: Path) -> None:
    with tarfile.open(archive_path, "w:gz") as archive:
        archive.add(bundle_dir, arcname=bundle_dir.name)
