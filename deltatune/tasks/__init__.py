"""The task registry: what a run learns from its data. Every task is one file in this package plus one
`@register_task` line, like methods (`deltatune/methods/`) and objectives (`deltatune/objectives/`).

A task declares its data roles and their default columns, turns rows into examples and batches, names the model head
it needs and the objective it trains with by default, and says how eval/export/generate treat it (see `Task`).
Nothing outside this package compares task names. Modules are imported on the first lookup, so importing
`deltatune` registers nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune import distributed
from deltatune.config.schema import DataConfig, ModelConfig
from deltatune.data import ALIASES, DatasetBundle
from deltatune.data.sources import load_rows, require_columns
from deltatune.data.splits import check_splits, group_keys, make_splits
from deltatune.data import cached, unlabelled
from deltatune.data.table import Table
from deltatune.errors import UserError
from deltatune.models import sources
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


def resolve_task(cfg: ModelConfig) -> str:
    """`cfg.task` when set (checked against the heads the model can be loaded with), else the task the model was
    built for.

    Aliases carry their task; a GGUF is a causal LM; a transformers directory is read from config.json's
    `architectures`, matched against each task's `architecture_suffixes` (`*ForCausalLM` -> causal-lm, ...; bare
    encoders -> the fallback task). An import path with task "auto" is a UserError: its task cannot be guessed.
    """
    source = sources.parse_source(cfg.name)
    if cfg.task != "auto":
        head = get_task(cfg.task).auto_class  # an unknown name fails here, naming the registered tasks
        heads = sources.supported_heads(source)
        if heads is not None and head not in heads:
            fitting = [name for name, task in available_tasks().items() if task.auto_class in heads]
            raise UserError(f"model {source.name!r} cannot be loaded for task {cfg.task!r}; set model.task to "
                            f"{' or '.join(fitting)}, or pick another model")
        return cfg.task
    declared = sources.declared_task(source)
    if declared is not None:
        return declared
    architectures = sources.saved_architectures(source)
    if architectures is None:
        raise UserError(f"model.task is 'auto' but {source.name!r} is an import path, whose task cannot be guessed; "
                        f"set model.task to one of {', '.join(available_tasks())}")
    return task_for_architectures(architectures)


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


def build_datasets(
    cfg: DataConfig,
    task: str | Task,
    processor: Any,
    splits: dict[str, list[int]] | None = None,
    num_labels: int | None = None,
    reads_unlabelled: bool = False,
) -> DatasetBundle:
    """Load, split and let `task` (a registered task's name or object) encode the dataset.

    `processor` is what the model's inputs need (a Hugging Face tokenizer, an `ImageProcessor`, ...); the task checks
    it. `splits` given (e.g. from a saved run) are used exactly; otherwise they come from `make_splits` with
    cfg.split and cfg.max_examples, grouped by `group_keys` (data.split.group, or the alias's group column).
    `num_labels` (the model's head size, if fixed) widens the allowed integer label range beyond the number of
    distinct labels. Rows without a label (an empty cell, `data.unlabelled`, `data.labelled_fraction`; see
    `deltatune.data.unlabelled`) train as unlabelled rows when `reads_unlabelled`, and are refused otherwise.
    """
    definition = as_task(task)
    columns = definition.columns(cfg)  # a wrong role fails before any data is read
    if cached.applies(cfg):
        with distributed.main_first():  # under torchrun rank 0 writes the example store, the others then read it
            bundle = cached.build_cached(cfg, definition, processor, splits, num_labels, reads_unlabelled)
        if bundle is not None:
            return bundle
    rows = load_rows(cfg)
    labelled_rows = len(rows)
    label_column = columns.get("label") if definition.labelled else None
    if cfg.unlabelled is not None and label_column is not None:
        rows = rows + unlabelled.source_rows(cfg, label_column)
    chosen = check_splits(splits, len(rows)) if splits is not None else make_splits(
        labelled_rows, cfg.split, cfg.max_examples, group_keys(cfg, rows[:labelled_rows]))
    if splits is None and len(rows) > labelled_rows:
        chosen["train"] = chosen["train"] + list(range(labelled_rows, len(rows)))
    if not chosen["train"]:
        raise UserError(f"the train split of '{cfg.name}' is empty; add rows or lower data.split fractions")
    source = f"dataset '{cfg.name}'"
    require_columns(rows, {f"columns.{role}": column for role, column in columns.items()}, source)
    blank = unlabelled.blank_rows(rows, label_column) if label_column is not None else []
    if blank and not reads_unlabelled:
        unlabelled.refuse_unlabelled(blank, label_column, source)
    chosen = unlabelled.train_takes_unlabelled(chosen, blank) if blank else chosen
    path = Path(cfg.name)
    alias = ALIASES.get(cfg.name)
    table = Table(rows, columns, source, label_names=alias.label_names if alias else None,
                  base_dir=path.parent if alias is None and path.is_file() else None)
    bundle = definition.encode(table, chosen, cfg, processor, num_labels)
    if cfg.labelled_fraction is not None:
        unlabelled.check_can_hide(cfg.labelled_fraction, reads_unlabelled, label_column)
        unlabelled.hide_labels(bundle.train, cfg.labelled_fraction, cfg.split.seed, bundle.label_names)
    return bundle


__all__ = [
    "TASKS", "Task", "as_task", "available_tasks", "build_datasets", "get_task", "register_task", "resolve_task",
    "task_for_architectures",
]
