"""Gradient statistics of weights on a few training batches, before training: what sparse fine-tuning ranks
single weights by and what adaptive layer selection ranks whole blocks by."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import UserError
from deltatune.methods.base import LossFunction


def calibration_scores(model: nn.Module, weights: list[Tensor], batches: Iterable[dict[str, Any]],
                       loss_fn: LossFunction, selection: str) -> list[Tensor]:
    """|mean gradient| ("gradient") or mean squared gradient ("fisher") of each weight over the batches."""
    totals = [torch.zeros_like(weight, dtype=torch.float32) for weight in weights]
    previous = [(param, param.requires_grad) for param in model.parameters()]
    was_training = model.training
    model.eval()  # no dropout noise, and BatchNorm running statistics stay as they are
    count = 0
    try:
        for param, _ in previous:
            param.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        for batch in batches:
            # autograd.grad rather than backward(): nothing accumulates in .grad, so nothing is left behind.
            grads = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is not None:
                    total.add_(grad.float().square() if selection == "fisher" else grad.float())
            count += 1
    finally:
        for param, requires_grad in previous:
            param.requires_grad_(requires_grad)
        model.train(was_training)
    if count == 0:
        raise UserError(f"selection {selection} got no calibration batches; pass at least one batch of training data")
    return [total.abs_().div_(count) if selection == "gradient" else total.div_(count) for total in totals]
