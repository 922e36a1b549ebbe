"""Starting the server: `kiln serve`, the bundle's own `python -m kiln_runtime.server`, and tampered bundles."""

from __future__ import annotations

import ast
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from kiln.bundle import load_bundle
from kiln.deploy_files import RUNTIME_DISTRIBUTIONS, RUNTIME_PACKAGE, SERVER_MODULE
from kiln.errors import BundleError, IntegrityError
from tests.serving.conftest import free_port, running_server, standalone_command

KILN = [sys.executable, "-m", "kiln.cli"]


def test_kiln_serve_uses_default_limits_that_stop_a_100_megapixel_image(bundle_dir: Path, tmp_path: Path):
    port = free_port()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((10_000, 10_000), np.uint8)).save(buffer, format="PNG", compress_level=9)

    with running_server([*KILN, "serve", str(bundle_dir), "--port", str(port)], tmp_path, port) as url:
        ok = httpx.post(f"{url}/v1/predict", json={"instances": [np.zeros((8, 8, 3), np.uint8).tolist()]})
        huge = httpx.post(f"{url}/v1/predict", files={"image": ("huge.png", buffer.getvalue(), "image/png")})

    assert ok.status_code == 200
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "image_too_large"


def test_kiln_serve_runs_the_fp32_variant_on_request(bundle_dir: Path, tmp_path: Path):
    port = free_port()
    command = [*KILN, "serve", str(bundle_dir), "--port", str(port), "--variant", "fp32"]
    with running_server(command, tmp_path, port) as url:
        metadata = httpx.get(f"{url}/v1/metadata").json()
        response = httpx.post(f"{url}/v1/predict", json={"instances": [np.zeros((8, 8, 3), np.uint8).tolist()]})
    assert metadata["variant"] == "fp32" and metadata["input"]["model_input"]["name"] == "input"
    assert response.status_code == 200


@pytest.fixture
def tampered_bundle(bundle_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / bundle_dir.name
    shutil.copytree(bundle_dir, copy)
    labels = copy / "labels.json"
    labels.write_text(labels.read_text().replace("class_0", "class_X"))
    return copy


@pytest.mark.parametrize("entry_point", ["kiln serve", "bundle runtime"])
def test_a_tampered_bundle_is_refused_at_start(tampered_bundle: Path, entry_point: str):
    if entry_point == "kiln serve":
        command, cwd = [*KILN, "serve", str(tampered_bundle), "--port", str(free_port())], None
    else:
        command, cwd = standalone_command(Path("."), free_port()), tampered_bundle
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(cwd or ""), "PATH": "/usr/bin:/bin"})  # fmt: skip

    assert result.returncode == 1
    assert "bundle verification failed" in result.stderr and "labels.json is corrupted" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_bundle_carries_its_runtime_with_pinned_requirements_and_a_dockerfile(bundle_dir: Path):
    runtime = bundle_dir / RUNTIME_PACKAGE
    copied = sorted(path.name for path in runtime.glob("*.py"))
    shipped = sorted(path.name for path in (Path(__file__).parents[2] / "kiln" / "runtime").glob("*.py"))
    assert copied == shipped and "server.py" in copied

    third_party = set()
    for source in runtime.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                third_party |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                third_party.add(node.module.split(".")[0])
    third_party -= set(sys.stdlib_module_names) | {"__future__"}
    import_names = {"numpy": "numpy", "pillow": "PIL", "onnxruntime": "onnxruntime", "fastapi": "fastapi",
                    "starlette": "starlette", "anyio": "anyio", "uvicorn": "uvicorn",
                    "python-multipart": "python_multipart"}  # fmt: skip
    # python-multipart is imported by Starlette's form parser rather than by the runtime itself.
    assert third_party | {"python_multipart"} == {import_names[name] for name in RUNTIME_DISTRIBUTIONS}

    pins = (bundle_dir / "requirements.txt").read_text().split()
    assert sorted(pin.split("==")[0] for pin in pins) == sorted(RUNTIME_DISTRIBUTIONS)
    dockerfile = (bundle_dir / "Dockerfile").read_text()
    assert f'CMD ["python", "-m", "{SERVER_MODULE}", "/bundle", "--host", "0.0.0.0"' in dockerfile
    assert "COPY requirements.txt" in dockerfile and "pip install --no-cache-dir -r requirements.txt" in dockerfile


def test_files_the_manifest_does_not_list_are_refused(bundle_dir: Path, tmp_path: Path):
    """A module dropped next to the runtime (e.g. a fastapi.py shadowing the real one) must not load."""
    copy = tmp_path / bundle_dir.name
    shutil.copytree(bundle_dir, copy)
    (copy / "fastapi.py").write_text("raise SystemExit('shadowed')\n")
    with pytest.raises(IntegrityError, match="files its manifest does not list: fastapi.py"):
        load_bundle(copy)
    (copy / "fastapi.py").unlink()
    (copy / "kiln_runtime" / "__pycache__").mkdir()
    (copy / "kiln_runtime" / "__pycache__" / "server.cpython-311.pyc").write_bytes(b"written by python itself")
    assert load_bundle(copy).version


@pytest.mark.parametrize("damage", ["drop sha256", "version not a string", "files not a list"])
def test_a_malformed_manifest_is_a_bundle_error_not_a_crash(bundle_dir: Path, tmp_path: Path, damage: str):
    copy = tmp_path / bundle_dir.name
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if damage == "drop sha256":
        del manifest["files"][0]["sha256"]
    elif damage == "version not a string":
        manifest["version"] = 3
    else:
        manifest["files"] = 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="malformed"):
        load_bundle(copy)
