"""Seeded train/validation/test splits as row indices into the loaded table.

Indices (not examples) are what a run saves, so `eval` can rebuild exactly the same test set later, with a different
tokenizer or max_length, as long as the raw data is unchanged.

Grouped splits keep rows that share a group key (a movie, a user, a prompt) in one split, so no group leaks from
train into test: `data.split.group` names the key's column, or an embedded alias names its own (rotten-tomatoes-pairs
splits by movie_name).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deltatune.config.schema import DataConfig, SplitConfig
from deltatune.data.aliases import ALIASES
from deltatune.data.sources import require_columns, text_values
from deltatune.errors import UserError

SPLIT_NAMES = ("train", "validation", "test")


def group_keys(cfg: DataConfig, rows: list[dict[str, Any]]) -> list[str] | None:
    """Each row's split group: the column data.split.group names, else the alias's own group column; None when the
    rows are split one by one. A missing column or cell is a UserError naming it."""
    alias = ALIASES.get(cfg.name)
    column = cfg.split.group or (alias.split_group if alias is not None else None)
    if column is None:
        return None
    source = f"dataset '{cfg.name}'"
    require_columns(rows, {"split.group": column}, source)
    return text_values(rows, list(range(len(rows))), column, source)


def make_splits(n_rows: int, split: SplitConfig, max_examples: int | None = None,
                groups: list[str] | None = None) -> dict[str, list[int]]:
    """Deterministic, disjoint splits of `range(n_rows)`, each sorted ascending.

    Semantics, in order:
    1. rows are shuffled with ``numpy.random.default_rng(split.seed)``;
    2. with `max_examples`, only the first `max_examples` rows of that shuffle are kept (so a quick run sees a
       random subset, and the same subset for the same seed), the rest belong to no split;
    3. the kept rows are cut as test first, then validation, then train. Taking test from the front means changing
       the validation fraction never moves a row into or out of the test set.
    A fraction > 0 always gets at least one row; a fraction of 0 gives a deliberately empty split.

    With `groups` (one key per row) the distinct keys are shuffled instead of the rows, rows following their group
    (in table order), and each cut moves to the group boundary nearest its row count, so rows of one group share a
    split (a group cut by max_examples loses its tail, never its split) and a fraction > 0 gets at least one group.
    """
    _check_fractions(split)
    if n_rows < 1:
        raise UserError("the dataset has no rows; point data.name at a file or folder with examples")
    generator = np.random.default_rng(split.seed)
    order = generator.permutation(n_rows) if groups is None else _grouped_order(groups, generator)
    if max_examples is not None:
        if max_examples < 1:
            raise UserError(f"data.max_examples is {max_examples}; use a positive number or leave it unset")
        order = order[:max_examples]
    kept = len(order)
    test_end = _split_size(kept, split.test)
    validation_end = test_end + _split_size(kept, split.validation)
    if groups is not None:
        boundaries = _group_boundaries([groups[i] for i in order])
        test_end = _nearest_boundary(test_end, boundaries, 0, split.test > 0)
        validation_end = _nearest_boundary(validation_end, boundaries, test_end, split.validation > 0)
    if kept - validation_end < 1:
        counted = f"{kept} rows" if groups is None else f"{kept} rows in {len({groups[i] for i in order})} groups"
        raise UserError(
            f"only {counted}: too few for validation={split.validation} and test={split.test} with a non-empty "
            "train split; add rows, raise data.max_examples, or lower data.split.validation/test"
        )
    test, validation, train = order[:test_end], order[test_end:validation_end], order[validation_end:]
    if split.held_out_fold is not None:
        train = _without_fold(train, split, groups)
    return {name: sorted(int(i) for i in part) for name, part in zip(SPLIT_NAMES, (train, validation, test))}


def fold_bounds(train: np.ndarray, folds: int, groups: list[str] | None = None) -> list[int]:
    """Offsets cutting the (already shuffled) train order into `folds` nearly equal, contiguous parts: fold k is
    train[bounds[k]:bounds[k + 1]]. Grouped rows are cut at group boundaries, so a group lies in one fold."""
    size = len(train)
    bounds = [round(size * k / folds) for k in range(folds + 1)]
    if groups is not None:
        boundaries = _group_boundaries([groups[i] for i in train])
        for k in range(1, folds):
            bounds[k] = _nearest_boundary(bounds[k], boundaries, bounds[k - 1], True)
    return bounds


def _without_fold(train: np.ndarray, split: SplitConfig, groups: list[str] | None) -> np.ndarray:
    """The train order less fold `split.held_out_fold` of `split.folds`."""
    bounds = fold_bounds(train, split.folds, groups)
    start, end = bounds[split.held_out_fold], bounds[split.held_out_fold + 1]
    if any(low == high for low, high in zip(bounds, bounds[1:])):  # with folds ≥ 2, no part is then all of train
        raise UserError(f"data.split.folds={split.folds} cannot cut the {len(train)} training rows"
                        f"{' (whole groups)' if groups is not None else ''} into non-empty parts with rows left to "
                        f"train on; lower data.split.folds")
    return np.concatenate([train[:start], train[end:]])


def _grouped_order(groups: list[str], generator: np.random.Generator) -> np.ndarray:
    """Row indices with whole groups in a seeded random order, rows of a group in table order."""
    keys = list(dict.fromkeys(groups))  # first-appearance order, so the order never depends on hashing
    rank = np.empty(len(keys), dtype=np.int64)
    rank[generator.permutation(len(keys))] = np.arange(len(keys))
    position = {key: int(rank[i]) for i, key in enumerate(keys)}
    return np.argsort(np.array([position[key] for key in groups], dtype=np.int64), kind="stable")


def _group_boundaries(ordered_keys: list[str]) -> list[int]:
    """Offsets where a new group starts in `ordered_keys` (rows of a group adjacent), plus the end."""
    starts = [i for i in range(len(ordered_keys)) if i == 0 or ordered_keys[i] != ordered_keys[i - 1]]
    return starts + [len(ordered_keys)]


def _nearest_boundary(target: int, boundaries: list[int], floor: int, non_empty: bool) -> int:
    """The boundary closest to `target` (ties go lower) at or past `floor`; strictly past it when `non_empty`."""
    allowed = [b for b in boundaries if b > floor or (b == floor and not non_empty)]
    return min(allowed, key=lambda b: (abs(b - target), b)) if allowed else boundaries[-1]


def _check_fractions(split: SplitConfig) -> None:
    """Fractions must be in [0, 1) and leave room for training; a held-out fold must be one of the folds."""
    if split.held_out_fold is not None and not 0 <= split.held_out_fold < split.folds:
        raise UserError(f"data.split.held_out_fold is {split.held_out_fold} but data.split.folds is {split.folds}; "
                        f"choose a fold from 0 to {split.folds - 1}")
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
        indices = sorted(int(i) for i in splits[name])  # saved splits are sorted; a hand-edited one may not be
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
