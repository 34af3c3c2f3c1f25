"""Fully sharded data parallel (`train.distributed: fsdp`): torch's FSDP2 (`fully_shard`) for runs whose weights,
gradients and AdamW moments do not fit one device. Each block, then the whole model, is sharded over all ranks:
a rank keeps 1/N of every parameter (and of its gradient and optimizer state), all-gathers a block's weights just
before the block runs and frees them after, and reduce-scatters the gradients in backward (averaged over ranks, as
the data-parallel all-reduce does; the per-rank loss weights of `deltatune.distributed.share` apply unchanged).

Parameters become DTensors. What leaves the process (checkpoints, best/ and final weights, optimizer state) is
gathered into full tensors first, on every rank at once (a collective), and written by rank 0; what comes back (a
resume, best/ before the final evaluation) is sharded again like the parameter it belongs to. So checkpoints of an
FSDP run are ordinary full tensors, loadable by one process or by DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.models.families import Family


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def model_is_sharded(model: nn.Module) -> bool:
    return any(is_sharded(param) for param in model.parameters())


def shard_model(model: nn.Module, family: Family, device: torch.device) -> None:
    """`fully_shard` each repeated block, then the root (embeddings, head and whatever lies outside the blocks),
    over a 1-D mesh of every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from deltatune import distributed
    from deltatune.models.student import block_list

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    _, _, blocks = block_list(model, family, "train.distributed=fsdp")
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=_scalars(block))
    # The root (embeddings, head) would by default stay gathered between forward and backward; sharding it again
    # costs one more all-gather and keeps the per-rank parameter memory at 1/N between steps.
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=_scalars(model))


def _scalars(module: nn.Module) -> set[nn.Parameter] | None:
    """0-d parameters (a dual encoder's logit scale), which FSDP2 cannot shard: they stay whole on every rank, and
    the training loop averages their gradients as it does any parameter FSDP does not hold."""
    return {param for param in module.parameters() if param.dim() == 0} or None


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank when sharded: all ranks must call this together)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`value` (a full tensor) sharded as `reference` is; unchanged when `reference` is not sharded."""
    if not is_sharded(reference) or is_sharded(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(reference.dtype), reference.device_mesh, reference.placements)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds between steps (its shards; whole tensors where not sharded)."""
    if callable(getattr(model, "reshard", None)):  # an FSDP module: free what the last forward gathered
        model.reshard()
    return sum((p.to_local() if is_sharded(p) else p).numel() * p.element_size() for p in model.parameters())


def clip_gradient_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """`clip_grad_norm_` over parameters of which FSDP may shard some (DTensor gradients) and not others (an
    objective's own head, e.g. PPO's value head): torch refuses such a mix in one norm. The total norm is
    √(‖sharded‖² + ‖whole‖²), the sharded part summed over every rank's shards; every gradient is scaled by the same
    min(1, max_norm / (norm + 1e-6)) as torch does. Returns the norm before clipping."""
    sharded = [param for param in parameters if is_sharded(param)]
    if not sharded or len(sharded) == len(parameters):
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return float(full(norm))
    squares = 0.0
    for group in (sharded, [param for param in parameters if not is_sharded(param)]):
        gradients = [param.grad for param in group if param.grad is not None]
        if gradients:
            squares += float(full(torch.nn.utils.get_total_norm(gradients))) ** 2
    norm = squares ** 0.5
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1.0:
        for param in parameters:
            if param.grad is not None:
                param.grad.mul_(coefficient)
    return norm
