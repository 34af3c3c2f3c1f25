"""What an objective gives the training loop: a loss for a batch and metrics for a dataset."""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import torch
from torch import nn


class Objective:
    """Subclass, implement `loss` and `evaluate`, and register with `@register_objective(name)`."""

    name: ClassVar[str] = ""
    main_metric: ClassVar[str] = "loss"
    greater_is_better: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ("loss",)  # the keys `evaluate` reports; train.metric must be one of them

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar to minimise for one micro-batch, and cheap statistics to log with it."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Metrics over a whole split (the model is already in eval mode and on the right device)."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate()")

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """How many input tokens (or examples, for images) a batch carries, for throughput figures."""
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
        return len(next(iter(batch.values())))


def model_logits(model: nn.Module, batch: dict[str, Any], **options: Any) -> torch.Tensor:
    """Logits from a transformers model (an output object) or a plain module returning a tensor."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    output = model(**inputs, **options)
    return output if isinstance(output, torch.Tensor) else output.logits
