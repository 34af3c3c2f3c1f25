"""Classification with label smoothing (Szegedy et al., 2016, "Rethinking the Inception Architecture"): the target
puts 1 - ε on the true class and spreads ε evenly over all K classes, so the logits are never pushed towards
infinite confidence.

loss = (1 - ε) · (-log p_y) + ε · (1/K) Σ_k (-log p_k),  with p = softmax(logits).
Validation reports the same smoothed loss and plain accuracy.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.config.constraints import between
from deltatune.config.schema import ObjectiveConfig
from deltatune.objectives import register_objective
from deltatune.objectives.base import Objective, model_logits


@dataclass
class LabelSmoothingConfig(ObjectiveConfig):
    """`objective: {name: toy_label_smoothing, smoothing: 0.1}`; the parser refuses ε outside [0, 1)."""

    smoothing: float = field(default=0.1, metadata=between(0, 1, high_open=True))  # ε


def label_smoothing_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The smoothed cross-entropy of every row (the formula above); the caller averages or sums."""
    log_probabilities = torch.log_softmax(logits.float(), dim=-1)
    true_class = -log_probabilities.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    uniform = -log_probabilities.mean(dim=-1)
    return (1 - smoothing) * true_class + smoothing * uniform


@register_objective("toy_label_smoothing")
class LabelSmoothedClassification(Objective):
    description = "cross-entropy against targets smoothed by ε"
    config_class = LabelSmoothingConfig
    main_metric = "accuracy"
    greater_is_better = True
    metrics = ("loss", "accuracy")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model_logits(model, batch)
        loss = label_smoothing_loss(logits, batch["labels"], self.config.smoothing).mean()
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, {"accuracy": float(accuracy)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        total_loss, correct, count = 0.0, 0, 0
        for batch in batches:
            logits = model_logits(model, batch)
            total_loss += float(label_smoothing_loss(logits, batch["labels"], self.config.smoothing).sum())
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
        return {"loss": total_loss / count, "accuracy": correct / count} if count else {}
