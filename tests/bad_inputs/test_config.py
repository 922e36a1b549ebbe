"""Bad configuration: each case is one ConfigError naming the key, the bad value and what is accepted, raised before
anything touches the store; through `kiln run` it is a short message on stderr and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import load_config
from kiln.errors import ConfigError
from tests.bad_inputs.conftest import fails_cleanly

TRAIN_KEYS = ("model, epochs, batch_size, optimizer, lr, weight_decay, momentum, muon_lr, muon_momentum, "
              "label_smoothing, validation_fraction, schedule, device, precision, num_workers, data_path, compile, "
              "compile_mode, ema_decay, warmup_fraction, initial_lr_fraction, final_lr_fraction, lookahead_steps, "
              "identity_init, bias_lr_scale, decay_biases, whiten_bias_epochs, whiten_bias_schedule, keep_hardest, "
              "cuda_graph, checkpoint_interval_s, devices, seed")
MISINDENTED_YAML = "train:\n  epochs: 3\n lr: 0.1\n"  # `lr` indented 1 space, `epochs` 2: a broken block
KILN_COMMAND = Path(sys.executable).with_name("kiln")  # the console script, as users run it


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    """Where the config under test points the store; a ConfigError must leave it uncreated."""
    return tmp_path / "store"


def config_fails(store_root: Path, expected_message: str, *, profile="quickstart", config_file=None, overrides=()):
    """load_config raises a ConfigError worded exactly `expected_message`, before anything creates the store."""
    with fails_cleanly(store_root, ConfigError) as raised:
        load_config(profile, config_file, [*overrides, f"store.root={store_root}"])
    assert str(raised.value) == expected_message
    assert not store_root.exists()


def test_bad_yaml_syntax_in_the_config_file(store_root, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(MISINDENTED_YAML)
    config_fails(
        store_root,
        f"config file {config_file} is not valid YAML at line 3, column 2: expected <block end>, but found "
        "'<block mapping start>'; fix the syntax",
        profile=None, config_file=config_file,
    )  # fmt: skip


def test_unknown_key(store_root):
    config_fails(
        store_root,
        f"invalid configuration:\n  train.epoch: unknown key; valid keys here: {TRAIN_KEYS}",
        overrides=["train.epoch=3"],
    )


def test_negative_epochs(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  train.epochs: Input should be greater than or equal to 1 (got '-1')",
        overrides=["train.epochs=-1"],
    )


def test_learning_rate_nan(store_root, tmp_path):
    config_fails(
        store_root,
        "invalid configuration:\n  train.lr: Value error, must be a finite number, e.g. 0.001 (got 'NaN')",
        overrides=["train.lr=NaN"],
    )
    config_file = tmp_path / "nan.yaml"
    config_file.write_text("train:\n  lr: .nan\n")  # YAML's own NaN arrives as a float, not as text
    config_fails(
        store_root, "invalid configuration:\n  train.lr: Value error, must be a finite number, e.g. 0.001 (got nan)",
        config_file=config_file,
    )  # fmt: skip


def test_a_whitening_schedule_without_its_epochs_or_of_an_unknown_kind(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  train.whiten_bias_schedule: Value error, shift_lr_to_zero schedules the whitening "
        "bias over train.whiten_bias_epochs, which is not set: add --set train.whiten_bias_epochs=3 (fastnet "
        "families only), or --set train.whiten_bias_schedule=base_lr (got 'shift_lr_to_zero')",
        overrides=["train.model=fastnet", "train.whiten_bias_schedule=shift_lr_to_zero"],
    )
    config_fails(
        store_root,
        "invalid configuration:\n  train.whiten_bias_schedule: Input should be 'base_lr' or 'shift_lr_to_zero' "
        "(got 'linear')",
        overrides=["train.model=fastnet", "train.whiten_bias_epochs=3", "train.whiten_bias_schedule=linear"],
    )


def test_muon_settings_out_of_range_or_on_the_wrong_model(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  train.muon_lr: Value error, must be a finite number, e.g. 0.001 (got 'inf')",
        overrides=["train.optimizer=muon", "train.model=fastnet", "train.muon_lr=inf"],
    )
    config_fails(
        store_root,
        "invalid configuration:\n  train.muon_momentum: Input should be less than 1 (got '1')",
        overrides=["train.optimizer=muon", "train.model=fastnet", "train.muon_momentum=1"],
    )
    config_fails(
        store_root,
        "invalid configuration:\n  train.optimizer: Value error, muon holds each convolution's filters at a fixed "
        "norm, which only models that normalize after every convolution tolerate (fastnet, fastnet_wide, "
        "fastnet_lean, resnet9), not simple_cnn: add --set train.optimizer=sgd (got 'muon')",
        overrides=["train.optimizer=muon"],
    )


def test_keep_hardest_must_be_a_share_strictly_between_0_and_1(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  train.keep_hardest: Input should be less than 1 (got '1')",
        overrides=["train.keep_hardest=1"],
    )
    config_fails(
        store_root,
        "invalid configuration:\n  train.keep_hardest: Input should be greater than 0 (got '0')",
        overrides=["train.keep_hardest=0"],
    )
    config_fails(
        store_root,
        "invalid configuration:\n  train.keep_hardest: Value error, must be a finite number, e.g. 0.001 (got 'nan')",
        overrides=["train.keep_hardest=nan"],
    )


def test_unknown_model(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  train.model: Input should be 'mlp', 'simple_cnn', 'lenet', 'resnet9', 'fastnet', "
        "'fastnet_wide' or 'fastnet_lean' (got 'vgg')",
        overrides=["train.model=vgg"],
    )


def test_unknown_profile(store_root):
    config_fails(
        store_root,
        "unknown profile 'nope'; choose one of: quickstart, cifar10, cifar10-fast, cifar10-long, mnist, imagefolder",
        profile="nope",
    )


def test_wrong_type(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  train.epochs: Input should be a valid integer, unable to parse string as an integer "
        "(got 'many')",
        overrides=["train.epochs=many"],
    )


def test_the_fast_profiles_settings_that_a_changed_model_or_data_cannot_keep(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  train.identity_init: Value error, applies to the fastnet, fastnet_wide and "
        "fastnet_lean models, not resnet9 (the cifar10-fast and cifar10-long profiles turn it on): add --set "
        "train.identity_init=false (got True)\n  train.whiten_bias_epochs: Value error, applies to the whitening "
        "layer of the fastnet, fastnet_wide and fastnet_lean models, not resnet9 (the cifar10-fast and cifar10-long "
        "profiles set it): add --set train.whiten_bias_epochs=null (got 3)",
        profile="cifar10-fast", overrides=["train.model=resnet9"],
    )  # fmt: skip
    config_fails(
        store_root,
        "train.identity_init is for natural images, not mnist: on a flat background it makes the weights blow up "
        "(kiln/models/fastnet.py); add --set train.identity_init=false",
        profile="cifar10-long", overrides=["data.source=mnist"],
    )  # fmt: skip
    config_fails(
        store_root,
        "invalid configuration:\n  train.lookahead_steps: Value error, and train.ema_decay both average the weights, "
        "so only one can be set (the cifar10-long profile uses lookahead): add --set "
        "train.lookahead_steps=null or --set train.ema_decay=null (got 5)",
        profile="cifar10-long", overrides=["train.ema_decay=0.99"],
    )  # fmt: skip


def test_a_compile_mode_without_compiling(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  train.compile_mode: Value error, reduce-overhead is how torch.compile compiles, "
        "but train.compile=off compiles nothing: add --set train.compile=on, or --set train.compile_mode=default "
        "(got 'reduce-overhead')",
        overrides=["train.compile=off", "train.compile_mode=reduce-overhead"],
    )


def test_an_alternating_flip_without_flips(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  augment.flip: Value error, alternate needs a policy that flips, not crop: set "
        "augment.policy=crop_flip (got 'alternate')",
        overrides=["augment.policy=crop", "augment.flip=alternate"],
    )  # fmt: skip


def test_cutout_placement_without_cutout(store_root):
    config_fails(
        store_root,
        "invalid configuration:\n  augment.cutout_inside: Value error, places Cutout's square, but augment.cutout is 0 "
        "(off): set augment.cutout to its side (got 'true')",
        overrides=["augment.cutout_inside=true"],
    )  # fmt: skip


# --- through the `kiln` command -----------------------------------------------------------------------------------
def kiln_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`kiln run ARGS` in a fresh folder with a private Prefect home, as a user would type it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return subprocess.run(
        [str(KILN_COMMAND), "run", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def assert_refused_before_running(result: subprocess.CompletedProcess[str], tmp_path: Path, store_root: Path) -> None:
    assert result.returncode == 2  # the CLI's status for a ConfigError (1 is for other kiln errors)
    assert "Traceback" not in result.stderr and result.stdout == ""
    written = {path.name for path in tmp_path.iterdir()} - {"run.yaml"}  # the test's own config file
    assert written == set()  # neither the configured store nor the default ./artifacts, nor a Prefect home


def test_cli_negative_epochs(tmp_path, store_root):
    result = kiln_run(
        tmp_path, "--profile", "quickstart", "--set", "train.epochs=-1", "--set", f"store.root={store_root}"
    )

    assert result.stderr.splitlines() == [
        "kiln: error: invalid configuration:",
        "  train.epochs: Input should be greater than or equal to 1 (got '-1')",
    ]
    assert_refused_before_running(result, tmp_path, store_root)


def test_cli_bad_yaml_syntax(tmp_path, store_root):
    (tmp_path / "run.yaml").write_text(MISINDENTED_YAML)

    result = kiln_run(tmp_path, "--config", "run.yaml", "--set", f"store.root={store_root}")

    assert result.stderr.splitlines() == [
        "kiln: error: config file run.yaml is not valid YAML at line 3, column 2: expected <block end>, but found "
        "'<block mapping start>'; fix the syntax"
    ]
    assert_refused_before_running(result, tmp_path, store_root)


def test_cli_unknown_profile(tmp_path, store_root):
    result = kiln_run(tmp_path, "--profile", "nope", "--set", f"store.root={store_root}")

    assert result.stderr.splitlines()[-1] == (
        "kiln run: error: argument --profile: invalid choice: 'nope' "
        "(choose from 'quickstart', 'cifar10', 'cifar10-fast', 'cifar10-long', 'mnist', 'imagefolder')"
    )  # argparse: the usage lines, then this one
    assert_refused_before_running(result, tmp_path, store_root)
