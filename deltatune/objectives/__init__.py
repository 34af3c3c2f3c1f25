"""The objective registry: what the one training loop optimises (classification, causal-LM SFT, and later reward
modelling, DPO, PPO, distillation). An objective turns a batch into a loss and a model into validation metrics;
the loop never branches on which objective it runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from deltatune.errors import UserError, closest_names
from deltatune.objectives.base import Objective

_REGISTRY: dict[str, type[Objective]] = {}
_discovered = False
ObjectiveClass = TypeVar("ObjectiveClass", bound=type[Objective])


def register_objective(name: str) -> Callable[[ObjectiveClass], ObjectiveClass]:
    """Class decorator: make an `Objective` available as `train.objective: name`."""

    def decorate(cls: ObjectiveClass) -> ObjectiveClass:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_objectives() -> dict[str, type[Objective]]:
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True
    return dict(sorted(_REGISTRY.items()))


def get_objective(name: str, task: str) -> type[Objective]:
    """The objective named `name`, or for "auto" the one that declares itself the default for `task`."""
    objectives = available_objectives()
    if name == "auto":
        for objective in objectives.values():
            if task in objective.default_for_tasks:
                return objective
        raise UserError(f"no default objective for task {task!r}; set train.objective to one of {', '.join(objectives)}")
    if name not in objectives:
        hint = closest_names(name, list(objectives), limit=1)
        raise UserError(
            f"unknown train.objective {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
            f"valid: auto, {', '.join(objectives)}"
        )
    return objectives[name]


__all__ = ["Objective", "available_objectives", "get_objective", "register_objective"]
