"""Which weights fine-tuning moved and how: every tensor the tuned model shares by name with the base model and that
differs from it, with its relative change and, for the matrices inside the blocks, the effective rank of ΔW and
the intruder dimensions of the tuned matrix (deltatune.insight.weights). A LoRA-family run is compared after its
adapters are folded into the weights (`adapters.merge_and_unload`), so ΔW is exactly the merged update B·A·α/r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.insight.weights import as_matrix, effective_rank, intruder_dimensions, relative_change
from deltatune.methods.shared.targets import is_conv1d
from deltatune.models.families import Family


@dataclass(frozen=True)
class WeightChange:
    name: str
    block: int | None  # the block the tensor belongs to; None outside the blocks (embeddings, head)
    shape: tuple[int, ...]
    relative: float  # ‖ΔW‖_F / ‖W‖_F
    effective_rank: float | None  # of ΔW; matrices inside blocks only
    intruders: int | None  # of the top-k singular vectors of W_tuned; matrices inside blocks only


def weight_changes(base: nn.Module, tuned: nn.Module, family: Family, top_k: int = 10) -> list[WeightChange]:
    """Every changed tensor of `tuned` that `base` has under the same name and shape, in `tuned`'s order."""
    base_state = base.state_dict()
    changes = []
    for name, after in tuned.state_dict().items():
        before = base_state.get(name)
        if before is None or before.shape != after.shape or not after.is_floating_point():
            continue
        before, after = before.detach().cpu(), after.detach().cpu()
        if torch.equal(before.to(after.dtype), after):
            continue
        block = family.block_index(name)
        spectral = block is not None and after.dim() >= 2 and min(as_matrix(after).shape) > 1
        delta = after.double() - before.double()
        # Intruder dimensions are singular vectors of the output side: GPT-2's Conv1D stores (in, out), so turn it.
        owner = tuned.get_submodule(name.rpartition(".")[0]) if "." in name else tuned
        oriented = (before.T, after.T) if spectral and after.dim() == 2 and is_conv1d(owner) else (before, after)
        changes.append(WeightChange(
            name, block, tuple(after.shape), relative_change(before, after),
            effective_rank(delta) if spectral else None,
            intruder_dimensions(*oriented, top_k) if spectral else None))
    return changes


def change_by_block(changes: list[WeightChange], num_blocks: int) -> list[float]:
    """Per block, the mean relative change of its changed tensors (0 where a block did not change)."""
    totals = [[] for _ in range(num_blocks)]
    for change in changes:
        if change.block is not None and change.block < num_blocks:
            totals[change.block].append(change.relative)
    return [sum(values) / len(values) if values else 0.0 for values in totals]
