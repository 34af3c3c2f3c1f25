"""Putting a run together: config → data → model → method → objective → the training loop → run directory.

This is the only place that wires the pieces; each piece stays ignorant of the others' choices.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from deltatune import distributed
from deltatune.config.loader import config_to_dict, parse_config
from deltatune.config.schema import RunConfig
from deltatune.data.carry import CarryingCollator
from deltatune.errors import UserError, closest_names
from deltatune.objectives import get_objective
from deltatune.preparation import (  # re-exported: the runner is where callers have always found them
    Prepared,
    build_model,
    format_metrics,
    metrics_on_splits,
    prepare,
    run_task,
    split_metrics,
    start_seeded,
    start_from_run,
)
from deltatune.training.checkpoint import (
    read_json,
    step_checkpoints,
    write_checkpoint_dir,
    write_json_atomic,
)
from deltatune.training.device import return_freed_memory_to_os
from deltatune.training.loop import Batches, TrainingLoop, autocast_context, resolve_device, to_device
from deltatune.training import sharding
from deltatune.training.preflight import check_free_space, check_metric, check_writable
from deltatune.resume import (
    LOCATION,
    RESUMABLE,
    check_resume_point,
    flatten,
    read_saved_config,
    resumed_config,
    run_names,
)
from deltatune.runs import setup_objective, with_run_as_model
from deltatune.training.run_dir import RunDir, RunDirTaken, holds_weights, read_weights
from deltatune.training.state import LoopState, load_weights, weights_to_save

__all__ = ["Prepared", "build_model", "calibrate", "count_parameters", "find_run_dir", "format_metrics",
           "metrics_on_splits", "prepare", "save_final_weights", "split_metrics", "start_seeded", "train"]


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
        if prepared.objective.rollout_size:
            raise UserError(f"method {prepared.config.method.name!r} chooses what to train from the gradients of "
                            f"training batches, which objective {prepared.objective.name!r} only makes by generating; "
                            f"pick another method (lora, ...)")
        with autocast_context(prepared.device, train_config.dtype):
            return prepared.objective.loss(model, batch)[0]

    prepared.method.calibrate(prepared.model, batches(), loss_fn)


def _precompute(prepared: Prepared) -> dict[str, dict[str, torch.Tensor]]:
    """What the objective computes once before training (DPO's precomputed reference), by split; {} for most.
    Values it stores in the examples (`Objective.example_keys`) are carried into every batch from then on; what
    it keeps for later runs (a teacher's logits) goes under `<output_dir>/cache/`."""
    data = prepared.data
    prepared.objective.cache_dir = Path(prepared.config.output_dir) / "cache"
    prepared.objective.split_rows = data.splits
    splits = data.by_split()

    def batches_of(examples: list[dict]) -> dict[str, Any]:
        return to_device(data.collate(examples), prepared.device)

    with torch.no_grad(), autocast_context(prepared.device, prepared.config.train.dtype):
        stored = prepared.objective.precompute(splits, batches_of, prepared.config.train.eval_batch_size)
    if prepared.objective.example_keys:
        data.collate = CarryingCollator(data.collate, prepared.objective.example_keys)
    return {split: {"values": tensor} for split, tensor in stored.items()} if stored else {}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once. Weights a module keeps in packed buffers
    instead of parameters (qlora's 4-bit layers say how many through `packed_parameters`) count in the total."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    # Asked of the class, not the instance: wrappers forward unknown attributes to the module they wrap.
    packed = sum(module.packed_parameters for module in model.modules() if hasattr(type(module), "packed_parameters"))
    return trainable, sum(p.numel() for p in seen.values()) + packed


def find_run_dir(config: RunConfig, resume: bool) -> RunDir:
    """The run's directory: `output_dir/run_name`; when resuming without a name, the newest run of this config.
    Resuming a run that does not exist is an error naming the directory looked in, never a fresh start."""
    root = Path(config.output_dir).expanduser()
    if config.run_name:
        run_dir = RunDir(root / config.run_name)
        if resume and not (run_dir.path / "config.yaml").is_file():
            close = closest_names(config.run_name, run_names(root), limit=1)
            guess = f" (did you mean run_name={close[0]}?)" if close else ""
            raise UserError(f"--resume found no run in {run_dir.path} (it has no config.yaml){guess}; check "
                            f"run_name and output_dir, or drop --resume to start a new run")
        if not resume and run_dir.path.is_dir() and any(run_dir.path.iterdir()):
            raise UserError(f"run directory {run_dir.path} already exists; pass --resume to continue it "
                            f"or set run_name to a new name")
        return run_dir
    if resume:
        wanted = _comparable(config_to_dict(config))
        candidates = sorted(root.glob("*/config.yaml"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in candidates:
            try:
                saved = config_to_dict(read_saved_config(RunDir(path.parent)))
            except UserError:
                continue  # a damaged run directory, or one of an older deltatune: not this run
            if _comparable(saved) == wanted:
                return RunDir(path.parent)
        raise UserError(f"--resume found no earlier run of this config under {root}; set run_name to the run to continue")
    source = Path(config.model.name.split(":")[-1])
    if source.name.startswith("merged") and (source.parent / "config.yaml").is_file():
        source = source.parent  # a finished run used as the model (`with_run_as_model`): name the new run after it
    name = f"{source.stem}-{config.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Another run of the same second (a shell loop) took the name: number this one. Two started at the same
    # instant both pass here; writing config.yaml decides which owns the directory (RunDir.write_config).
    names = itertools.chain([name], (f"{name}-{number}" for number in itertools.count(2)))
    return RunDir(root / next(candidate for candidate in names if not (root / candidate).exists()))


def _comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run when resuming without a run_name: its config, less where it is and what a resume may
    change (so `--resume train.max_steps=N` finds the run it extends)."""
    return {key: value for key, value in flatten(config_dict).items() if key not in LOCATION and key not in RESUMABLE}


def train(config: RunConfig, resume: bool = False, echo=print,
          on_evaluation: Callable[[int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Fine-tune as `config` says; returns the summary also written to the run directory. `on_evaluation(step,
    total_steps, metrics)` runs after every validation (a search's pruner raises there to stop a poor trial).

    Everything checkable is checked before the run directory is written: ranges and choices of the config, what
    --resume may change, the device, the metric, the output directory and its free space, whether a resume has
    steps left and its checkpoint loads. If the run still fails before its first step checkpoint, what it wrote is
    removed again, so the corrected command can simply be run again.

    Under torchrun every rank runs this (`deltatune.distributed`): all of them build the same run and train it on
    their shares of each batch; rank 0 alone prints, writes the run directory and measures the splits; the others
    return {} once training is done.
    """
    # Built again from its dict: a config made in Python (a plain MethodConfig, a Path for output_dir) is
    # normalised and checked exactly as YAML would be, before anything runs.
    config = parse_config(config_to_dict(config))
    if config.train.return_freed_memory:
        return_freed_memory_to_os()
    distributed.start(config.train.device)
    succeeded = False
    try:
        summary = _train(config, resume, echo if distributed.is_main() else _silent, on_evaluation)
        succeeded = True
        return summary
    finally:
        distributed.stop(succeeded)


def _ranks_entry(model: nn.Module) -> dict[str, Any]:
    """For the summary of a distributed run: how many ranks, how they shared the model, and the parameter bytes
    rank 0 held (all of them under ddp, its shards under fsdp); {} for one process."""
    if distributed.world_size() == 1:
        return {}
    return {"ranks": distributed.world_size(), "distributed": "fsdp" if sharding.model_is_sharded(model) else "ddp",
            "parameter_bytes_per_rank": sharding.local_parameter_bytes(model)}


def _silent(*_: Any, **__: Any) -> None:
    """`echo` of the ranks other than 0."""


def _train(config: RunConfig, resume: bool, echo: Callable[..., None],
           on_evaluation: Callable[[int, int, dict[str, float]], None] | None) -> dict[str, Any]:
    config = with_run_as_model(config)  # a finished run as model.name: its model, adapters folded in
    # Every rank checks; rank 0's name wins (an automatic name holds the time), and no rank writes before all
    # have checked, since the broadcast waits for all of them.
    run_dir = RunDir(distributed.broadcast_object(str(find_run_dir(config, resume).path)))
    if resume:
        config = resumed_config(run_dir, config)
    check_writable(run_dir.path)
    resolve_device(config.train.device)
    check_metric(config.train.metric, get_objective(config.objective.name, run_task(config)))
    prepared = prepare(config, run_dir.read_splits() if resume else None)
    if config.model.init_from is not None and not resume:  # a resumed run's checkpoint holds these weights already
        start_from_run(prepared.model, prepared.method, config)
    setup_objective(prepared.config, prepared.objective, prepared.model, prepared.method, prepared.device,
                    prepared.num_labels, prepared.processor, prepared.data.label_names)
    with distributed.main_first():  # rank 0 fills the objective's cache, the others read it
        precomputed = _precompute(prepared)
    calibrate(prepared)
    choices = prepared.method.choices()
    if choices:
        echo(f"method {config.method.name} chose from the training data: {choices}")
    check_free_space(run_dir.path, prepared.model)
    loop = _training_loop(prepared, run_dir)
    loop.on_evaluation = on_evaluation
    if resume:
        check_resume_point(run_dir, loop.total_steps)
    trainable, total = count_parameters(prepared.model)
    echo(_parameters_line(prepared, trainable, total))
    main = distributed.is_main()
    # Only rank 0 needs the metrics, but a sharded (FSDP) model computes a forward on every rank together.
    everyone = sharding.model_is_sharded(prepared.model)
    before = _metrics_before(prepared, run_dir, resume) if main or everyone else {}  # before a checkpoint loads
    echo(format_metrics("before", before))
    resumed = resume and loop.resume()
    with _removed_on_failure(run_dir) if main else contextlib.nullcontext():
        if main:
            _write_run_files(run_dir, prepared, before, resume, loop.state.step if resumed else None)
            if precomputed:
                write_checkpoint_dir(run_dir.path / "precomputed", precomputed, {"objective": prepared.objective.name})
        if resumed:
            echo(f"resumed from step {loop.state.step} of {loop.total_steps}")
        state = loop.run()
        distributed.barrier()  # best/ and the last checkpoint are written before anyone goes on
        if not (main or everyone):
            return {}
        if holds_weights(run_dir.best):
            load_weights(prepared.model, prepared.method, read_weights(run_dir.best)[0])
        save_final_weights(run_dir, prepared)
        after = split_metrics(prepared)
        if not main:
            return {}
    echo(format_metrics("after", after))
    summary = {"run_dir": str(run_dir.path), "task": prepared.task, "method": config.method.name,
               "trainable_parameters": trainable, "total_parameters": total, **_loop_entries(state),
               "before": before, "after": after, **({"method_choices": choices} if choices else {}),
               **_ranks_entry(prepared.model)}
    run_dir.write_summary(summary)
    echo(f"run saved in {run_dir.path}")
    return summary


def _parameters_line(prepared: Prepared, trainable: int, total: int) -> str:
    config = prepared.config
    ranks = f", {distributed.world_size()} ranks" if distributed.world_size() > 1 else ""
    return (f"model {config.model.name} ({prepared.task}), method {config.method.name}: {trainable:,} of {total:,} "
            f"parameters train ({100 * trainable / total:.3f}%), device {prepared.device}{ranks}")


def _loop_entries(state: LoopState) -> dict[str, Any]:
    """What the summary keeps of the loop's final state."""
    return {"steps": state.step, "best_step": state.best_step, "stopped_early": state.stopped_early,
            "train_seconds": round(state.seconds, 1),
            "tokens_per_second": round(state.tokens / max(state.seconds, 1e-9), 1)}


def enable_gradient_checkpointing(model: nn.Module, wanted: bool) -> None:
    """transformers' activation checkpointing, non-reentrant (which also works when the inputs of the first block
    need no gradient, as with adapters on a frozen base)."""
    if not wanted:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError("train.gradient_checkpointing needs a transformers model that supports it; set "
                        "train.gradient_checkpointing=false for this model")
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x; the older name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def compile_model(model: nn.Module) -> None:
    """`torch.compile` in place (`nn.Module.compile`: parameter names and checkpoints stay as they are), with the
    compiled kernels cached on disk so a second run of the same model starts fast."""
    import os

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "deltatune" / "inductor"))
    model.compile(dynamic=True)


def _training_loop(prepared: Prepared, run_dir: RunDir) -> TrainingLoop:
    """The loop over the prepared run, with the model's speed options (checkpointing, compile) switched on."""
    data, train_config = prepared.data, prepared.config.train
    enable_gradient_checkpointing(prepared.model, train_config.gradient_checkpointing)
    if train_config.distributed == "fsdp" and distributed.world_size() > 1:
        from deltatune.models.families import family_of

        sharding.shard_model(prepared.model, family_of(prepared.model, prepared.config.model.family), prepared.device)
    if train_config.compile:
        compile_model(prepared.model)
    validation = Batches(data.validation, data.collate, split="validation") if data.validation else None
    training_data = Batches(data.train, data.collate, train_config.group_by_length)
    return TrainingLoop(prepared.model, prepared.method, prepared.objective, training_data, validation, train_config,
                        run_dir, prepared.device)


def _write_run_files(run_dir: RunDir, prepared: Prepared, before: dict[str, Any], resume: bool,
                     resumed_step: int | None) -> None:
    """The first writes of a run: its config (claiming the directory, for a new run), splits and 'before' metrics;
    on resume, drop the metrics records the interrupted run logged after its checkpoint, or all of them when it
    stopped before its first checkpoint (they will be logged again)."""
    run_dir.create()
    run_dir.write_config(config_to_dict(prepared.config), claim=not resume)
    run_dir.write_splits(prepared.data.splits)
    write_json_atomic(run_dir.path / "before.json", before)
    if resume:
        run_dir.truncate_metrics_after(resumed_step if resumed_step is not None else -1)


@contextlib.contextmanager
def _removed_on_failure(run_dir: RunDir) -> Iterator[None]:
    """When the block fails while the run directory holds no step checkpoint, remove what the block added to it:
    nothing there could be resumed, and a leftover config.yaml would turn the corrected rerun away with "already
    exists". Ctrl-C is left alone: it exits 130 and `--resume` continues."""
    existed = run_dir.path.is_dir()
    kept = set(run_dir.path.iterdir()) if existed else set()
    try:
        yield
    except RunDirTaken:
        raise  # the directory and all in it belong to the run that claimed it first
    except Exception:
        if not step_checkpoints(run_dir.checkpoints):
            if existed:
                for path in set(run_dir.path.iterdir()) - kept:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            else:
                shutil.rmtree(run_dir.path, ignore_errors=True)
        raise


def _metrics_before(prepared: Prepared, run_dir: RunDir, resume: bool) -> dict[str, dict[str, float]]:
    """Metrics of the untrained model; stored (by `train`) so a resumed run reports the same 'before' without
    recomputing."""
    path = run_dir.path / "before.json"
    if resume and path.exists():
        return read_json(path, "delete it to measure the untrained model again")
    return split_metrics(prepared)


def save_final_weights(run_dir: RunDir, prepared: Prepared) -> None:
    """The final trainable weights into `weights/` (gathered on every rank when sharded; rank 0 writes)."""
    weights = weights_to_save(prepared.model, prepared.method)
    if distributed.is_main():
        write_checkpoint_dir(run_dir.weights, {"model": weights}, {"method": config_to_dict(prepared.config.method)})
