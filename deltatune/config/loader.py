"""Strict config parsing: YAML files, `key.sub=value` overrides and plain dicts all become the same dataclasses.

Strict means an unknown key, a wrong type or an unparsable value is a `UserError` that names the key, what was
expected and the valid keys, so a typo never silently falls back to a default. A value outside the range or the
choices its field declares (`deltatune.config.constraints`), or a nan/inf anywhere, is refused the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from deltatune.config.constraints import check_config
from deltatune.config.schema import MethodConfig, ObjectiveConfig, RunConfig
from deltatune.errors import UserError, closest_names
from deltatune.methods import get_method
from deltatune.objectives import OBJECTIVES


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or start from the defaults), apply CLI overrides, and parse strictly."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    for override in overrides or []:
        apply_override(raw, override)
    return parse_config(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path`; a UserError for a missing file, bad YAML or a non-mapping document."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; give the path to a YAML file (see examples/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not a text file (byte {error.start} is not UTF-8); "
                        f"give a YAML config file") from None
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror}); check the file's permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model:, data:, method:, train:)")
    return data


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` inside the nested dict `raw`; the value is read as YAML (numbers, lists, booleans)."""
    import yaml

    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {override!r} is not key=value; write e.g. train.lr=3e-5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, (bool, int, float)) and str(value) != text.strip():
        value = OverrideText(text.strip(), value)  # run_name=0123 is "0123" (YAML reads 83), train.lr=1e-3 is 0.001
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


class OverrideText(str):
    """An override's text whose YAML reading is another scalar (`0123` → 83, `1.10` → 1.1, `on` → true): a string
    field keeps the text as typed, any other field takes the YAML value."""

    def __new__(cls, text: str, parsed: bool | int | float) -> "OverrideText":
        made = super().__new__(cls, text)
        made.parsed = parsed
        return made

    def __getnewargs__(self) -> tuple[str, bool | int | float]:  # copy, deepcopy and pickle rebuild it whole
        return str(self), self.parsed


def _plain(value: Any, hint: Any) -> Any:
    """An OverrideText as the text for a string field, as its YAML value otherwise (left for a union to decide);
    inside a free-form value (hint Any: `extra`), every level is made plain."""
    if hint is Any:
        if isinstance(value, dict):
            return {key: _plain(item, Any) for key, item in value.items()}
        if isinstance(value, list):
            return [_plain(item, Any) for item in value]
    if not isinstance(value, OverrideText) or typing.get_origin(hint) in (typing.Union, types.UnionType):
        return value
    return str(value) if hint is str else value.parsed


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a nested dict, strictly."""
    raw = dict(raw)
    # Resolve the method section even when absent, so the saved config names the method's every option.
    raw.setdefault("method", {})
    raw.setdefault("objective", {})
    config = _build(RunConfig, raw, "")
    check_config(config)
    return config


def method_config(raw: dict[str, Any] | MethodConfig) -> MethodConfig:
    """A method's config object from a dict like {"name": "freeze", "last_n_blocks": 2}, or from a config object
    (built again, so a plain MethodConfig(name="lora") becomes the method's own class, checked like YAML)."""
    if isinstance(raw, MethodConfig):
        raw = config_to_dict(raw)
    config = _build_method(raw, "method")
    check_config(config, "method")
    return config


def objective_config(raw: dict[str, Any] | ObjectiveConfig) -> ObjectiveConfig:
    """An objective's config object from a dict like {"name": "dpo", "beta": 0.1}, or from a config object (built
    again: a plain ObjectiveConfig(name="dpo") becomes the objective's own class)."""
    if isinstance(raw, ObjectiveConfig):
        raw = config_to_dict(raw)
    config = _build_objective(raw, "objective")
    check_config(config, "objective")
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-ready dict (tuples become lists) of any config dataclass."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{path or 'config'} must be a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_replaced(cls, raw, path)
    _reject_unknown(raw, list(fields), path)
    values = {}
    for name, value in raw.items():
        key_path = f"{path}.{name}" if path else name
        hint = hints[name]
        if hint is MethodConfig:
            values[name] = _build_method(value, key_path)
        elif hint is ObjectiveConfig:
            values[name] = _build_objective(value, key_path)
        else:
            values[name] = _coerce(value, hint, key_path)
    return cls(**values)


def _build_method(raw: Any, path: str) -> MethodConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping with at least `name:`, got {raw!r}")
    name = raw.get("name", _method_chosen_by_keys(raw) or MethodConfig.name)
    method = get_method(str(name))
    return _build(method.config_class, raw, path)


def _method_chosen_by_keys(raw: dict[str, Any]) -> str | None:
    """The method a section without `name` means by its keys alone: one whose config declares `chosen_by_keys` and
    has every key given (`method: {image: ..., text: ...}` is the `towers` method)."""
    from deltatune.methods import available_methods

    if not raw:
        return None
    for name, method in available_methods().items():
        config = method.config_class
        if getattr(config, "chosen_by_keys", False) and set(raw) <= {f.name for f in dataclasses.fields(config)}:
            return name
    return None


def _build_objective(raw: Any, path: str) -> ObjectiveConfig:
    """The named objective's own dataclass; "auto" (the task's default, unknown until the model is) takes no options."""
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping with at least `name:`, got {raw!r}")
    name = str(raw.get("name", ObjectiveConfig.name))
    if name == ObjectiveConfig.name:
        options = [key for key in raw if key != "name"]
        if options:
            raise UserError(f"{path}.{options[0]} needs a named objective: {path}.name is 'auto' (the task's default), "
                            f"which takes no options; set {path}.name (`deltatune objectives` lists them)")
        return _build(ObjectiveConfig, raw, path)
    return _build(OBJECTIVES.get(name, f"{path}.name").config_class, raw, path)


def _reject_replaced(cls: type, raw: dict[str, Any], path: str) -> None:
    """A key the section no longer has (its `replaced_keys`) is refused with the spelling that replaced it."""
    for key, new_key in getattr(cls, "replaced_keys", {}).items():
        if key in raw:
            section, _, sub_key = new_key.rpartition(".")
            value = raw[key]
            raise UserError(f"{path}.{key} is no longer a key; write {section}: {{{sub_key}: {value}}} "
                            f"(on the command line {new_key}={value})")


def _reject_unknown(raw: dict[str, Any], valid: list[str], path: str) -> None:
    for key in raw:
        if key not in valid:
            hint = closest_names(str(key), valid, limit=1)
            where = f"in {path}" if path else "at the top level"
            guess = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UserError(f"unknown key {key!r} {where}{guess}; valid keys: {', '.join(valid)}")


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check/convert one value against its type annotation."""
    value = _plain(value, hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        # Try each alternative in order (e.g. `bool | str` takes true or "gaussian"); report the first one's error.
        errors: list[UserError] = []
        for option in options:
            try:
                return _coerce(value, option, path)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value] if origin is list else value
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{path} must be a list, got {value!r}")
        items = [_coerce(item, args[0] if origin is list else args[min(i, len(args) - 1)], f"{path}[{i}]")
                 for i, item in enumerate(value)]
        if origin is tuple and len(args) != len(items) and args[-1] is not Ellipsis:
            raise UserError(f"{path} must have {len(args)} items, got {len(items)}")
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path} must be a mapping, got {value!r}")
        if not args or args[1] is Any:  # free-form mappings (`extra`) keep what they were given
            return _plain(dict(value), Any)
        return {_coerce(key, args[0], path): _coerce_entry(item, args[1], f"{path}.{key}")
                for key, item in value.items()}
    return _coerce_scalar(value, hint, path)


def _coerce_entry(value: Any, hint: Any, path: str) -> Any:
    """One value of a typed mapping such as data.columns; YAML's null is not a string, so it is refused there."""
    if value is None and hint is str:
        raise UserError(f"{path} must be a string, got nothing; give it a value or remove the key")
    return _coerce(value, hint, path)


def _coerce_scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{path} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{path} must be a number, got {value!r}")
        try:
            number = float(value) if hint is float else _to_int(value)
        except (TypeError, ValueError):
            kind, example = ("a number", "3e-5") if hint is float else ("a whole number", "8")
            raise UserError(f"{path} must be {kind}, got {value!r}; write e.g. {path}={example}") from None
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{path} must be a string, got {value!r}")
        if value is None:
            raise UserError(f"{path} must be a string, got nothing; give it a value or remove the key")
        return str(value)
    return value


def _to_int(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)
