"""Data for every task: load raw rows, split them by seeded indices, and let the task turn them into examples.

    rows = load_rows(cfg)                        # raw dicts from an alias or a file
    splits = make_splits(len(rows), cfg.split, cfg.max_examples)
    bundle = build_datasets(cfg, task, processor, splits)   # deltatune.tasks.build_datasets
    loader = DataLoader(bundle.train, batch_size=32, shuffle=True, collate_fn=bundle.collate)

`build_datasets` (in `deltatune.tasks`, which sits above this package) does the first two steps itself when `splits`
is None; the task reads the rows through its roles (`data.columns`) and encodes them. Runs save `bundle.splits` (row indices into the raw table)
so `eval` rebuilds exactly the same test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from deltatune.data.aliases import ALIASES, alias_task
from deltatune.data.images import ImageProcessor
from deltatune.data.sft import IGNORE_INDEX
from deltatune.data.sources import load_rows
from deltatune.data.splits import make_splits

__all__ = [
    "ALIASES", "IGNORE_INDEX", "DatasetBundle", "ImageProcessor", "alias_task", "load_rows",
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

    def by_split(self) -> dict[str, list[dict]]:
        """The examples of each non-empty split, by split name."""
        parts = {"train": self.train, "validation": self.validation, "test": self.test}
        return {name: examples for name, examples in parts.items() if len(examples)}
