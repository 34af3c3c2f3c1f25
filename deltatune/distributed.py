"""Data-parallel training over several processes with torch.distributed, launched by torchrun.

Every rank builds the same model from the same seed, draws the same seeded epoch order and takes its own contiguous
share of each micro-batch; after the backward pass the trainable gradients are averaged across ranks with one
all-reduce per optimizer step (gloo on CPU, NCCL on CUDA), so every rank applies the same update and the weights
stay identical without ever being sent again.

`train.batch_size` is the *global* micro-batch: with N ranks each rank computes about batch_size/N of it. So a run
takes the same optimizer steps whatever N is (a 2-rank run with batch 32 makes the steps of one process with batch
32), a checkpoint resumes on a different number of ranks, and the learning rate needs no rescaling. Each rank's
loss is weighted by its share of the batch (n_r · N / n), so the averaged gradient is exactly the gradient of the
whole batch's mean loss, also when the last batch does not split evenly.

Why an explicit all-reduce instead of wrapping the model in `DistributedDataParallel`: DDP only synchronises
gradients of forwards that go through its wrapper, while objectives call the model in other ways too (PPO
generates, DPO switches adapters off for the reference, distillation reads hidden states through hooks); a
forward that bypasses the wrapper would silently train each rank on its own data. Reducing the flattened gradients
after backward is correct for every method and objective; what it gives up is overlapping communication with the
backward pass, which matters on many GPUs and not on CPU.

Outside torchrun (no WORLD_SIZE in the environment) every function here is a cheap no-op: one process, rank 0.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from deltatune.errors import UserError

# A rank may wait this long for the others (rank 0 evaluating or writing a checkpoint while the rest wait).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("DELTATUNE_DIST_TIMEOUT_MINUTES", "60")))
Result = TypeVar("Result")


def _collective(function: Callable[..., Result]) -> Callable[..., Result]:
    """A collective that loses a peer (another rank crashed or was killed) ends this rank with one line, not a
    gloo/NCCL traceback: the cause is in the other rank's output, and the launcher names it."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Result:
        try:
            return function(*args, **kwargs)
        except RuntimeError as error:
            if not dist.is_initialized():
                raise
            lines = str(error).strip().splitlines() or [type(error).__name__]
            detail = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0][:120]  # drop gloo's source location
            raise UserError(f"lost contact with the other ranks during {function.__name__} ({detail}); another "
                            f"rank stopped, see its output") from error

    return wrapper


def launched_world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device_name: str) -> None:
    """Join the process group torchrun set up, once per process: NCCL when this run trains on CUDA, gloo
    otherwise; each rank on CUDA takes the GPU of its LOCAL_RANK. Nothing happens outside torchrun."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return
    on_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)


def stop(succeeded: bool = True) -> None:
    """Leave the process group (at the end of a run), so the process exits cleanly.

    Why the barrier first: gloo's worker threads release a finished collective's tensors after the caller has
    already moved on; when those tensors are Python-owned (all_gather_object's) and the interpreter is shutting
    down by then, the release cannot take the GIL and the rank dies with SIGABRT ("terminate called without an
    active exception") after a run that succeeded. Waiting in one more collective gives those threads the GIL.
    A rank that failed skips it: its peers may be gone, and it would wait the whole collective timeout."""
    if dist.is_initialized():
        if succeeded:
            with contextlib.suppress(RuntimeError):
                # two: one barrier was seen to leave the release still pending once in a few hundred runs
                dist.barrier()
                dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    """This process's index on its own machine (which GPU it takes)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes the run directory, logs and shows progress."""
    return rank() == 0


@_collective
def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (writing a cache), the others after it (reading what it wrote)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def share(indices: Sequence[int]) -> tuple[list[int], float]:
    """This rank's contiguous share of a global micro-batch and the weight of its loss: n_r · N / n, so that the
    average over ranks of the weighted per-rank mean losses is the mean loss of the whole batch. A rank left
    without examples (a last batch smaller than N) computes the first example at weight 0, because every rank must
    take part in the gradient all-reduce."""
    ranks, index = world_size(), rank()
    if ranks == 1:
        return list(indices), 1.0
    total = len(indices)
    start, end = index * total // ranks, (index + 1) * total // ranks
    if start == end:
        return list(indices[:1]), 0.0
    return list(indices[start:end]), (end - start) * ranks / total


def collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@_collective
def average_gradients(parameters: Sequence[torch.nn.Parameter], extra: Sequence[float]) -> list[float]:
    """Average the gradients of `parameters` across ranks in place with one all-reduce (a parameter without a
    gradient on a rank counts as zeros there; one without a gradient on every rank keeps none, as in one process,
    so AdamW leaves it alone), and return the average of the `extra` numbers (loss, tokens) sent in the same
    message."""
    if world_size() == 1:
        return list(extra)
    device = parameters[0].device if parameters else collective_device()
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in parameters]
    has_gradient = [float(p.grad is not None) for p in parameters]
    flat = torch.cat([*pieces, torch.tensor([*has_gradient, *extra], dtype=torch.float32, device=device)])
    dist.all_reduce(flat)
    flat /= world_size()
    offset, flags = 0, flat[sum(p.numel() for p in parameters):][:len(parameters)].tolist()
    for param, anywhere in zip(parameters, flags):
        count = param.numel()
        averaged = flat[offset : offset + count].view_as(param).to(param.dtype)
        if anywhere == 0:
            param.grad = None
        elif param.grad is None:
            param.grad = averaged.clone()
        else:
            param.grad.copy_(averaged)
        offset += count
    return flat[offset + len(parameters):].tolist()


@_collective
def sum_across_ranks(value: float) -> float:
    """The sum over ranks of `value` (one tiny all-reduce)."""
    if world_size() == 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(total)
    return float(total.item())


@_collective
def broadcast_from_main(tensors: Sequence[torch.Tensor]) -> None:
    """Give every rank rank 0's values of `tensors` (trainable weights and buffers at the start of training)."""
    if world_size() == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


@_collective
def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. a run directory name that holds a timestamp)."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@_collective
def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_same_on_all_ranks(value: Any, what: str) -> None:
    """A UserError when the ranks disagree about `value` (e.g. which parameters train): they would deadlock or
    silently train different models."""
    values = gather_objects(value)
    if any(other != values[0] for other in values[1:]):
        raise UserError(f"the {world_size()} ranks disagree about {what}; every rank must build the same run (same "
                        f"config, data files and deltatune version on every machine)")
