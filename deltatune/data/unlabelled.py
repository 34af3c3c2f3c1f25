"""Training rows without a label, for objectives that learn from them (self-training, distillation).

Three ways to have them: rows whose label cell is empty; `data.unlabelled`, a second source with the same input
columns and no labels; and, for experiments, `data.labelled_fraction`, which hides the labels of all but a seeded,
class-stratified fraction of the train split (validation and test keep theirs). Unlabelled rows always train: an
empty-label row never lands in validation or test, where it could not be scored. An example without a label holds
UNLABELLED in `labels`; a hidden label stays in `hidden_label`, so an experiment can report how often pseudo-labels
are right.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from deltatune.errors import UserError

UNLABELLED = -100  # the label of a training example without one (the ignore index of the cross-entropy)
HIDDEN_LABEL = "hidden_label"  # where data.labelled_fraction keeps a hidden label


def is_blank(value: Any) -> bool:
    """A cell with no label: missing, None, NaN (pandas' gap) or blank text."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def blank_rows(rows: list[dict], column: str) -> list[int]:
    """Indices of the rows whose `column` has no label."""
    return [index for index, row in enumerate(rows) if is_blank(row.get(column))]


def refuse_unlabelled(blank: list[int], column: str, source: str) -> None:
    """The error for unlabelled rows under an objective that cannot use them."""
    raise UserError(f"row {blank[0]} of {source} has no value in column '{column}' ({len(blank)} rows have none); "
                    "fill the labels in, drop those rows, or train with an objective that learns from unlabelled "
                    "rows (objective.name=self_training or distill)")


def source_rows(cfg: Any, label_column: str) -> list[dict]:
    """The rows of `data.unlabelled` (read like data.name, with the same columns), their labels emptied."""
    from dataclasses import replace

    from deltatune.data.sources import load_rows

    return [{**row, label_column: None} for row in load_rows(replace(cfg, name=cfg.unlabelled, unlabelled=None))]


def check_can_hide(fraction: float, reads_unlabelled: bool, label_column: str | None) -> None:
    """data.labelled_fraction needs labels to hide and an objective that learns from the hidden rows."""
    if label_column is None:
        raise UserError("data.labelled_fraction hides class labels, and this task has none; remove it")
    if not reads_unlabelled:
        raise UserError(f"data.labelled_fraction={fraction:g} hides training labels, which only objectives that "
                        "learn from unlabelled rows use; set objective.name=self_training (or distill), or remove "
                        "data.labelled_fraction")


def train_takes_unlabelled(splits: dict[str, list[int]], blank: list[int]) -> dict[str, list[int]]:
    """`splits` with every unlabelled row moved into train."""
    moved = set(blank)
    return {"train": sorted(set(splits["train"]) | (moved & set(splits["validation"] + splits["test"]))),
            "validation": [i for i in splits["validation"] if i not in moved],
            "test": [i for i in splits["test"] if i not in moved]}


def hide_labels(examples: list[dict], fraction: float, seed: int, label_names: list[str] | None) -> None:
    """Keep the labels of round(fraction · n_c) seeded examples of each class c, hide the others (in place)."""
    labelled = [index for index, example in enumerate(examples) if example["labels"] != UNLABELLED]
    by_class: dict[int, list[int]] = {}
    for index in labelled:
        by_class.setdefault(int(examples[index]["labels"]), []).append(index)
    generator = np.random.default_rng(seed)
    for label, members in sorted(by_class.items()):
        keep = round(fraction * len(members))
        if keep == 0:
            name = label_names[label] if label_names and label < len(label_names) else label
            raise UserError(f"data.labelled_fraction={fraction:g} keeps no label of class {name!r} ({len(members)} "
                            f"training rows); raise it to at least {1 / len(members):.3g} or use more data")
        for index in generator.permutation(members)[keep:].tolist():
            examples[index][HIDDEN_LABEL] = examples[index]["labels"]
            examples[index]["labels"] = UNLABELLED


def check_some_unlabelled(examples: list[dict], objective: str) -> None:
    """Self-training without a single unlabelled row would only repeat plain fine-tuning."""
    if all(example["labels"] != UNLABELLED for example in examples):
        raise UserError(f"objective {objective!r} learns from unlabelled rows but the train split has none; leave "
                        "some labels empty, add data.unlabelled (a file of unlabelled rows) or set "
                        "data.labelled_fraction (e.g. 0.05) to hide most labels")
