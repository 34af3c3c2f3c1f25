"""Strict config parsing: YAML, CLI overrides and dicts build the same dataclasses; bad input is one clear error."""

import pytest

from deltatune.config.loader import apply_override, config_to_dict, load_config, method_config, parse_config
from deltatune.config.schema import RunConfig
from deltatune.errors import UserError


def test_defaults_resolve_the_method_section():
    config = parse_config({})
    assert isinstance(config, RunConfig)
    assert config.method.name == "full"
    assert config_to_dict(config)["method"] == {"name": "full"}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  batch_size: 8\nmethod:\n  name: freeze\n  last_n_blocks: 2\n")
    config = load_config(path, ["train.lr=3e-5", "method.patterns=[bias]", "data.split.seed=7"])
    assert config.train.lr == pytest.approx(3e-5)  # "3e-5" is a string to YAML 1.1; the float field parses it
    assert config.train.batch_size == 8
    assert config.method.name == "freeze" and config.method.last_n_blocks == 2
    assert config.method.patterns == ["bias"]
    assert config.data.split.seed == 7


def test_override_switches_method_and_validates_its_fields(tmp_path):
    config = load_config(None, ["method.name=bitfit", "method.train_head=false"])
    assert config.method.name == "bitfit" and config.method.train_head is False
    with pytest.raises(UserError, match="unknown key 'last_n_blocks' in method.*valid keys: name, train_head"):
        load_config(None, ["method.name=bitfit", "method.last_n_blocks=2"])


def test_round_trip_through_dict():
    config = load_config(None, ["method.name=freeze", "method.last_n_blocks=1", "train.adam_betas=[0.9,0.95]"])
    again = parse_config(config_to_dict(config))
    assert again == config


def test_method_config_from_dict():
    cfg = method_config({"name": "freeze", "last_n_blocks": 3})
    assert cfg.last_n_blocks == 3 and type(cfg).__name__ == "FreezeConfig"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"trian": {}}, r"unknown key 'trian' at the top level \(did you mean 'train'\?\); valid keys: model, data"),
        ({"train": {"lr": "fast"}}, r"train.lr must be a number, got 'fast'; write e.g. train.lr=3e-5"),
        ({"train": {"batch_size": 2.5}}, r"train.batch_size must be a whole number"),
        ({"train": {"progress": "yes"}}, r"train.progress must be true or false"),
        ({"method": {"name": "lorra"}}, r"unknown method 'lorra' \(did you mean 'lora'\?\); valid: .*bitfit, .*full"),
        ({"data": {"split": {"tset": 0.1}}}, r"unknown key 'tset' in data.split \(did you mean 'test'\?\)"),
        ({"train": 3}, r"train must be a mapping"),
        ({"train": {"adam_betas": [0.9]}}, r"train.adam_betas must have 2 items"),
    ],
)
def test_bad_values_name_the_key_and_fix(raw, message):
    with pytest.raises(UserError, match=message):
        parse_config(raw)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found; give the path to a YAML file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=r"invalid YAML at line \d+, column \d+"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(listing)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="is not key=value"):
        apply_override({}, "train.lr")
    with pytest.raises(UserError, match="is a value, not a section"):
        apply_override({"train": 3}, "train.lr=1")
