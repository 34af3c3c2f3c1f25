"""Data for every task: load raw rows, split them by seeded indices, and let the task turn them into examples.

    rows = load_rows(cfg)                        # raw dicts from an alias or a file
    splits = make_splits(len(rows), cfg.split, cfg.max_examples)
    bundle = build_datasets(cfg, task, processor, splits)
    loader = DataLoader(bundle.train, batch_size=32, shuffle=True, collate_fn=bundle.collate)

`build_datasets` does the first two steps itself when `splits` is None; the task (`deltatune/tasks/`) reads the
rows through its roles (`data.columns`) and encodes them. Runs save `bundle.splits` (row indices into the raw table)
so `eval` rebuilds exactly the same test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from deltatune.config.schema import DataConfig
from deltatune.data.aliases import ALIASES, alias_task
from deltatune.data.images import ImageProcessor
from deltatune.data.sft import IGNORE_INDEX
from deltatune.data.sources import load_rows, require_columns
from deltatune.data.splits import check_splits, make_splits
from deltatune.errors import UserError

if TYPE_CHECKING:
    from deltatune.tasks.base import Task

__all__ = [
    "ALIASES", "IGNORE_INDEX", "DatasetBundle", "ImageProcessor", "alias_task", "build_datasets", "load_rows",
    "make_splits",
]


@dataclass
class DatasetBundle:
    """Processed splits plus what a training loop needs to batch them.

    `packed` is True when `train` holds packed causal-LM sequences (validation/test are never packed, so their
    metrics do not depend on the packing setting); the model must then be called with ``use_cache=False``.
    """

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    num_labels: int | None
    label_names: list[str] | None
    splits: dict[str, list[int]]
    packed: bool = field(default=False)


def build_datasets(
    cfg: DataConfig,
    task: str | Task,
    processor: Any,
    splits: dict[str, list[int]] | None = None,
    num_labels: int | None = None,
) -> DatasetBundle:
    """Load, split and let `task` (a registered task's name or object) encode the dataset.

    `processor` is what the model's inputs need (a Hugging Face tokenizer, an `ImageProcessor`, ...); the task checks
    it. `splits` given (e.g. from a saved run) are used exactly; otherwise they come from `make_splits` with
    cfg.split and cfg.max_examples. `num_labels` (the model's head size, if fixed) widens the allowed integer label
    range beyond the number of distinct labels.
    """
    from deltatune.data.table import Table
    from deltatune.tasks import as_task

    definition = as_task(task)
    columns = definition.columns(cfg)  # a wrong role fails before any data is read
    rows = load_rows(cfg)
    chosen = check_splits(splits, len(rows)) if splits is not None else make_splits(len(rows), cfg.split,
                                                                                   cfg.max_examples)
    if not chosen["train"]:
        raise UserError(f"the train split of '{cfg.name}' is empty; add rows or lower data.split fractions")
    source = f"dataset '{cfg.name}'"
    require_columns(rows, {f"columns.{role}": column for role, column in columns.items()}, source)
    path = Path(cfg.name)
    alias = ALIASES.get(cfg.name)
    table = Table(rows, columns, source, label_names=alias.label_names if alias else None,
                  base_dir=path.parent if alias is None and path.is_file() else None)
    return definition.encode(table, chosen, cfg, processor, num_labels)
