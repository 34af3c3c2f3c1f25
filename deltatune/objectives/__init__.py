"""The objective registry: what the one training loop optimises (classification, causal-LM SFT, and later reward
modelling, DPO, PPO, distillation). An objective turns a batch into a loss and a model into validation metrics;
the loop never branches on which objective it runs.
"""

from __future__ import annotations

from typing import Protocol

from deltatune.config.schema import ObjectiveConfig
from deltatune.objectives.base import BASE, POLICY_DISABLED, ModelRole, Objective
from deltatune.registry import Registry

OBJECTIVES: Registry[type[Objective]] = Registry(__name__, "objective")
register_objective = OBJECTIVES.register


def available_objectives() -> dict[str, type[Objective]]:
    return OBJECTIVES.all()


class HasDefaultObjective(Protocol):
    """What an objective asks of a task (`deltatune.tasks.Task`): the objective "auto" picks, and whether its
    examples carry class labels (`Objective.attach_task`)."""

    default_objective: str
    labelled: bool


def get_objective(name: str, task: HasDefaultObjective) -> type[Objective]:
    """The objective named `name`; for "auto", the one `task` names as its default."""
    return OBJECTIVES.get(task.default_objective if name == ObjectiveConfig.name else name, "objective.name")


def objective_task(name: str) -> str | None:
    """The task the objective `name` reads its data from (`Objective.task`); None for "auto" or a task-agnostic one."""
    return None if name == ObjectiveConfig.name else OBJECTIVES.get(name, "objective.name").task


def build_objective(config: ObjectiveConfig, task: HasDefaultObjective) -> Objective:
    """The objective `config` names (or the task's default for "auto"), built with its options; "auto" parses into
    the bare ObjectiveConfig, so the resolved objective then gets its own config class's defaults."""
    objective = get_objective(config.name, task)
    built = objective(config if isinstance(config, objective.config_class) else objective.config_class())
    built.attach_task(task)
    return built


__all__ = ["BASE", "OBJECTIVES", "POLICY_DISABLED", "ModelRole", "Objective", "available_objectives",
           "build_objective", "get_objective", "objective_task", "register_objective"]
