"""What makes a bundle runnable on its own: the runtime package, pinned requirements and a Dockerfile.

The runtime (kiln/runtime/*.py) is copied verbatim as `kiln_runtime/`, so `python -m kiln_runtime.server .` inside a
bundle serves it with no kiln, torch or Prefect installed. The requirements pin the versions the bundle was built
and checked with.
"""

from __future__ import annotations

import platform
import shutil
from importlib import metadata
from pathlib import Path

import kiln.runtime

RUNTIME_PACKAGE = "kiln_runtime"
SERVER_MODULE = f"{RUNTIME_PACKAGE}.server"
SERVING_PORT = 8080
# The runtime's third-party imports, by distribution name (checked against its source by a test).
RUNTIME_DISTRIBUTIONS = (
    "numpy", "pillow", "onnxruntime", "fastapi", "starlette", "anyio", "uvicorn", "python-multipart",
)  # fmt: skip

DOCKERFILE = """\
# Serve this bundle over HTTP:
#   docker build -t {image} . && docker run --rm -p {port}:{port} {image}
#   curl -F image=@photo.jpg http://127.0.0.1:{port}/v1/predict
FROM python:{python}-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /bundle
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN useradd --system --uid 10001 kiln
USER kiln
EXPOSE {port}
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/healthz', timeout=4)"
# The server verifies every file of /bundle against manifest.json before it listens.
CMD ["python", "-m", "{server}", "/bundle", "--host", "0.0.0.0", "--port", "{port}"]
"""


def write_runtime(bundle_dir: Path, image_name: str) -> None:
    """Copy the runtime package into `bundle_dir` and write requirements.txt and a Dockerfile next to it."""
    runtime_dir = bundle_dir / RUNTIME_PACKAGE
    runtime_dir.mkdir()
    for source in sorted(Path(kiln.runtime.__file__).parent.glob("*.py")):
        shutil.copyfile(source, runtime_dir / source.name)
    pins = [f"{name}=={metadata.version(name)}" for name in RUNTIME_DISTRIBUTIONS]
    (bundle_dir / "requirements.txt").write_text("\n".join(pins) + "\n")
    python = ".".join(platform.python_version_tuple()[:2])
    dockerfile = DOCKERFILE.format(image=image_name, port=SERVING_PORT, python=python, server=SERVER_MODULE)
    (bundle_dir / "Dockerfile").write_text(dockerfile)
