"""Each block's representation of a set of inputs, for comparing a base model with its fine-tuned copy: one
feature row per example (the mean over its real tokens for text, over positions for images), read by forward
hooks on the blocks the family table finds, so it works for every architecture and every method (methods that
insert virtual tokens add positions, which are cut out where they were inserted so positions line up with the
input).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from deltatune.models.families import family_of
from deltatune.models.student import block_list
from deltatune.objectives.base import model_logits


@torch.no_grad()
def block_features(model: nn.Module, batches: Iterable[dict[str, Any]], family_name: str = "auto",
                   needed_by: str = "deltatune report") -> list[torch.Tensor]:
    """[one (n_examples, features) float32 CPU tensor per block] over every batch."""
    _, _, blocks = block_list(model, family_of(model, family_name), needed_by)
    latest: dict[int, torch.Tensor] = {}

    def keeper(index: int):
        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            latest[index] = output[0] if isinstance(output, (tuple, list)) else output
        return keep

    handles = [block.register_forward_hook(keeper(index)) for index, block in enumerate(blocks)]
    features: list[list[torch.Tensor]] = [[] for _ in blocks]
    try:
        for batch in batches:
            latest.clear()
            model_logits(model, batch)
            for index in range(len(blocks)):
                features[index].append(pooled(latest[index], batch.get("attention_mask"), virtual_at(model)))
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(rows) for rows in features]


def virtual_at(model: nn.Module) -> int:
    """Where the active prompt-type adapter puts its virtual tokens in the sequence (0 without one): at the start,
    or after an encoder's first token ([CLS])."""
    for module in model.modules():
        current = getattr(module, "current", None)
        encoder = current() if callable(current) and hasattr(module, "encoders") else None
        if encoder is not None and hasattr(encoder, "insert_at"):
            return int(encoder.insert_at)
    return 0


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor | None, insert_at: int = 0) -> torch.Tensor:
    """One row per example: (B, C, H, W) → mean over H, W; (B, T', d) → mean over the real tokens, T' − T virtual
    positions at `insert_at` left out (T = the input's length); (B, d) as it is."""
    hidden = hidden.detach().float()
    if hidden.dim() == 4:
        return hidden.mean(dim=(2, 3)).cpu()
    if hidden.dim() == 3:
        if attention_mask is None:
            return hidden.mean(dim=1).cpu()
        added = hidden.shape[1] - attention_mask.shape[1]
        if added > 0:
            hidden = torch.cat([hidden[:, :insert_at], hidden[:, insert_at + added:]], dim=1)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return ((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)).cpu()
    return hidden.reshape(hidden.shape[0], -1).cpu()


def relative_feature_change(base: list[torch.Tensor], tuned: list[torch.Tensor]) -> list[float]:
    """Per block, ‖F_tuned − F_base‖_F / ‖F_base‖_F: how far the representations moved, for methods that leave the
    base weights as they are (adapters, prompts)."""
    return [float(torch.linalg.norm(t - b) / torch.linalg.norm(b).clamp(min=1e-12)) for b, t in zip(base, tuned)]
