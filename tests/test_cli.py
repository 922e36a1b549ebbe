import json
import subprocess
import sys

import pytest

from kiln.cli import main


def run_kiln(*args):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_describes_every_command():
    top = run_kiln("--help")
    assert top.returncode == 0 and "run" in top.stdout and "predict" in top.stdout
    assert "--set SECTION.KEY=VALUE" in run_kiln("run", "--help").stdout
    assert "bundle folder or .tar.gz" in run_kiln("predict", "--help").stdout


def test_show_config_prints_the_resolved_profile(capsys):
    assert main(["run", "--profile", "mnist", "--set", "train.epochs=2", "--show-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["profile"] == "mnist" and config["train"]["epochs"] == 2 and "validate" in config


def test_bad_config_is_one_clear_error_and_exit_2():
    result = run_kiln("run", "--set", "train.epoch=3")
    assert result.returncode == 2
    assert "kiln: error: invalid configuration" in result.stderr and "train.epoch: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_with_a_missing_bundle_or_image(tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main(["predict", str(tmp_path / "nope"), str(image)]) == 1
    assert "bundle" in (err := capsys.readouterr().err) and "does not exist" in err
    assert main(["predict", str(tmp_path), str(tmp_path / "missing.png")]) == 1
    assert "image file(s) not found" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(image)]) == 1
    assert "not a kiln bundle" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run", "--profile", "nope"], ["frobnicate"], []])
def test_argparse_rejects_bad_usage(argv):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
