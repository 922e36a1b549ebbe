import math

import pytest

from kiln.config import PROFILE_NAMES, PipelineConfig, load_config
from kiln.errors import ConfigError


@pytest.mark.parametrize("name", [name for name in PROFILE_NAMES if name != "imagefolder"])
def test_every_profile_loads_and_names_itself(name):
    config = load_config(name)
    assert config.profile == name
    assert config.data.source in ("digits", "cifar10", "mnist")


def test_quickstart_is_default_and_offline_digits():
    config = load_config()
    assert config.profile == "quickstart"
    assert config.data.source == "digits"
    assert config.evaluate.min_accuracy == 0.9


def test_imagefolder_profile_requires_a_uri():
    with pytest.raises(ConfigError, match="data.uri is required.*--set data.uri="):
        load_config("imagefolder")
    config = load_config("imagefolder", overrides=["data.uri=/tmp/pictures"])
    assert config.data.uri == "/tmp/pictures"


def test_overrides_are_typed_by_yaml():
    config = load_config(overrides=["train.epochs=3", "train.lr=0.01", "compress.per_channel=false", "data.image_size=null"])
    assert config.train.epochs == 3 and math.isclose(config.train.lr, 0.01)
    assert config.compress.per_channel is False and config.data.image_size is None


def test_file_then_overrides_win_over_profile(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("profile: mnist\ntrain:\n  epochs: 2\n  model: mlp\nvalidate:\n  mostly: 0.5\n")
    config = load_config(config_file=path, overrides=["train.epochs=7"])
    assert config.profile == "mnist" and config.data.source == "mnist"
    assert config.train.model == "mlp" and config.train.epochs == 7
    assert config.validation.mostly == 0.5


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as raised:
        load_config(overrides=["train.epoch=3"])
    message = str(raised.value)
    assert "train.epoch: unknown key" in message and "epochs" in message


def test_unknown_section():
    with pytest.raises(ConfigError, match="trian: unknown key; valid keys here: profile, data, validate"):
        load_config(overrides=["trian.epochs=3"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochs=-1", "train.epochs: Input should be greater than or equal to 1"),
        ("train.epochs=many", "train.epochs: Input should be a valid integer"),
        ("train.lr=.nan", "train.lr"),
        ("train.model=vgg99", "train.model: Input should be 'mlp', 'simple_cnn', 'lenet', 'resnet9', 'fastnet', "
                              "'fastnet_wide' or 'fastnet_lean'"),
        ("data.test_fraction=1.5", "data.test_fraction"),
        ("package.model_name=Bad Name!", "package.model_name"),
    ],
)
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as raised:
        load_config(overrides=[override])
    assert fragment in str(raised.value)


def test_malformed_set_and_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(overrides=["epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_config(config_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "absent.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(config_file=listing)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown profile 'cifar100'"):
        load_config("cifar100")


def test_config_round_trips_through_json_with_the_validate_alias():
    config = load_config(overrides=["validate.mostly=0.9"])
    dumped = config.model_dump(mode="json")
    assert "validate" in dumped and "validation" not in dumped
    assert PipelineConfig.model_validate(dumped) == config
    assert "validate" in PipelineConfig.model_json_schema()["properties"]


def test_the_registry_with_a_remote_store_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="registry needs a local store.root.*package.registry=false"):
        load_config("quickstart", None, ["store.root=memory://somewhere"])
    assert load_config("quickstart", None, ["store.root=memory://somewhere", "package.registry=false"])


def test_a_profile_that_extends_itself_is_refused(monkeypatch):
    from kiln import config as config_module

    monkeypatch.setattr(config_module, "PROFILE_NAMES", (*PROFILE_NAMES, "loop-a", "loop-b"))
    texts = {"loop-a": "extends: loop-b\n", "loop-b": "extends: loop-a\n"}

    class Profiles:
        def joinpath(self, name):
            return type("Text", (), {"read_text": lambda self: texts[name.removesuffix(".yaml")]})()

    monkeypatch.setattr(config_module.resources, "files", lambda package: Profiles())
    with pytest.raises(ConfigError, match="profile 'loop-b' extends 'loop-a', which extends it again"):
        config_module.profile_values("loop-a")
