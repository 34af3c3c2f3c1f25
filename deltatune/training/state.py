"""What the training loop must remember to continue exactly where it stopped."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


import torch
from torch import nn

from deltatune.errors import UserError
from deltatune.methods.base import Method
from deltatune.training import sharding
from deltatune.training.checkpoint import (
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_checkpoint_dir,
    read_json,
    step_checkpoints,
    write_checkpoint_dir,
)


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current pass over the training data
    group: int = 0  # accumulation groups of the current epoch already consumed
    best_metric: float | None = None
    best_step: int | None = None
    evaluations_without_improvement: int = 0
    stopped_early: bool = False
    seconds: float = 0.0  # training time, summed across resumes
    tokens: int = 0
    update: int = 0  # optimizer steps already taken of the current rollout (objectives with a rollout phase)


def modules_updating_statistics(model: nn.Module) -> set[str]:
    """Names of the modules whose buffers change in training: those with a trainable parameter of their own, and
    BatchNorms without affine parameters whose parent module trains (full fine-tuning moves their running
    statistics; in a frozen backbone they stay as they are, as "frozen" promises)."""
    modules, names = dict(model.named_modules()), set()
    for name, module in modules.items():
        own = list(module.parameters(recurse=False))
        if any(param.requires_grad for param in own):
            names.add(name)
        elif not own and isinstance(module, nn.modules.batchnorm._BatchNorm) and name:
            if any(param.requires_grad for param in modules[name.rpartition(".")[0]].parameters()):
                names.add(name)
    return names


def weights_to_save(model: nn.Module, method: Method) -> dict[str, torch.Tensor]:
    """The method's trainable weights plus the buffers of modules that train (e.g. BatchNorm running stats),
    which change during training just like parameters do."""
    weights = dict(method.trainable_state(model))
    updating = modules_updating_statistics(model)
    for module_name, module in model.named_modules():
        if module_name in updating:
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer_name not in module._non_persistent_buffers_set:
                    weights[f"{module_name}.{buffer_name}" if module_name else buffer_name] = buffer
    # Sharded (FSDP) weights are gathered whole: every rank must call this at the same point.
    return {name: sharding.full(tensor) for name, tensor in weights.items()}


def load_weights(model: nn.Module, method: Method, weights: dict[str, torch.Tensor]) -> None:
    """Inverse of `weights_to_save`."""
    buffers, params = dict(model.named_buffers()), dict(model.named_parameters())
    with torch.no_grad():
        for name in [name for name in weights if name in buffers]:
            buffers[name].copy_(weights.pop(name))
    # Full tensors go back into sharded (FSDP) parameters as shards of the same layout.
    method.load_trainable_state(model, {name: sharding.like(tensor, params[name]) if name in params else tensor
                                        for name, tensor in weights.items()})


def save_training_checkpoint(
    directory: Path,
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: LoopState,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model weights, optimizer, schedule, RNG and loop state; `extra` adds named tensor groups (an objective's own
    state, the rollout steps not yet taken), read back through `load_training_checkpoint`'s `extra_out`. `rng` is
    `rng_states()` of every rank (gathered by the loop, since only rank 0 writes); by default this process's."""
    from deltatune import distributed

    optimizer_tensors, optimizer_rest = optimizer_to_tensors(optimizer)
    optimizer_tensors = {name: sharding.full(tensor) for name, tensor in optimizer_tensors.items()}
    rng = rng if rng is not None else rng_states()
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    model_weights = weights_to_save(model, method)
    if not distributed.is_main():
        return  # the gathering above took every rank; rank 0 alone writes
    write_checkpoint_dir(
        directory,
        {"model": model_weights, "optimizer": optimizer_tensors, "rng": rng, **(extra or {})},
        {"loop": dataclasses.asdict(state), "optimizer": optimizer_rest, "scheduler": scheduler_state},
    )


def latest_loop_state(root: Path) -> LoopState | None:
    """The loop state saved in the newest step checkpoint under `root` (only its state.json is read), or None."""
    found = step_checkpoints(root)
    if not found:
        return None
    path = found[-1][1] / "state.json"
    state = read_json(path, f"delete {path.parent} to resume from the checkpoint before it")
    try:
        return LoopState(**state["loop"])
    except (KeyError, TypeError):
        raise UserError(f"{path} is damaged (no valid 'loop' entry); delete {path.parent} to resume from the "
                        f"checkpoint before it") from None


def flatten_steps(steps: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Optimizer steps of micro-batches as one flat tensor dict ("step.micro.key"), on the CPU, for a checkpoint."""
    return {f"{step}.{micro}.{key}": tensor.detach().cpu().contiguous()
            for step, batches in enumerate(steps) for micro, batch in enumerate(batches)
            for key, tensor in batch.items()}


def every_rank_steps(steps: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """`flatten_steps` of every rank's steps (each rank rolls out on its own share), as `every_rank` names them."""
    return every_rank(flatten_steps(steps))


def every_rank(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's `local` tensors in one dict for a checkpoint: rank 0's under their own names, rank r > 0's under
    "rank<r>." names."""
    from deltatune import distributed

    gathered = distributed.gather_objects(local)
    return {**gathered[0], **{f"rank{index}.{name}": tensor for index, tensors in enumerate(gathered[1:], 1)
                              for name, tensor in tensors.items()}}


def this_rank(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `every_rank` for this process (empty when the checkpoint has nothing of this rank)."""
    from deltatune import distributed

    index = distributed.rank()
    prefix = f"rank{index}." if index else ""
    return {name[len(prefix):]: tensor for name, tensor in tensors.items()
            if name.startswith(prefix) and (prefix or not name.startswith("rank"))}


def this_rank_steps(tensors: dict[str, torch.Tensor]) -> list[list[dict[str, torch.Tensor]]]:
    """Inverse of `every_rank_steps` for this process. A checkpoint taken in the middle of a rollout continues only
    on the number of ranks that wrote it: each rank's remaining steps are its own share's."""
    from deltatune import distributed

    ranks = 1 + max((int(name[4:].split(".", 1)[0]) for name in tensors if name.startswith("rank")), default=0)
    if ranks != distributed.world_size():
        raise UserError(f"this checkpoint was written in the middle of a rollout by {ranks} rank(s); resume it with "
                        f"--nproc {ranks} (each rank holds the rest of its own rollout)")
    return unflatten_steps(this_rank(tensors))


def unflatten_steps(tensors: dict[str, torch.Tensor]) -> list[list[dict[str, torch.Tensor]]]:
    """Inverse of `flatten_steps`."""
    steps: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        step, micro, key = name.split(".", 2)
        steps.setdefault(int(step), {}).setdefault(int(micro), {})[key] = tensor
    return [[batches[micro] for micro in sorted(batches)] for _, batches in sorted(steps.items())]


def load_training_checkpoint(
    directory: Path,
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra_out: dict[str, dict[str, torch.Tensor]] | None = None,
) -> LoopState:
    """Restore model, optimizer, schedule and RNG from a step checkpoint; a UserError naming it when it is damaged.
    The checkpoint's other tensor groups (see `save_training_checkpoint`'s `extra`) are put into `extra_out`."""
    tensors, state = read_checkpoint_dir(directory)
    if extra_out is not None:
        extra_out.update({name: group for name, group in tensors.items() if name not in ("model", "optimizer", "rng")})
    try:
        return _restore(tensors, state, model, method, optimizer, scheduler)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{directory} does not fit this run ({type(error).__name__}: {error}); delete it to resume "
                        f"from the checkpoint before it") from None


def _restore(
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict,
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> LoopState:
    load_weights(model, method, dict(tensors["model"]))
    device = next(model.parameters()).device
    # AdamW's `step` counters stay on the CPU, where a fresh optimizer keeps them (torch's load_state_dict leaves
    # them where they are): on a GPU they would cost a host sync per parameter and step.
    optimizer_state = optimizer_from_tensors(
        {k: v if k.endswith(".step") else v.to(device) for k, v in tensors.get("optimizer", {}).items()},
        state["optimizer"],
    )
    ordered = [param for group in optimizer.param_groups for param in group["params"]]
    for index, entries in optimizer_state["state"].items():  # AdamW's moments of a sharded parameter: sharded too
        for key, value in entries.items():
            if torch.is_tensor(value) and index < len(ordered) and value.shape == ordered[index].shape:
                entries[key] = sharding.like(value, ordered[index])
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    restore_rng_states(tensors["rng"])
    return LoopState(**state["loop"])


def rng_states() -> dict[str, torch.Tensor]:
    """The random-number generators' states of this process ("cpu", "cuda0", ...); in a distributed run those of
    every rank, rank r > 0 under "rank<r>." names (each rank draws its own dropout masks)."""
    local = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        local.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    if torch.backends.mps.is_available():  # dropout on an Apple GPU draws from its own generator
        local["mps"] = torch.mps.get_rng_state()
    return every_rank(local)


def restore_rng_states(rng: dict[str, torch.Tensor]) -> None:
    """Inverse of `rng_states` for this process. A rank the checkpoint has no state for (resuming on more ranks
    than it was saved with) starts a generator of its own, seeded by its rank."""
    from deltatune import distributed

    index = distributed.rank()
    mine = this_rank(rng)
    if "cpu" not in mine:
        torch.manual_seed(1_000_003 * index + int(rng["cpu"][:8].sum()))
        return
    torch.set_rng_state(mine["cpu"])
    cuda_states = [mine[f"cuda{i}"] for i in range(len(mine)) if f"cuda{i}" in mine]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    if "mps" in mine and torch.backends.mps.is_available():
        torch.mps.set_rng_state(mine["mps"])
