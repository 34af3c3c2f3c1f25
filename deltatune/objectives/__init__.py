"""The objective registry: what the one training loop optimises (classification, causal-LM SFT, and later reward
modelling, DPO, PPO, distillation). An objective turns a batch into a loss and a model into validation metrics;
the loop never branches on which objective it runs.
"""

from __future__ import annotations

from deltatune.errors import UserError
from deltatune.objectives.base import Objective
from deltatune.registry import Registry

OBJECTIVES: Registry[type[Objective]] = Registry(__name__, "objective")
register_objective = OBJECTIVES.register


def available_objectives() -> dict[str, type[Objective]]:
    return OBJECTIVES.all()


def get_objective(name: str, task: str) -> type[Objective]:
    """The objective named `name`, or for "auto" the one that declares itself the default for `task`."""
    if name == "auto":
        for objective in OBJECTIVES.all().values():
            if task in objective.default_for_tasks:
                return objective
        raise UserError(f"no default objective for task {task!r}; set train.objective to one of "
                        f"{', '.join(OBJECTIVES.all())}")
    return OBJECTIVES.get(name, "train.objective")


__all__ = ["OBJECTIVES", "Objective", "available_objectives", "get_objective", "register_objective"]
