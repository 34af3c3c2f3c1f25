"""Turning a label column into class ids 0..N-1.

Labels are encoded over the whole table (not per split), so the mapping does not depend on the seed, the split
fractions or max_examples, and a saved run's ids mean the same thing when `eval` reloads the data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from deltatune.errors import UserError

# "3", and "3.0" as pandas writes integer labels to CSV when the column also held a missing value
_INTEGER = re.compile(r"[+-]?\d+(\.0*)?")


@dataclass
class EncodedLabels:
    """Class ids aligned with the input values, the class count, and names when known."""

    ids: list[int]
    num_labels: int
    label_names: list[str] | None


def _as_int(value: Any) -> int | None:
    """The integer a label stands for (3, 3.0, "3"), or None if it is a class name."""
    if isinstance(value, bool):  # JSON true/false: a binary label
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():  # parquet/pandas often store integer labels as floats
            return int(value)
        raise UserError(f"label {value} is not an integer; classification labels must be integers 0..N-1 or strings")
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip().split(".")[0])  # CSV cells are always strings
    if isinstance(value, str):
        return None
    raise UserError(f"label {value!r} has type {type(value).__name__}; use integers 0..N-1 or strings")


def encode_labels(
    values: Sequence[Any],
    column: str,
    num_labels: int | None = None,
    known_names: Sequence[str] | None = None,
) -> EncodedLabels:
    """Integer labels are kept as-is and must be 0..N-1; string labels map to ids in sorted order.

    N is `num_labels` when given (the model's head size), otherwise the number of distinct labels, so a gap such as
    labels 1..5 is caught instead of silently training a never-seen class 0.
    """
    if not values:
        raise UserError(f"label column '{column}' is empty; the dataset needs labelled rows")
    as_ints = [_as_int(value) for value in values]
    is_name = [number is None for number in as_ints]
    if any(is_name) and not all(is_name):
        number = next(v for v, name in zip(values, is_name) if not name)
        text = next(v for v, name in zip(values, is_name) if name)
        raise UserError(
            f"label column '{column}' mixes integer and string labels (e.g. {number!r} and {text!r}); "
            "make them all integers 0..N-1 or all class names"
        )
    if all(is_name):
        encoded = _encode_names([str(value).strip() for value in values], column, num_labels)
    else:
        encoded = _check_ints([int(number) for number in as_ints if number is not None], column, num_labels,
                              known_names)
    _require_two_classes(encoded.ids, values, column)
    return encoded


def _require_two_classes(ids: list[int], values: Sequence[Any], column: str) -> None:
    """One class would train a head that cannot be wrong and report accuracy 1.0 (with a 1-output head, every loss
    is 0): refuse it, whatever model.num_labels says."""
    if len(set(ids)) < 2:
        raise UserError(f"classification needs at least two classes; found only {values[0]!r} in label column "
                        f"'{column}' (an image folder needs one subfolder per class): add examples of another class")


def _encode_names(values: list[str], column: str, num_labels: int | None) -> EncodedLabels:
    """Class names -> ids in sorted name order (stable across runs and machines)."""
    names = sorted(set(values))
    if num_labels is not None and num_labels < len(names):
        raise UserError(
            f"label column '{column}' has {len(names)} classes but model.num_labels is {num_labels}; "
            f"set model.num_labels to {len(names)} or leave it unset"
        )
    index = {name: i for i, name in enumerate(names)}
    return EncodedLabels([index[value] for value in values], num_labels or len(names), names)


def _check_ints(
    ids: list[int], column: str, num_labels: int | None, known_names: Sequence[str] | None
) -> EncodedLabels:
    """Integer labels must lie in 0..N-1."""
    distinct = len(set(ids))
    size = num_labels if num_labels is not None else distinct
    for value in (min(ids), max(ids)):
        if not 0 <= value < size:
            source = "model.num_labels" if num_labels is not None else f"{distinct} distinct integer labels"
            fix = "remap them (negative labels cannot be used as class ids) or use class-name strings"
            if value >= 0:
                fix = f"remap them (e.g. subtract the smallest), use class-name strings, or set model.num_labels " \
                      f"to at least {value + 1}"
            raise UserError(
                f"label {value} in column '{column}' is out of range 0..{size - 1} ({source}); labels must be "
                f"0..N-1: {fix}"
            )
    names = list(known_names) if known_names is not None and len(known_names) == size else None
    return EncodedLabels(ids, size, names)
