"""What the preference objectives share: one forward pass over both halves of a pair batch, and a sequence score
read at the last real token.

A pair batch is {"chosen": {...}, "rejected": {...}[, "margin"]} with both halves padded to one length (see
`deltatune.data.preference.PreferenceCollator`), so they concatenate along the batch dimension: one forward of 2B
rows instead of two of B (TRL's "concatenated forward"), and both halves see the same dropout-free weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.models.families import family_of
from deltatune.objectives.base import model_logits

HALVES = ("chosen", "rejected")


def concatenated(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The chosen rows followed by the rejected rows, key by key (both halves have the same keys and length)."""
    chosen, rejected = batch["chosen"], batch["rejected"]
    return {key: torch.cat([chosen[key], rejected[key]]) for key in chosen}


def split_halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `concatenated` for per-row results: (chosen part, rejected part)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real (attended) token, whether the row is padded on the right or on the left."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


def sequence_scores(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar per row from a one-output sequence classifier, read at the row's last real token, shape (B,).

    Encoder classifiers (BERT) pool their first token and return (B, 1): used as is. Decoder classifiers
    (LlamaForSequenceClassification) score every position and transformers keeps the rightmost position whose token
    is not pad_token_id, which is wrong when pad == eos and the text ends in eos (TRL issue #937): the score is then
    read before the eos, or on padding. So the per-position scores are taken from the head itself (a forward hook
    on the module the architecture table calls the head) and the attention mask picks the last real token.
    """
    captured: list[torch.Tensor] = []
    heads = _head_modules(model)
    handles = [head.register_forward_hook(lambda _m, _i, output: captured.append(output)) for head in heads]
    try:
        pooled = model_logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    per_position = next((output for output in captured if torch.is_tensor(output) and output.dim() == 3), None)
    if per_position is None or "attention_mask" not in inputs:
        return pooled[:, 0].float()
    rows = torch.arange(per_position.shape[0], device=per_position.device)
    # A virtual-token method (prompt tuning, P-tuning) adds its n positions at the start or after the first token,
    # before a row's last real token in either case: the head then sees the row's tokens n positions later.
    added = per_position.shape[1] - inputs["attention_mask"].shape[1]
    return per_position[rows, last_real_positions(inputs["attention_mask"]) + added, 0].float()


def _head_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose parameters the architecture table names as the new head (`score`, `classifier`);
    a method's wrapper around the head (modules_to_save) is one of them, so the hook sees the trained head."""
    family = family_of(model)
    names = [name for name, _ in model.named_modules() if name and family.is_head(name + ".")]
    outermost = [name for name in names if not any(name.startswith(other + ".") for other in names if other != name)]
    modules = dict(model.named_modules())
    return [modules[name] for name in outermost]


__all__ = ["HALVES", "concatenated", "last_real_positions", "sequence_scores", "split_halves"]
