"""Strict config parsing: YAML, CLI overrides and dicts build the same dataclasses; bad input is one clear error."""

import pytest
import yaml

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


def test_binary_config_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x89PNG\xff\xfe")
    with pytest.raises(UserError, match=r"weights\.bin is not a text file \(byte 1 is not UTF-8\)"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=0", r"^train\.batch_size must be at least 1, got 0; write e\.g\. train\.batch_size=32$"),
        ("train.lr=0", r"^train\.lr must be above 0, got 0\.0"),
        ("train.lr=nan", r"^train\.lr must be a finite number, got nan"),
        ("train.adam_eps=-inf", r"^train\.adam_eps must be a finite number, got -inf"),
        ("train.warmup_ratio=1.5", r"^train\.warmup_ratio must be in \[0, 1\], got 1\.5"),
        ("train.early_stopping_patience=0", r"^train\.early_stopping_patience must be at least 1, got 0$"),
        ("train.dtype=float16", r"^unknown train\.dtype 'float16' \(did you mean 'fp16'\?\); valid: auto, fp32, bf16"),
        ("train.device=cuda:x", r"^unknown train\.device 'cuda:x'; valid: auto, cpu, cuda, cuda:N, mps$"),
        ("data.image_size=0", r"^data\.image_size must be at least 1, got 0$"),
    ],
)
def test_ranges_and_choices_are_checked_when_parsing(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["train.device=cuda:1", "train.device=cpu", "train.max_steps=null",
                                      "train.warmup_ratio=0", "train.warmup_ratio=1", "data.split.test=0"])
def test_values_at_the_edges_of_their_ranges_are_accepted(override):
    load_config(None, [override])


def test_every_numeric_and_choice_field_declares_its_rule():
    """New fields must say what range they accept, or the strict parser cannot refuse a nonsense value."""
    import dataclasses
    import typing

    from deltatune.config.schema import DataConfig, ModelConfig, SplitConfig, TrainConfig

    unruled = []
    for section in (ModelConfig, DataConfig, SplitConfig, TrainConfig):
        hints = typing.get_type_hints(section)
        for item in dataclasses.fields(section):
            text = str(hints[item.name])
            numeric = any(word in text for word in ("int", "float"))
            if numeric and "range" not in item.metadata:
                unruled.append(f"{section.__name__}.{item.name}")
    assert unruled == []
    for name in ("schedule", "dtype"):
        assert "choices" in {f.name: f for f in dataclasses.fields(TrainConfig)}[name].metadata


def test_any_config_dataclass_can_declare_rules():
    """The mechanism method configs get: metadata on their own fields, checked by the same walk."""
    import dataclasses

    from deltatune.config.constraints import above, at_least, check_config, one_of

    @dataclasses.dataclass
    class ToyMethodConfig:
        name: str = "toy"
        rank: int = dataclasses.field(default=8, metadata=at_least(1))
        dropout: float | None = dataclasses.field(default=None, metadata=above(0))
        init: str = dataclasses.field(default="gaussian", metadata=one_of("gaussian", "zeros"))
        scales: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0], metadata=above(0))
        free: float = 0.5

    check_config(ToyMethodConfig())
    for changes, message in [({"rank": 0}, r"method\.rank must be at least 1, got 0; write e\.g\. method\.rank=8$"),
                             ({"dropout": -0.1}, r"method\.dropout must be above 0, got -0\.1$"),
                             ({"init": "gauss"}, r"unknown method\.init 'gauss' \(did you mean 'gaussian'\?\)"),
                             ({"scales": [1.0, 0.0]}, r"method\.scales\[1\] must be above 0, got 0\.0"),
                             ({"free": float("nan")}, r"method\.free must be a finite number, got nan")]:
        with pytest.raises(UserError, match=message):
            check_config(dataclasses.replace(ToyMethodConfig(), **changes), "method")


def test_python_api_configs_are_checked_before_anything_runs(tmp_path):
    from deltatune.config.schema import TrainConfig
    from deltatune.runner import train

    config = RunConfig(train=TrainConfig(batch_size=0), output_dir=str(tmp_path / "runs"))
    with pytest.raises(UserError, match=r"train\.batch_size must be at least 1"):
        train(config)
    assert not (tmp_path / "runs").exists()


def test_dict_fields_keep_working():
    """Free-form mappings (`extra`, and column maps) are not walked by the rules: their keys are the user's."""
    config = parse_config({"extra": {"note": "baseline", "batch_size": 0, "nested": {"lr": -1}}})
    assert config.extra == {"note": "baseline", "batch_size": 0, "nested": {"lr": -1}}


def test_string_fields_keep_override_text_that_yaml_would_read_as_another_scalar() -> None:
    config = load_config(None, ["run_name=0123", "data.columns.label=on", "train.lr=1e-3", "train.progress=off"])
    assert config.run_name == "0123" and type(config.run_name) is str  # YAML 1.1 reads 0123 as octal 83
    assert config.data.columns["label"] == "on"  # a column called "on", not "True"
    assert config.train.lr == 1e-3 and config.train.progress is False  # other fields take the YAML value
    assert yaml.safe_dump(config_to_dict(config))  # the saved config holds plain strings
    with pytest.raises(UserError, match=r"data\.name must be a string, got nothing"):
        load_config(None, ["data.name="])
    nested = load_config(None, ["extra.notes.id=0123"])  # free-form: the YAML value, at every depth
    assert parse_config(config_to_dict(nested)).extra == {"notes": {"id": 83}}
