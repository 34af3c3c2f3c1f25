"""Training examples and how the loop draws them: seeded, length-grouped micro-batches per epoch (optionally from a
pool of examples an objective chooses, cycled to a fixed count), and all examples once for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


@dataclass
class Batches:
    """Examples plus how to turn a list of them into tensors.

    With `group_by_length`, each window of 50 shuffled micro-batches is re-cut so similar lengths share a batch,
    then the batches are shuffled again: padding (wasted compute) shrinks by about half on short-text data while
    every example is still seen once per epoch in a seeded random order.
    """

    examples: list[dict]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    group_by_length: bool = True
    split: str | None = None  # "validation" or "test" for evaluation data: what Objective.evaluating says

    def lengths(self) -> list[int] | None:
        """Each example's padded length in tokens (None when the examples hold no token ids, e.g. images)."""
        if not self.examples or example_length(self.examples[0]) is None:
            return None
        if hasattr(self.examples, "lengths"):  # examples on disk know their lengths without being read
            return self.examples.lengths()
        return [example_length(example) or 0 for example in self.examples]

    def epoch(self, batch_size: int, seed: int, epoch: int, pool: list[int] | None = None,
              count: int | None = None) -> list[list[int]]:
        """Index lists of the shuffled micro-batches of one epoch; identical for the same (seed, epoch). `pool`
        limits the epoch to those examples; `count` fixes how many micro-batches it has (the pool is cycled, each
        pass in a new order, and cut to `count` full batches)."""
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if pool is None:
            order = torch.randperm(len(self.examples), generator=generator).tolist()
        else:
            order = [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
        if count is not None and order:
            while len(order) < count * batch_size:
                order += [order[i] for i in torch.randperm(len(pool or self.examples), generator=generator).tolist()]
            order = order[: count * batch_size]
        lengths = self.lengths() if self.group_by_length else None
        if lengths is not None:
            window = 50 * batch_size
            order = [i for start in range(0, len(order), window)
                     for i in sorted(order[start : start + window], key=lengths.__getitem__)]
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if lengths is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def in_order(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """All examples once, batched by length (metrics are sums over examples, so order does not matter)."""
        lengths = self.lengths()
        order = sorted(range(len(self.examples)), key=lengths.__getitem__) if lengths else range(len(self.examples))
        order = list(order)
        for start in range(0, len(order), batch_size):
            yield self.collate([self.examples[i] for i in order[start : start + batch_size]])


def example_length(example: Any) -> int | None:
    """Tokens an example pads to: its `input_ids` length, or for a nested example (a preference pair's chosen and
    rejected halves, padded to one common length in a batch) the longest of its parts; None without token ids."""
    if not isinstance(example, dict):
        return None
    if "input_ids" in example:
        return len(example["input_ids"])
    parts = [length for value in example.values() if (length := example_length(value)) is not None]
    return max(parts) if parts else None
