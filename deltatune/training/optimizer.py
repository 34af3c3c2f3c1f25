"""The optimizer a run steps: AdamW (or SGD) over the trainable parameters, weight decay on matrices only, and
optional layer-wise learning-rate decay (ULMFiT, "discriminative fine-tuning"; BEiT/ELECTRA's layer decay); and the
fp16 loss scaler's checkpoint tensors."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.config.schema import TrainConfig
from deltatune.errors import UserError


def make_optimizer(model: nn.Module, cfg: TrainConfig,
                   extra: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """AdamW (or SGD, `train.optimizer`) over the model's trainable parameters and `extra` ones (an objective's
    value head); biases and norm weights (1-D tensors) get no weight decay, as is standard for transformers; with
    `layer_lr_decay` each depth gets its own learning rate (`layer_lr_scales`)."""
    scales = layer_lr_scales(model, cfg.layer_lr_decay)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    named = [*model.named_parameters(), *(("", param) for param in extra or [])]
    for name, param in named:
        if param.requires_grad:
            groups.setdefault((param.ndim >= 2, scales.get(name, 1.0)), []).append(param)
    parameter_groups = [{"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "lr": cfg.lr * scale}
                        for (decays, scale), params in sorted(groups.items(),
                                                              key=lambda item: (not item[0][0], -item[0][1]))]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(parameter_groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(parameter_groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


def layer_lr_scales(model: nn.Module, decay: float | None) -> dict[str, float]:
    """Parameter name -> learning-rate factor: decay^(L − 1 − i) in block i of L, decay^L before the blocks
    (embeddings), 1 after them (final norm, head); {} without decay."""
    if decay is None:
        return {}
    from deltatune.models.families import family_of

    family = family_of(model)
    total = family.num_blocks(model)
    if total == 0:  # every factor would be decay^0: no decay at all, silently
        raise UserError("train.layer_lr_decay needs a model whose blocks deltatune recognises (a transformers "
                        "encoder or decoder); this one has none it can find: drop train.layer_lr_decay")
    scales, seen_block = {}, False
    for name, _ in model.named_parameters():  # registration order: embeddings, blocks, then what follows
        index = family.block_index(name)
        seen_block = seen_block or index is not None
        depth = total - 1 - index if index is not None else (0 if seen_block or family.is_head(name) else total)
        scales[name] = decay ** depth
    return scales


def scaler_tensors(scaler: torch.amp.GradScaler) -> dict[str, dict[str, torch.Tensor]]:
    """An fp16 run's loss scale and its growth count, as checkpoint tensors ({} when no scaler is in use), so a
    resumed run scales its next step as the uninterrupted run would."""
    if not scaler.is_enabled():
        return {}
    state = scaler.state_dict()
    return {"grad_scaler": {"scale": torch.tensor(float(state["scale"]), dtype=torch.float64),
                            "growth_tracker": torch.tensor(int(state["_growth_tracker"]))}}


def restore_scaler(scaler: torch.amp.GradScaler, extra: dict[str, dict[str, torch.Tensor]]) -> None:
    """Inverse of `scaler_tensors` (a checkpoint without them, or a scaler not in use, changes nothing)."""
    saved = extra.get("grad_scaler")
    if saved is not None and scaler.is_enabled():
        scaler.load_state_dict({**scaler.state_dict(), "scale": float(saved["scale"]),
                                "_growth_tracker": int(saved["growth_tracker"])})
