"""The task registry: what a run learns from its data. Every task is one file in this package plus one
`@register_task` line, like methods (`deltatune/methods/`) and objectives (`deltatune/objectives/`).

A task declares its data roles and their default columns, turns rows into examples and batches, names the model head
it needs and the objective it trains with by default, and says how eval/export/generate treat it (see `Task`).
Nothing outside this package compares task names. Modules are imported on the first lookup, so importing
`deltatune` registers nothing.
"""

from __future__ import annotations

from deltatune.errors import UserError
from deltatune.registry import Registry
from deltatune.tasks.base import Task

TASKS: Registry[type[Task]] = Registry(__name__, "task")
register_task = TASKS.register


def available_tasks() -> dict[str, type[Task]]:
    """Registered tasks by name, sorted."""
    return TASKS.all()


def get_task(name: str) -> type[Task]:
    """The task class registered as `name`; a UserError naming the valid ones otherwise."""
    return TASKS.get(name, "model.task", " (or 'auto': the task the model was built for)")


def as_task(task: str | Task) -> Task:
    """A task object from its name (or the object itself), for functions that accept either."""
    return task if isinstance(task, Task) else get_task(task)()


def task_for_architectures(architectures: list[str]) -> str:
    """The task a transformers model was saved for, from config.json's `architectures` (e.g. LlamaForCausalLM).

    The first task one of whose `architecture_suffixes` ends an architecture; otherwise the fallback task.
    """
    tasks = available_tasks()
    for architecture in architectures:
        for name, task in tasks.items():
            if architecture.endswith(task.architecture_suffixes):
                return name
    fallbacks = [name for name, task in tasks.items() if task.architecture_fallback]
    if not fallbacks:
        raise UserError(f"no task matches the architectures {architectures}; set model.task to one of "
                        f"{', '.join(tasks)}")
    return fallbacks[0]


__all__ = ["TASKS", "Task", "as_task", "available_tasks", "get_task", "register_task", "task_for_architectures"]
