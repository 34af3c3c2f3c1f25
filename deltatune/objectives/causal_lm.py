"""Causal-LM supervised fine-tuning: next-token cross-entropy on the response tokens only.

Labels hold -100 on prompt and padding positions (the data package masks them), so the loss is
mean over response tokens t of -log p(x_t | x_<t). Validation reports the token-weighted loss and its perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config.constraints import at_least
from deltatune.config.schema import ObjectiveConfig
from deltatune.errors import UserError
from deltatune.models.hf import takes_logits_to_keep
from deltatune.objectives import register_objective
from deltatune.objectives.base import Objective, model_logits
from deltatune.training.sharding import is_sharded

IGNORE_INDEX = -100


def lm_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Without a KV cache object transformers derives a block-diagonal mask from restarting position_ids, which is
    # what keeps packed examples from attending to each other; training never needs the cache anyway.
    return model_logits(model, batch, use_cache=False)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits[:, t] against labels[:, t+1], skipping IGNORE_INDEX positions. "mean" over the kept
    positions is 0, not nan, when there are none (a micro-batch of rows cut before their response): it then weighs
    nothing in a step and must not turn the step's gradients into nan."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    if reduction != "mean":
        return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (shifted_labels != IGNORE_INDEX).sum().clamp(min=1)


def chunked_next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """`next_token_loss` without the full logits: the model returns its final hidden states and no logits (it is
    asked to keep the logits of an empty index list), and the loss goes through the output layer chunk by chunk."""
    head = output_layer(model)
    if head is None:
        weight = _output_weight(model)
        if isinstance(weight, torch.Tensor) and is_sharded(weight):
            raise UserError("objective.chunked_loss reads the output layer's weight outside the model's forward, "
                            "where train.distributed=fsdp holds only a shard of it; set objective.chunked_loss=false "
                            "or leave it unset (the plain loss then runs)")
        raise UserError("objective.chunked_loss needs a transformers causal LM whose output layer is a plain Linear "
                        "(leave lm_head out of method.target_modules), or set objective.chunked_loss=false")
    changed_by = logits_changed_after_output_layer(model)
    if changed_by:
        raise UserError(f"objective.chunked_loss: this model changes its logits after the output layer "
                        f"(config.{changed_by}), which the chunked loss would skip; set objective.chunked_loss=false")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    try:
        # An empty index tensor, not 1: keeping even one position reads the whole (vocabulary × d) output layer.
        none = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
        output = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=none)
    except TypeError as error:
        raise UserError(f"objective.chunked_loss: this model's forward takes no logits_to_keep ({error}); set "
                        f"objective.chunked_loss=false") from None
    hidden = output.hidden_states[-1][:, -batch["input_ids"].shape[1]:]  # methods may prepend virtual tokens
    from deltatune.objectives.losses.linear_cross_entropy import linear_cross_entropy  # losses/ imports this file

    return linear_cross_entropy(hidden[:, :-1], head.weight, head.bias, batch["labels"][:, 1:], IGNORE_INDEX,
                                chunk_size)


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L − 1) mask of the positions whose next token is a response token: the positions the next-token loss
    averages over (and where distillation compares a causal LM's prediction with the teacher's)."""
    return labels[:, 1:] != IGNORE_INDEX


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when it is a plain Linear (the chunked loss multiplies by its weight itself), else
    None (a method wrapped it, or the model has none)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Under train.distributed=fsdp the weight outside the forward is only this rank's shard (a DTensor), which the
    # chunked loss cannot multiply by; the plain loss runs the layer inside the forward.
    return head if type(head) is nn.Linear and not is_sharded(head.weight) else None


def _output_weight(model: nn.Module) -> object:
    """The output layer's `weight`, whatever wraps it (None when it has none)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "weight", None)


# Model config fields that make a causal LM's forward change its logits after the output layer (Gemma 2/3 cap them
# with tanh, Cohere and Granite scale them): a loss that multiplies by the output layer itself would miss that.
LOGIT_POST_PROCESSING = {"final_logit_softcapping": (None,), "logit_scale": (None,), "logits_scaling": (None, 1, 1.0)}


def logits_changed_after_output_layer(model: nn.Module) -> str | None:
    """The config field by which the model's forward changes its logits after the output layer, or None."""
    config = getattr(model, "config", None)
    for name, inert in LOGIT_POST_PROCESSING.items():
        if getattr(config, name, None) not in inert:
            return name
    return None


@dataclass
class SupervisedFineTuningConfig(ObjectiveConfig):
    # Compute the training loss through the output layer in chunks of response positions, never holding the
    # (tokens × vocabulary) logits (objectives/losses/linear_cross_entropy.py); prompt positions skip the layer.
    # Same value and gradients; 1.14x the speed and 0.88x the peak RSS on SmolLM2 LoRA SFT (docs/benchmarks.md).
    # None (default): on wherever the model allows it (a plain Linear output layer, a forward taking
    # logits_to_keep); true insists (an error names what is missing); false never.
    chunked_loss: bool | None = None
    loss_chunk_size: int = field(default=1024, metadata=at_least(1))


@register_objective("sft")
class SupervisedFineTuning(Objective):
    description = "next-token cross-entropy on the response tokens (supervised fine-tuning)"
    config_class = SupervisedFineTuningConfig
    main_metric = "loss"
    metrics = ("loss", "perplexity")
    greater_is_better = False

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if self._chunked(model):
            return chunked_next_token_loss(model, batch, self.config.loss_chunk_size), {}
        return next_token_loss(lm_logits(model, batch), batch["labels"]), {}

    def loss_units(self, batch: dict[str, Any]) -> int:
        """The loss is a mean over the response tokens (the positions whose next token is supervised)."""
        return int(response_positions(batch["labels"]).sum())

    def _chunked(self, model: nn.Module) -> bool:
        if self.config.chunked_loss is not None:
            return self.config.chunked_loss
        return (output_layer(model) is not None and takes_logits_to_keep(type(model))
                and logits_changed_after_output_layer(model) is None)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        total, tokens = 0.0, 0
        for batch in batches:
            total += float(next_token_loss(lm_logits(model, batch), batch["labels"], reduction="sum"))
            tokens += int(response_positions(batch["labels"]).sum())
        if tokens == 0:
            return {}
        loss = total / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
