"""The README's main command, as a user runs it: `kiln run` in a fresh folder, then `kiln predict` on its bundle."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import SHARED_CIFAR

KILN = [sys.executable, "-m", "kiln.cli"]


def fresh_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no server configured: kiln uses a temporary local one
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


@pytest.mark.slow
def test_kiln_run_quickstart_then_predict(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    env = fresh_env(tmp_path)
    run = subprocess.run([*KILN, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    bundle = re.search(r"^Bundle:\s+(\S+)$", run.stdout, re.MULTILINE).group(1)
    assert bundle.startswith(str(tmp_path / "artifacts" / "package"))
    digit = load_digits()
    image_path = tmp_path / "seven.png"
    Image.fromarray((digit.images[7] * 255 / 16).round().astype("uint8")).save(image_path)
    predict = subprocess.run([*KILN, "predict", bundle, str(image_path)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert predict.returncode == 0, predict.stderr
    path, label, probability = predict.stdout.strip().split("\t")
    assert label == str(digit.target[7]) and 0 < float(probability) <= 1


@pytest.mark.slow
@pytest.mark.shared_data
def test_imagefolder_cifar10_jpeg_one_epoch(tmp_path):
    """The done-when check for the real-data path, on a stratified 10% sample of the shared CIFAR-10 copy."""
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"{SHARED_CIFAR} is not present (only on development machines)")
    env = fresh_env(tmp_path)
    args = ["run", "--profile", "imagefolder", "--set", f"data.uri={SHARED_CIFAR}", "--set", "train.epochs=1",
            "--set", "data.max_train_samples=5000", "--set", "data.max_test_samples=1000",
            "--set", "train.model=simple_cnn", "--set", "train.lr=0.003", "--set", "train.optimizer=adamw"]  # fmt: skip
    run = subprocess.run([*KILN, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    archive = re.search(r"^Archive:\s+(\S+)$", run.stdout, re.MULTILINE).group(1)
    with tarfile.open(archive) as bundle:
        names = bundle.getnames()
    assert any(name.endswith("/model.onnx") for name in names)


@pytest.mark.slow
def test_a_bad_data_path_is_one_clear_error_without_tracebacks(tmp_path):
    env = fresh_env(tmp_path)
    missing = tmp_path / "no-such-photos"
    run = subprocess.run([*KILN, "run", "--profile", "imagefolder", "--set", f"data.uri={missing}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 1
    assert f"kiln: error: data.uri {missing} does not exist" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert not (tmp_path / "artifacts" / "download").exists() or not any((tmp_path / "artifacts" / "download").iterdir())
