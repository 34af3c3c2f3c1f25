"""Range and choice rules for config fields, declared on the field itself and checked by the strict parser.

A field opts in through its dataclass metadata, so the rule sits next to the default it constrains:

    batch_size: int = field(default=32, metadata=at_least(1))
    lr: float = field(default=5e-5, metadata=above(0))
    warmup_ratio: float = field(default=0.06, metadata=between(0, 1))
    schedule: str = field(default="linear", metadata=one_of("linear", "cosine", "constant"))
    device: str = field(default="auto", metadata=matching(r"auto|cpu|cuda(:\\d+)?", "auto, cpu, cuda, cuda:N"))

Any config dataclass can use them, method configs included: `check_config` walks every nested dataclass. A range
applies to each item of a list or tuple field; `None` (an unset optional field) is never checked, nor are the
contents of free-form mapping fields such as `extra`. Independently of any rule, every float field (and every float
item of a list or tuple field) must be finite: nan and inf are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from deltatune.errors import UserError, closest_names


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (either may be None: unbounded); `*_open` excludes that bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        # Written as "is inside" tests so that nan, which fails every comparison, is never inside.
        above_low = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below_high = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above_low and below_high

    def describe(self) -> str:
        low, high = _shown(self.low), _shown(self.high)
        if self.high is None:
            return f"{'above' if self.low_open else 'at least'} {low}"
        if self.low is None:
            return f"{'below' if self.high_open else 'at most'} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def at_least(low: float) -> dict[str, Any]:
    """Metadata: the value must be >= `low` (sizes, counts: `at_least(1)`)."""
    return {"range": Range(low=low)}


def above(low: float) -> dict[str, Any]:
    """Metadata: the value must be > `low` (rates: `above(0)`)."""
    return {"range": Range(low=low, low_open=True)}


def between(low: float, high: float, high_open: bool = False, low_open: bool = False) -> dict[str, Any]:
    """Metadata: `low` <= value <= `high` (strict at a bound marked open: a confidence in (0, 1])."""
    return {"range": Range(low=low, high=high, low_open=low_open, high_open=high_open)}


def one_of(*choices: str) -> dict[str, Any]:
    """Metadata: the value must be one of `choices`."""
    return {"choices": tuple(choices)}


def matching(pattern: str, described_as: str) -> dict[str, Any]:
    """Metadata: the whole value must match the regular expression `pattern`; `described_as` lists the forms."""
    return {"pattern": (pattern, described_as)}


def check_config(config: Any, path: str = "") -> None:
    """Raise a one-line UserError for the first field of `config` (a dataclass, walked recursively) that breaks its
    metadata rule or holds a non-finite float."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        key = f"{path}.{item.name}" if path else item.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_config(value, key)
        else:
            check_value(value, item.metadata, key, item.default)


def check_value(value: Any, metadata: Any, key: str, default: Any = None) -> None:
    """Check one field's value against its metadata rule (see the module docstring)."""
    if value is None:
        return
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for index, item in enumerate(items):
        item_key = key if item is value else f"{key}[{index}]"
        if isinstance(item, float) and not math.isfinite(item):
            raise UserError(f"{item_key} must be a finite number, got {item}{_example(key, default)}")
        rule = metadata.get("range")
        if rule is not None and _is_number(item) and not rule.contains(item):
            raise UserError(f"{item_key} must be {rule.describe()}, got {item}{_example(key, default)}")
    if "choices" in metadata and value not in metadata["choices"]:
        _refuse_choice(key, value, list(metadata["choices"]))
    if "pattern" in metadata:
        pattern, described_as = metadata["pattern"]
        if not isinstance(value, str) or re.fullmatch(pattern, value) is None:
            raise UserError(f"unknown {key} {value!r}; valid: {described_as}")


def _refuse_choice(key: str, value: Any, choices: list[str]) -> None:
    close = closest_names(str(value), choices, limit=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown {key} {value!r}{guess}; valid: {', '.join(choices)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _example(key: str, default: Any) -> str:
    """"; write e.g. key=<the field's default>" when the default is a number or a tuple of numbers, else ""."""
    if _is_number(default):
        return f"; write e.g. {key}={_shown(default)}"
    if isinstance(default, tuple) and default and all(_is_number(item) for item in default):
        return f"; write e.g. {key}=[{','.join(_shown(item) for item in default)}]"
    return ""


def _shown(number: float | None) -> str:
    """Whole numbers in full (4294967295, not 4.29497e+09), others short (5e-05)."""
    if number is None or isinstance(number, int):
        return str(number)
    return f"{number:g}"
