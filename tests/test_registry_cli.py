"""`kiln registry list | show | promote | rollback`, called through an argparse parser as kiln.cli will."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.registry import ModelRegistry
from kiln.registry_cli import add_registry_parser, run_registry
from tests.kiln.test_registry import TinyBundles, tiny_bundles

MODEL = "kiln-classifier"


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> TinyBundles:
    return tiny_bundles(tmp_path_factory)


@pytest.fixture
def store_root(bundles, tmp_path) -> str:
    """A store whose registry holds v1 (production) and v2 (staging)."""
    registry = ModelRegistry(tmp_path / "store" / "registry")
    registry.register(MODEL, "v1", bundles.bundle_dir(bundles.good), {"metrics": {"test_accuracy": 1.0},
                                                                      "blessed": True, "dataset": {"digest": "abc"}})
    registry.register(MODEL, "v2", bundles.bundle_dir(bundles.bad), {"metrics": {"test_accuracy": 0.25},
                                                                     "blessed": True})  # fmt: skip
    registry.promote(MODEL, "v1", "first version")
    registry.set_alias(MODEL, "staging", "v2", "worse than production")
    return str(tmp_path / "store")


def kiln_registry(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser(prog="kiln")
    add_registry_parser(parser.add_subparsers(dest="command", required=True))
    assert run_registry(parser.parse_args(["registry", *argv])) == 0
    return capsys.readouterr().out


def test_list(capsys, store_root, tmp_path):
    lines = kiln_registry(capsys, "list", "--store", store_root).splitlines()
    assert lines[0].split() == ["model", "versions", "production", "staging"]
    assert lines[1].split() == [MODEL, "2", "v1", "v2"]
    listed = json.loads(kiln_registry(capsys, "list", "--store", store_root, "--json"))
    assert listed == [{"model": MODEL, "versions": 2, "aliases": {"production": "v1", "staging": "v2"}}]
    assert "no models registered" in kiln_registry(capsys, "list", "--store", str(tmp_path / "empty"))


def test_show_a_model_and_a_version(capsys, store_root):
    out = kiln_registry(capsys, "show", MODEL, "--store", store_root)
    rows = [line.split() for line in out.splitlines()[1:3]]
    assert [row[0] for row in rows] == ["v1", "v2"] and rows[0][2:] == ["1.0000", "True", "production"]
    assert "production: none -> v1  by kiln: first version" in out

    out = kiln_registry(capsys, "show", MODEL, "production", "--store", store_root)
    assert "version:        v1" in out and "dataset digest: abc" in out
    assert f"registry/{MODEL}/versions/v1/bundle" in out

    shown = json.loads(kiln_registry(capsys, "show", MODEL, "staging", "--store", store_root, "--json"))
    assert shown["version"] == "v2" and shown["aliases"] == ["staging"] and shown["path"].endswith("v2/bundle")
    whole = json.loads(kiln_registry(capsys, "show", MODEL, "--store", store_root, "--json"))
    assert [entry["version"] for entry in whole["versions"]] == ["v1", "v2"] and len(whole["history"]) == 2


def test_promote_then_rollback(capsys, store_root):
    out = kiln_registry(capsys, "promote", MODEL, "v2", "--reason", "canary looked fine", "--store", store_root)
    assert f"{MODEL} production: v1 -> v2 (canary looked fine)" in out
    assert "nothing moved" in kiln_registry(capsys, "promote", MODEL, "v2", "--store", store_root)

    out = kiln_registry(capsys, "rollback", MODEL, "--store", store_root)
    assert f"{MODEL} production: v2 -> v1 (rolled back by hand)" in out
    registry = ModelRegistry(Path(store_root) / "registry")
    last = registry.history(MODEL)[-1]
    assert last["reason"] == "rolled back by hand" and last["actor"].startswith("kiln registry")

    kiln_registry(capsys, "promote", MODEL, "v1", "--alias", "staging", "--store", store_root)
    assert registry.aliases(MODEL) == {"production": "v1", "staging": "v1"}


def test_errors_say_what_exists(capsys, store_root):
    with pytest.raises(KilnError, match=r"no version or alias 'v9'; versions: v1, v2"):
        kiln_registry(capsys, "show", MODEL, "v9", "--store", store_root)
    with pytest.raises(KilnError, match=rf"no model 'nope'.*registered models: {MODEL}"):
        kiln_registry(capsys, "promote", "nope", "v1", "--store", store_root)
    with pytest.raises(KilnError, match="staging has no earlier version"):
        kiln_registry(capsys, "rollback", MODEL, "--alias", "staging", "--store", store_root)
    with pytest.raises(SystemExit):
        kiln_registry(capsys, "promote", MODEL, "v1", "--alias", "prod", "--store", store_root)
    assert "invalid choice: 'prod'" in capsys.readouterr().err


def test_the_registry_commands_import_neither_torch_nor_prefect():
    code = "import sys, kiln.registry_cli; print(sorted(n for n in ('torch', 'prefect') if n in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
