"""Per-example values an objective computed once (`Objective.precompute`, e.g. a teacher-logit cache's row
number) carried into every batch beside what the task's own collator makes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class CarryingCollator:
    """`collate`'s batch plus, for each of `keys` the examples hold, one tensor with a row per example (integers
    stay integers). A dataclass so DataLoader workers can pickle it."""

    collate: Callable[[list[dict]], dict[str, Any]]
    keys: tuple[str, ...]

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        batch = self.collate(examples)
        for key in self.keys:
            if examples and key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch
