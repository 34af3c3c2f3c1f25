"""Sparse-delta layers: a frozen base module whose weight gains named sparse updates, composed around it.

One adapter on one weight W (any shape, n entries) is k = ⌈density·n⌉ flat positions `indices` (a fixed buffer,
sorted) and their trainable deltas `values` (k,):   W' = W + Δ,  Δ = scatter(indices, values)  (zero elsewhere).

Forward materialises W' = W.flatten().index_add(indices, values) (one weight-sized copy plus a k-entry scatter) and
runs the base computation with it, so Linear, Conv1d/2d/3d (grouped ones too), transformers' Conv1D, Embedding and
norms all work. Backward gives ∂L/∂values = (∂L/∂W')[indices]: the optimizer, its state and the saved file hold k
numbers per weight. Autograd still forms the dense ∂L/∂W' for the gather, so a step costs about what full
fine-tuning's backward costs; what sparse fine-tuning saves is optimizer memory and storage, not FLOPs.

Until indices are chosen (gradient/Fisher selection waits for calibration data) they hold -1 and the layer gives
the base output; training it then is a UserError rather than training arbitrary entries. Implements the adapter
protocol (`deltatune.methods.shared.protocol`): merge writes W + Δ into W at the k positions and remembers the k
original entries, so unmerge restores W bit for bit; combine adds sparse deltas (Ansell et al., 2022's composition).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import UserError
from deltatune.methods.base import WrapperLayer
from deltatune.methods.shared.model_surgery import replace_module
from deltatune.methods.shared.switch import MergeableSwitch

UNCHOSEN = -1  # index value meaning "not selected yet"
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SparseDelta(nn.Module):
    """One adapter's update of one weight: trainable `values` at the fixed flat positions `indices`."""

    def __init__(self, k: int, like: Tensor) -> None:
        super().__init__()
        self.register_buffer("indices", torch.full((k,), UNCHOSEN, dtype=torch.long, device=like.device))
        self.values = nn.Parameter(torch.zeros(k, dtype=like.dtype, device=like.device))
        self._chosen = False

    def choose(self, indices: Tensor) -> None:
        """Fix the trained positions (flat, into the weight); sorted so the scatter walks memory in order."""
        if indices.shape != self.indices.shape:
            raise ValueError(f"expected {self.indices.numel()} positions, got {tuple(indices.shape)}")
        self.indices.copy_(indices.sort().values)
        self._chosen = True

    def is_chosen(self) -> bool:
        if not self._chosen:
            # Reading the buffer waits for the device, so only until positions are seen; they may also arrive by
            # a checkpoint copying the buffer in directly, which is why this is not just a flag set by `choose`.
            self._chosen = self.indices.numel() > 0 and bool(self.indices.min() >= 0)
        return self._chosen

    def recheck(self) -> None:
        """Forget the cached answer of `is_chosen` (after the buffer was overwritten)."""
        self._chosen = False

    def apply_to(self, weight: Tensor) -> Tensor:
        """W + Δ as a new tensor shaped like `weight`, differentiable in `values`."""
        return weight.reshape(-1).index_add(0, self.indices, self.values.to(weight.dtype)).view_as(weight)


class SparseDeltaLayer(MergeableSwitch, WrapperLayer):
    """A base module plus named sparse deltas on its `weight`; the active one (if any) is added in forward."""

    peft_type: ClassVar[str | None] = None  # PEFT has no sparse type; adapter files are not written for it

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.sparse_deltas = nn.ModuleDict()
        self._merged_entries: tuple[Tensor, Tensor] | None = None  # (positions, original W there) while merged

    # ---- adapters --------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, k: int) -> SparseDelta:
        self.sparse_deltas[name] = SparseDelta(k, self.base_layer.weight)
        return self.sparse_deltas[name]  # type: ignore[return-value]

    def adapter_names(self) -> list[str]:
        return list(self.sparse_deltas)

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        delta = self.sparse_deltas[name]
        return {"indices": delta.indices, "values": delta.values}

    def delete_adapter(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        del self.sparse_deltas[name]
        self._forget(name)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        name = self.active
        if name is None or not self.enabled or self.merged is not None:
            return self.base_layer(*args, **kwargs)
        delta: SparseDelta = self.sparse_deltas[name]  # type: ignore[assignment]
        if not delta.is_chosen():
            if delta.values.requires_grad and torch.is_grad_enabled():
                raise UserError("the sparse weights to train are not chosen yet (selection gradient/fisher needs "
                                "data): pass calibration=<batches> to deltatune.apply, or call "
                                "method.calibrate(model, batches, loss_fn), before training")
            return self.base_layer(*args, **kwargs)  # Δ is zero until chosen
        return self._run_with_weight(delta.apply_to(self.base_layer.weight), args, kwargs)

    def _run_with_weight(self, weight: Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The base module's computation with `weight` in place of its own."""
        base = self.base_layer
        if len(args) == 1 and not kwargs:
            if type(base) is nn.Linear:
                return F.linear(args[0], weight, base.bias)
            if type(base) in _CONVOLUTIONS:
                return base._conv_forward(args[0], weight, base.bias)  # honours padding_mode and groups
        # Any other module type: its own forward with the weight swapped for this call only.
        return torch.func.functional_call(base, {"weight": weight}, args, kwargs)

    # ---- merge -----------------------------------------------------------------------------------------------
    def merge(self) -> None:
        """W[indices] += values for the active adapter; the k original entries are kept for an exact unmerge."""
        name = self.active
        if self.merged is not None or name is None or not self.enabled:
            return
        delta: SparseDelta = self.sparse_deltas[name]  # type: ignore[assignment]
        if not delta.is_chosen():
            return  # nothing chosen: Δ = 0, the base already is the adapted weight
        with torch.no_grad():
            flat = self.base_layer.weight.view(-1)
            positions = delta.indices.clone()
            self._merged_entries = (positions, flat[positions].clone())
            # The same index_add as forward, so merged outputs equal unmerged ones exactly.
            flat.index_add_(0, positions, delta.values.to(flat.dtype))
        self.merged = name

    def unmerge(self) -> None:
        """Write the k original entries back: W is restored exactly, with no rounding from subtracting."""
        if self.merged is None or self._merged_entries is None:
            self.merged = None
            return
        positions, original = self._merged_entries
        with torch.no_grad():
            self.base_layer.weight.view(-1).index_copy_(0, positions, original)
        self.merged, self._merged_entries = None, None

    def weights_changed_by_merge(self) -> list[Tensor]:
        return [self.base_layer.weight]

    def unwrap(self) -> nn.Module:
        """The plain base module, which after `merge` computes what this layer computes."""
        return self.base_layer

    def combine(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        """Adapter `new_name` with Δ = Σ wᵢ·Δᵢ on the union of the positions (frozen, like a loaded adapter)."""
        present = [(self.sparse_deltas[name], weight) for name, weight in zip(names, weights)
                   if name in self.sparse_deltas]
        if not present:
            return
        if not all(delta.is_chosen() for delta, _ in present):
            raise UserError("cannot combine sparse adapters whose weights are not chosen yet; calibrate them first")
        positions = torch.cat([delta.indices for delta, _ in present])
        values = torch.cat([weight * delta.values.detach() for delta, weight in present])
        union, slot = torch.unique(positions, sorted=True, return_inverse=True)
        combined = self.add_adapter(new_name, union.numel())
        with torch.no_grad():
            combined.choose(union)
            combined.values.zero_().index_add_(0, slot, values.to(combined.values.dtype))
        combined.values.requires_grad_(False)

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{name}: k={delta.values.numel()}" for name, delta in self.sparse_deltas.items())
        return f"adapters=[{sizes}], active={self.active!r}, merged={self.merged!r}"


def wrap(model: nn.Module, module_name: str, module: nn.Module) -> SparseDeltaLayer:
    """Replace `module` (named `module_name` in `model`) by a sparse-delta layer around it."""
    if not module_name:
        raise UserError("sparse cannot wrap the model itself; put the layer inside a module (e.g. nn.Sequential)")
    if not module.weight.is_contiguous():
        raise UserError(f"sparse needs {module_name}.weight contiguous in memory (its flat positions index it); "
                        f"call .contiguous() on it before applying the method")
    layer = SparseDeltaLayer(module)
    replace_module(model, module_name, layer)
    return layer
