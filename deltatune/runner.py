"""Putting a run together: config → data → model → method → objective → the training loop → run directory.

This is the only place that wires the pieces; each piece stays ignorant of the others' choices.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from deltatune.config.loader import config_to_dict, parse_config, read_yaml
from deltatune.config.schema import RunConfig
from deltatune.errors import UserError
from deltatune.methods import get_method
from deltatune.methods.base import Method
from deltatune.objectives import get_objective
from deltatune.objectives.base import Objective
from deltatune.training.checkpoint import read_checkpoint_dir, write_checkpoint_dir, write_json_atomic
from deltatune.training.loop import Batches, TrainingLoop, autocast_context, evaluate, resolve_device, to_device
from deltatune.training.run_dir import RunDir
from deltatune.training.state import load_weights, weights_to_save


@dataclass
class Prepared:
    """A model with its method applied, its data, and its objective: everything but the optimizer."""

    config: RunConfig
    model: nn.Module
    method: Method
    objective: Objective
    task: str
    data: Any  # deltatune.data.DatasetBundle
    device: torch.device


def prepare(config: RunConfig, splits: dict[str, list[int]] | None = None) -> Prepared:
    """Load data and model and apply the method, seeded so the same config always builds the same start."""
    from deltatune.data import build_datasets
    from deltatune.models import load_processor, resolve_task
    from deltatune.models.positions import check_max_length

    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    torch.manual_seed(config.train.seed)
    task = resolve_task(config.model)
    objective = get_objective(config.train.objective, task)()
    get_method(config.method.name)  # an unknown method fails before any data is read
    processor = load_processor(config.model)
    data = build_datasets(config.data, task, processor, splits, config.model.num_labels)
    num_labels = config.model.num_labels or data.num_labels
    if num_labels is not None and data.num_labels is not None and num_labels < data.num_labels:
        raise UserError(f"model.num_labels={num_labels} but the data has {data.num_labels} labels; "
                        f"raise model.num_labels or leave it unset")
    model, method = build_model(config, task, num_labels)
    check_max_length(model, config.data.max_length, processor)
    device = resolve_device(config.train.device)
    return Prepared(config, model.to(device), method, objective, task, data, device)


def build_model(config: RunConfig, task: str, num_labels: int | None) -> tuple[nn.Module, Method]:
    """The pretrained model with the run's method applied; seeded, so a new head starts the same every time."""
    from deltatune.models import load_model
    from deltatune.models.families import family_of

    method = get_method(config.method.name)(config.method)
    torch.manual_seed(config.train.seed)
    model = load_model(config.model, task, num_labels)
    method.check_model_kind(model)
    method.apply(model, family_of(model, config.model.family))
    return model, method


def calibrate(prepared: Prepared) -> None:
    """Let the method see training data before training (sparse chooses its weights from gradients): the batches
    epoch 0 will start with, made only as the method asks for them, and the objective's loss. On resume the
    checkpoint's state replaces whatever this chose."""
    data, train_config = prepared.data, prepared.config.train
    order = Batches(data.train, data.collate, train_config.group_by_length).epoch(
        train_config.batch_size, train_config.seed, 0)

    def batches() -> Iterator[dict[str, Any]]:
        for indices in order:
            yield to_device(data.collate([data.train[i] for i in indices]), prepared.device)

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        with autocast_context(prepared.device, train_config.dtype):
            return prepared.objective.loss(model, batch)[0]

    prepared.method.calibrate(prepared.model, batches(), loss_fn)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once. Weights a module keeps in packed buffers
    instead of parameters (qlora's 4-bit layers say how many through `packed_parameters`) count in the total."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    # Asked of the class, not the instance: wrappers forward unknown attributes to the module they wrap.
    packed = sum(module.packed_parameters for module in model.modules() if hasattr(type(module), "packed_parameters"))
    return trainable, sum(p.numel() for p in seen.values()) + packed


def find_run_dir(config: RunConfig, resume: bool) -> RunDir:
    """The run's directory: `output_dir/run_name`; when resuming without a name, the newest run of this config."""
    root = Path(config.output_dir)
    if config.run_name:
        run_dir = RunDir(root / config.run_name)
        if not resume and run_dir.path.exists() and any(run_dir.path.iterdir()):
            raise UserError(f"run directory {run_dir.path} already exists; pass --resume to continue it "
                            f"or set run_name to a new name")
        return run_dir
    if resume:
        wanted = _comparable(config_to_dict(config))
        candidates = sorted(root.glob("*/config.yaml"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in candidates:
            import yaml

            if _comparable(yaml.safe_load(path.read_text()) or {}) == wanted:
                return RunDir(path.parent)
        raise UserError(f"--resume found no earlier run of this config under {root}; set run_name to the run to continue")
    stem = Path(config.model.name.split(":")[-1]).stem
    return RunDir(root / f"{stem}-{config.method.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config_dict.items() if key not in ("run_name", "train")} | {
        "train": {k: v for k, v in config_dict.get("train", {}).items() if k not in ("progress", "num_threads")}
    }


def train(config: RunConfig, resume: bool = False, echo=print) -> dict[str, Any]:
    """Fine-tune as `config` says; returns the summary also written to the run directory."""
    run_dir = find_run_dir(config, resume)
    if resume and run_dir.path.exists():
        config = parse_config(read_yaml(run_dir.path / "config.yaml"))
    prepared = prepare(config, run_dir.read_splits() if resume else None)
    calibrate(prepared)
    trainable, total = count_parameters(prepared.model)
    echo(f"model {config.model.name} ({prepared.task}), method {config.method.name}: "
         f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%), device {prepared.device}")
    run_dir.create()
    run_dir.write_config(config_to_dict(config))
    run_dir.write_splits(prepared.data.splits)
    data = prepared.data
    validation = Batches(data.validation, data.collate) if data.validation else None
    training_data = Batches(data.train, data.collate, config.train.group_by_length)
    loop = TrainingLoop(prepared.model, prepared.method, prepared.objective, training_data,
                        validation, config.train, run_dir, prepared.device)
    before = _metrics_before(prepared, run_dir, resume)
    echo(_format_metrics("before", before))
    if resume and loop.resume():
        echo(f"resumed from step {loop.state.step} of {loop.total_steps}")
    state = loop.run()
    if (run_dir.best / "state.json").exists():
        load_weights(prepared.model, prepared.method, dict(read_checkpoint_dir(run_dir.best)[0]["model"]))
    save_final_weights(run_dir, prepared)
    after = split_metrics(prepared)
    echo(_format_metrics("after", after))
    summary = {"run_dir": str(run_dir.path), "task": prepared.task, "method": config.method.name,
               "trainable_parameters": trainable, "total_parameters": total, "steps": state.step,
               "best_step": state.best_step, "stopped_early": state.stopped_early,
               "train_seconds": round(state.seconds, 1),
               "tokens_per_second": round(state.tokens / max(state.seconds, 1e-9), 1),
               "before": before, "after": after}
    run_dir.write_summary(summary)
    echo(f"run saved in {run_dir.path}")
    return summary


def split_metrics(prepared: Prepared) -> dict[str, dict[str, float]]:
    """Validation and test metrics of the model as it is now."""
    data, results = prepared.data, {}
    for split in ("validation", "test"):
        examples = getattr(data, split)
        if examples:
            results[split] = evaluate(prepared.model, prepared.objective, Batches(examples, data.collate),
                                      prepared.config.train, prepared.device)
    return results


def _metrics_before(prepared: Prepared, run_dir: RunDir, resume: bool) -> dict[str, dict[str, float]]:
    """Metrics of the untrained model; stored so a resumed run reports the same 'before' without recomputing."""
    path = run_dir.path / "before.json"
    if resume and path.exists():
        return json.loads(path.read_text())
    before = split_metrics(prepared)
    write_json_atomic(path, before)
    return before


def save_final_weights(run_dir: RunDir, prepared: Prepared) -> None:
    write_checkpoint_dir(run_dir.weights, {"model": weights_to_save(prepared.model, prepared.method)},
                         {"method": config_to_dict(prepared.config.method)})


def evaluate_run(path: str | Path, echo=print) -> dict[str, dict[str, float]]:
    """Rebuild a finished run's model from its directory and report its metrics on the saved splits."""
    run_dir = RunDir(path)
    if not (run_dir.path / "config.yaml").exists():
        raise UserError(f"{run_dir.path} is not a run directory (no config.yaml); pass the directory `train` printed")
    if not (run_dir.weights / "state.json").exists():
        raise UserError(f"{run_dir.path} has no final weights yet; finish it with `deltatune train CONFIG --resume`")
    config = parse_config(read_yaml(run_dir.path / "config.yaml"))
    prepared = prepare(config, run_dir.read_splits())
    load_weights(prepared.model, prepared.method, dict(read_checkpoint_dir(run_dir.weights)[0]["model"]))
    metrics = split_metrics(prepared)
    echo(_format_metrics("eval", metrics))
    return metrics


def _format_metrics(label: str, metrics: dict[str, dict[str, float]]) -> str:
    parts = [f"{split} " + " ".join(f"{k}={v:.4f}" for k, v in values.items()) for split, values in metrics.items()]
    return f"{label}: " + " | ".join(parts)
