"""Seeded train/validation/test splits as row indices into the loaded table.

Indices (not examples) are what a run saves, so `eval` can rebuild exactly the same test set later, with a different
tokenizer or max_length, as long as the raw data is unchanged.
"""

from __future__ import annotations

import numpy as np

from deltatune.config.schema import SplitConfig
from deltatune.errors import UserError

SPLIT_NAMES = ("train", "validation", "test")


def make_splits(n_rows: int, split: SplitConfig, max_examples: int | None = None) -> dict[str, list[int]]:
    """Deterministic, disjoint splits of `range(n_rows)`, each sorted ascending.

    Semantics, in order:
    1. rows are shuffled with ``numpy.random.default_rng(split.seed)``;
    2. with `max_examples`, only the first `max_examples` rows of that shuffle are kept (so a quick run sees a
       random subset, and the same subset for the same seed), the rest belong to no split;
    3. the kept rows are cut as test first, then validation, then train. Taking test from the front means changing
       the validation fraction never moves a row into or out of the test set.
    A fraction > 0 always gets at least one row; a fraction of 0 gives a deliberately empty split.
    """
    _check_fractions(split)
    if n_rows < 1:
        raise UserError("the dataset has no rows; point data.name at a file or folder with examples")
    order = np.random.default_rng(split.seed).permutation(n_rows)
    if max_examples is not None:
        if max_examples < 1:
            raise UserError(f"data.max_examples is {max_examples}; use a positive number or leave it unset")
        order = order[:max_examples]
    kept = len(order)
    n_test = _split_size(kept, split.test)
    n_validation = _split_size(kept, split.validation)
    if kept - n_test - n_validation < 1:
        raise UserError(
            f"only {kept} rows: too few for validation={split.validation} and test={split.test} with a non-empty "
            "train split; add rows, raise data.max_examples, or lower data.split.validation/test"
        )
    test = order[:n_test]
    validation = order[n_test:n_test + n_validation]
    train = order[n_test + n_validation:]
    return {name: sorted(int(i) for i in part) for name, part in zip(SPLIT_NAMES, (train, validation, test))}


def _check_fractions(split: SplitConfig) -> None:
    """Fractions must be in [0, 1) and leave room for training."""
    for name in ("validation", "test"):
        value = getattr(split, name)
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UserError(f"data.split.{name} is {value!r}; use a fraction in [0, 1), e.g. 0.1")
    if split.validation + split.test >= 1:
        raise UserError(
            f"data.split.validation + data.split.test = {split.validation + split.test:g} leaves nothing to train on; "
            "make their sum less than 1"
        )


def _split_size(n_rows: int, fraction: float) -> int:
    """Rounded share of rows; at least one row when the fraction is positive, so a requested split is never empty."""
    if fraction <= 0:
        return 0
    return max(1, int(round(n_rows * fraction)))


def check_splits(splits: dict[str, list[int]], n_rows: int) -> dict[str, list[int]]:
    """Validate splits given by the caller (e.g. loaded from a saved run) against the current table."""
    missing = [name for name in SPLIT_NAMES if name not in splits]
    if missing:
        raise UserError(f"saved splits lack {', '.join(missing)}; they need train, validation and test index lists")
    seen: set[int] = set()
    checked: dict[str, list[int]] = {}
    for name in SPLIT_NAMES:
        indices = [int(i) for i in splits[name]]
        bad = [i for i in indices if not 0 <= i < n_rows]
        if bad:
            raise UserError(
                f"the {name} split refers to row {bad[0]} but the dataset has {n_rows} rows; the data changed since "
                "the split was saved: use the same data.name and file, or let deltatune make new splits"
            )
        overlap = seen.intersection(indices)
        if overlap:
            raise UserError(f"row {min(overlap)} is in more than one split; splits must be disjoint")
        seen.update(indices)
        checked[name] = indices
    return checked
