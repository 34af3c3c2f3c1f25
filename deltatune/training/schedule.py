"""Learning-rate schedules: linear warm-up to the peak, then linear decay, cosine decay, or constant; once per run
or, with warm restarts (SGDR, Loshchilov & Hutter 2017), once every `cycle_steps` steps."""

from __future__ import annotations

import math

import torch

from deltatune.config.schema import SCHEDULES
from deltatune.errors import UserError


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str,
    cycle_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule over `total_steps`; with `cycle_steps`, warm-up and decay start again every `cycle_steps` steps
    (`warmup_steps` is then per cycle)."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown train.schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    cycle = cycle_steps or total_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step % cycle, cycle, warmup_steps, schedule)
    )
