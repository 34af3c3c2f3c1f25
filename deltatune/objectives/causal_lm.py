"""Causal-LM supervised fine-tuning: next-token cross-entropy on the response tokens only.

Labels hold -100 on prompt and padding positions (the data package masks them), so the loss is
mean over response tokens t of -log p(x_t | x_<t). Validation reports the token-weighted loss and its perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config.schema import ObjectiveConfig
from deltatune.objectives import register_objective
from deltatune.objectives.base import Objective, model_logits

IGNORE_INDEX = -100


def lm_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Without a KV cache object transformers derives a block-diagonal mask from restarting position_ids, which is
    # what keeps packed examples from attending to each other; training never needs the cache anyway.
    return model_logits(model, batch, use_cache=False)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits[:, t] against labels[:, t+1], skipping IGNORE_INDEX positions."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction=reduction)


@dataclass
class SupervisedFineTuningConfig(ObjectiveConfig):
    """No options yet; the section still parses strictly (only `name`)."""


@register_objective("sft")
class SupervisedFineTuning(Objective):
    description = "next-token cross-entropy on the response tokens (supervised fine-tuning)"
    config_class = SupervisedFineTuningConfig
    main_metric = "loss"
    metrics = ("loss", "perplexity")
    greater_is_better = False

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return next_token_loss(lm_logits(model, batch), batch["labels"]), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        total, tokens = 0.0, 0
        for batch in batches:
            total += float(next_token_loss(lm_logits(model, batch), batch["labels"], reduction="sum"))
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if tokens == 0:
            return {}
        loss = total / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
