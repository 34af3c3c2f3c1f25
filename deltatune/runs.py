"""Finished runs read back from their directories: the one loader behind `eval`, `export` and `generate`.

    run = load_run("runs/minilm-l6-lora-20260101-120000", with_data=True)
    run.model        # the pretrained model with the run's method applied and its trained weights loaded
    run.task, run.method, run.processor, run.data    # data: the saved splits rebuilt (None without with_data)

`open_run` only reads the directory's config and resolves its task, so a command can refuse an unsuitable run before
loading any model; `SavedRun.load` then builds the model, `SavedRun.load_base_model` the model without the method.
Every unusable directory (not a run, unfinished, unreadable config) is a one-line UserError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.config.schema import RunConfig
from deltatune.methods.base import Method
from deltatune.objectives import get_objective
from deltatune.objectives.base import Objective
from deltatune.resume import read_saved_config
from deltatune.runner import build_model, format_metrics, metrics_on_splits, prepare, start_seeded
from deltatune.tasks import get_task, resolve_task
from deltatune.tasks.base import Task
from deltatune.training.loop import resolve_device
from deltatune.training.run_dir import RunDir
from deltatune.training.state import load_weights


@dataclass
class LoadedRun:
    """A finished run's model, ready for inference (eval mode, on the run's device), and what it was built from."""

    run_dir: RunDir
    config: RunConfig
    task: Task
    model: nn.Module
    method: Method
    objective: Objective
    processor: Any  # the tokenizer or ImageProcessor the model's inputs need
    device: torch.device
    data: Any = None  # deltatune.data.DatasetBundle of the saved splits, when loaded with_data


@dataclass(frozen=True)
class SavedRun:
    """A finished run directory whose config is read and whose task is known; no model is loaded yet."""

    run_dir: RunDir
    config: RunConfig
    task: Task

    def load(self, with_data: bool = False) -> LoadedRun:
        """The run's model with its method applied and trained weights loaded.

        `with_data` rebuilds the saved splits too. A labelled task without model.num_labels always reads its data,
        because the label count sizes the head the weights were trained in.
        """
        weights, _ = self.run_dir.read_final_weights()
        if with_data or (self.task.labelled and self.config.model.num_labels is None):
            prepared = prepare(self.config, self.run_dir.read_splits())
            run = LoadedRun(self.run_dir, self.config, self.task, prepared.model, prepared.method,
                            prepared.objective, prepared.processor, prepared.device,
                            prepared.data if with_data else None)
        else:
            run = self._load_without_data()
        load_weights(run.model, run.method, weights)
        run.model.eval()
        return run

    def load_base_model(self) -> nn.Module:
        """The pretrained model as the run started from it, without the method: what `--compare` shows as "base".

        Seeded like training, so a freshly initialised head starts as it did there.
        """
        from deltatune.models import load_model

        start_seeded(self.config)
        model = load_model(self.config.model, self.task, self.config.model.num_labels)
        return model.to(resolve_device(self.config.train.device)).eval()

    def _load_without_data(self) -> LoadedRun:
        """Model, method and processor built as `prepare` builds them, skipping the dataset."""
        from deltatune.models import load_processor

        start_seeded(self.config)
        objective = get_objective(self.config.train.objective, self.task)()
        processor = load_processor(self.config.model, self.task)
        model, method = build_model(self.config, self.task, self.config.model.num_labels)
        device = resolve_device(self.config.train.device)
        return LoadedRun(self.run_dir, self.config, self.task, model.to(device), method, objective, processor, device)


def open_run(path: str | Path) -> SavedRun:
    """The finished run in `path`: config parsed, task resolved; a UserError when the directory cannot be used."""
    run_dir = RunDir(path)
    run_dir.check_is_run()
    run_dir.check_finished()
    config = read_saved_config(run_dir)
    task = get_task(resolve_task(config.model))()
    return SavedRun(run_dir, config, task)


def load_run(path: str | Path, with_data: bool = False) -> LoadedRun:
    """`open_run(path).load(with_data)`: a finished run's model, method, task, processor (and saved splits)."""
    return open_run(path).load(with_data)


def evaluate_run(path: str | Path, echo=print) -> dict[str, dict[str, float]]:
    """Rebuild a finished run's model from its directory and report its metrics on the saved splits."""
    run = load_run(path, with_data=True)
    metrics = metrics_on_splits(run.model, run.objective, run.data, run.config.train, run.device)
    echo(format_metrics("eval", metrics))
    return metrics
