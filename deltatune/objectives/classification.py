"""Classification (text or image): cross-entropy on the class logits; accuracy is the headline metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config.schema import ObjectiveConfig
from deltatune.objectives import register_objective
from deltatune.objectives.base import Objective, model_logits


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: -log softmax(logits)[label], averaged over the batch."""
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def classification_metrics(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` over every example of `batches`; {} when there are none."""
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        logits = model_logits(model, batch)
        labels = batch["labels"]
        total_loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += len(labels)
    if count == 0:
        return {}
    return {"loss": total_loss / count, "accuracy": correct / count}


@dataclass
class ClassificationConfig(ObjectiveConfig):
    """No options yet; the section still parses strictly (only `name`)."""


@register_objective("classification")
class Classification(Objective):
    description = "cross-entropy on the class logits"
    config_class = ClassificationConfig
    main_metric = "accuracy"
    greater_is_better = True
    metrics = ("loss", "accuracy")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model_logits(model, batch)
        loss = classification_loss(logits, batch["labels"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, {"accuracy": float(accuracy)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        return classification_metrics(model, batches)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return super().tokens_in(batch) if "input_ids" in batch else len(batch["labels"])
