"""The objective registry: what the one training loop optimises (classification, causal-LM SFT, and later reward
modelling, DPO, PPO, distillation). An objective turns a batch into a loss and a model into validation metrics;
the loop never branches on which objective it runs.
"""

from __future__ import annotations

from typing import Protocol

from deltatune.objectives.base import Objective
from deltatune.registry import Registry

OBJECTIVES: Registry[type[Objective]] = Registry(__name__, "objective")
register_objective = OBJECTIVES.register


def available_objectives() -> dict[str, type[Objective]]:
    return OBJECTIVES.all()


class HasDefaultObjective(Protocol):
    """What "auto" asks: a task (`deltatune.tasks.Task`) names the objective it trains with by default."""

    default_objective: str


def get_objective(name: str, task: HasDefaultObjective) -> type[Objective]:
    """The objective named `name`; for "auto", the one `task` names as its default."""
    return OBJECTIVES.get(task.default_objective if name == "auto" else name, "train.objective")


__all__ = ["OBJECTIVES", "Objective", "available_objectives", "get_objective", "register_objective"]
