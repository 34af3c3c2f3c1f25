"""Bottleneck adapter layers: a frozen module whose output passes through named residual bottlenecks.

Houlsby et al. (2019), "Parameter-Efficient Transfer Learning for NLP": after a sublayer's output h ∈ R^d,

    y = h + W_up · f(W_down · h + b_down) + b_up,    W_down ∈ R^{m×d}, W_up ∈ R^{d×m}, m = d // reduction_factor

with a non-linearity f. W_up and b_up start at zero, so y = h exactly at init; W_down starts small (truncated
normal, std 1e-2: the paper's near-identity init), so W_up has a non-zero gradient from the first step.

Pfeiffer et al. (2021) read the adapter's input after the block's norm instead: in a post-norm block whose
feed-forward result h joins the residual x as s = h + x and is normalised, N(s), the adapter reads z = N(s) and its
update joins the sum before the norm, `NormBottleneckLayer` (it wraps the norm N):

    y = N(s + a(z)),    z = N(s),    a(z) = W_up · f(W_down · z + b_down) + b_up

(AdapterHub's seq_bn: residual before the norm, the original norm before and after). At init a = 0, so y = N(s).

A layer may also hold compositions (`Composition`): modules that combine the updates of several of its bottlenecks
into one (AdapterFusion, in `adapter_fusion.py`). The layer computes each fused bottleneck's update aᵢ = a_i(h) and
adds the composition's result:  y = h + c(h, [a₁ … aₙ])  (in the norm form, y = N(s + c(z, [a₁ … aₙ]))).

Implements the adapter protocol (`deltatune.methods.shared.protocol`). A bottleneck is not linear in its input, so
it cannot be folded into a weight (merge refuses) nor averaged with another as a weighted sum (combine refuses; fuse
them instead). Files: keys `adapter_down.weight`, `adapter_down.bias`, `adapter_up.weight`, `adapter_up.bias` relative
to the adapted module, under deltatune's own adapter type DELTATUNE_ADAPTER (PEFT has no bottleneck adapters).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import UserError
from deltatune.methods.base import WrapperLayer
from deltatune.methods.shared.model_surgery import replace_module
from deltatune.methods.shared.switch import AdapterSwitch
from deltatune.methods.shared.targets import is_conv1d

PEFT_TYPE = "DELTATUNE_ADAPTER"
FILE_KEYS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
NON_LINEARITIES: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
                                                          "tanh": torch.tanh}
# How a run's saved trainable state names a bottleneck tensor: <module>.bottlenecks.<adapter>.<file key>
_SAVED_KEY = re.compile(r"^(?P<module>.+)\.bottlenecks\.(?P<adapter>[^.]+)\."
                        r"(?P<key>adapter_(?:down|up)\.(?:weight|bias))$")


def output_size(module: nn.Module) -> int | None:
    """The width of a Linear-like module's output (nn.Linear, transformers' Conv1D) or of a LayerNorm over the last
    dimension, or None for other modules."""
    if is_conv1d(module):
        return int(module.nf)
    if is_norm(module):
        return int(module.normalized_shape[-1])
    size = getattr(module, "out_features", None)
    return size if isinstance(size, int) else None


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm-like module (torch's LayerNorm and RMSNorm both carry `normalized_shape`)."""
    shape = getattr(module, "normalized_shape", None)
    return isinstance(shape, tuple) and len(shape) == 1


def like_options(like: Tensor | None) -> dict[str, object]:
    """Create new weights beside the base weight (same device; its dtype unless it stores integer codes)."""
    if like is None:
        return {}
    return {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}


class Bottleneck(nn.Module):
    """One adapter: the update W_up · f(W_down · h + b_down) + b_up (the layer adds the residual h)."""

    def __init__(self, size: int, bottleneck_size: int, non_linearity: str, like: Tensor | None = None) -> None:
        super().__init__()
        self.non_linearity = non_linearity
        self.adapter_down = nn.Linear(size, bottleneck_size, **like_options(like))
        self.adapter_up = nn.Linear(bottleneck_size, size, **like_options(like))
        with torch.no_grad():
            nn.init.trunc_normal_(self.adapter_down.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.adapter_up(NON_LINEARITIES[self.non_linearity](self.adapter_down(hidden)))

    def extra_repr(self) -> str:
        return f"non_linearity={self.non_linearity}"


class Composition(nn.Module):
    """Combines the updates of several bottlenecks of one layer into one update; subclasses define `forward`."""

    def __init__(self, fused: Sequence[str]) -> None:
        super().__init__()
        self.fused = list(fused)

    def forward(self, hidden: Tensor, updates: Tensor) -> Tensor:
        """The combined update from the sublayer output `hidden` (..., d) and the updates (..., n, d)."""
        raise NotImplementedError


class BottleneckLayer(AdapterSwitch, WrapperLayer):
    """A base module plus named bottlenecks (and compositions of them) applied to its output."""

    peft_type: ClassVar[str | None] = PEFT_TYPE

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottlenecks = nn.ModuleDict()
        self.compositions = nn.ModuleDict()

    @property
    def size(self) -> int:
        size = output_size(self.base_layer)
        assert size is not None, "the methods only wrap Linear-like modules and LayerNorms"
        return size

    @property
    def base_weight(self) -> Tensor | None:
        """What new bottlenecks take their device and dtype from: the wrapped module's weight, else any tensor it
        holds. A module with none (LayerNorm without affine parameters) gives fp32 on the CPU, which is right where
        deltatune applies methods, before the model moves to its device."""
        weight = getattr(self.base_layer, "weight", None)
        if isinstance(weight, Tensor):
            return weight
        return next(iter([*self.base_layer.parameters(), *self.base_layer.buffers()]), None)

    # ---- adapters --------------------------------------------------------------------------------------------
    def add_bottleneck(self, name: str, bottleneck_size: int, non_linearity: str,
                       tensors: dict[str, Tensor] | None = None, trainable: bool = True) -> None:
        """Create bottleneck `name`, near-identity initialised or copied from file-keyed `tensors`."""
        module = Bottleneck(self.size, bottleneck_size, non_linearity, self.base_weight)
        if tensors is not None:
            module.load_state_dict(tensors)
        for param in module.parameters():
            param.requires_grad_(trainable)
        self.bottlenecks[name] = module

    def add_composition(self, name: str, composition: Composition) -> None:
        missing = [fused for fused in composition.fused if fused not in self.bottlenecks]
        if missing:
            raise ValueError(f"composition {name!r} fuses adapters this layer lacks: {missing}")
        self.compositions[name] = composition

    def bottleneck(self, name: str) -> Bottleneck:
        """Bottleneck `name`; a UserError when `name` is a composition (it has no single adapter's weights)."""
        if name in self.compositions:
            raise UserError(f"adapter {name!r} is a fusion of {self.compositions[name].fused}, which save_adapter "
                            f"cannot write; its training run's weights/ hold it (rebuilt from the run's config)")
        return self.bottlenecks[name]  # type: ignore[return-value]

    def adapter_names(self) -> list[str]:
        return [*self.bottlenecks, *self.compositions]

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return dict(self.bottleneck(name).state_dict())

    def delete_adapter(self, name: str) -> None:
        users = [other for other, composition in self.compositions.items() if name in composition.fused]
        if users:
            raise UserError(f"adapter {name!r} is fused by {users[0]!r}; delete_adapter {users[0]!r} first")
        holder = self.compositions if name in self.compositions else self.bottlenecks
        del holder[name]
        self._forget(name)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        hidden = self.base_layer(x)
        update = self.update(hidden)
        return hidden if update is None else hidden + update

    def update(self, hidden: Tensor) -> Tensor | None:
        """The active adapter's (or composition's) update from the adapters' input; None when none is active."""
        name = self.active
        if name is None or not self.enabled:
            return None
        if name in self.bottlenecks:
            return self.bottlenecks[name](hidden)
        composition = self.compositions[name]
        updates = torch.stack([self.bottlenecks[fused](hidden) for fused in composition.fused], dim=-2)
        return composition(hidden, updates)

    # ---- merge and combination: not expressible for a non-linear update -----------------------------------------
    def merge(self) -> None:
        """Refuse while an adapter is active: f(W_down·h) depends on the input, so no weight change equals it."""
        if self.active is not None and self.enabled:
            raise UserError(f"adapter {self.active!r} is a bottleneck adapter, which cannot be merged into the base "
                            f"weights (its non-linearity depends on the input); keep it unmerged, or use lora")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def weights_changed_by_merge(self) -> list[Tensor]:
        return []

    def unwrap(self) -> nn.Module:
        """The base module: what this layer computes whenever `merge` succeeds (no adapter active)."""
        return self.base_layer

    def combine(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        held = [name for name in names if name in self.adapter_names()]
        if held:
            raise UserError(f"bottleneck adapters ({', '.join(held)}) cannot be combined as a weighted sum: their "
                            f"update is not linear in the weights; fuse them with method adapter_fusion instead")

    def extra_repr(self) -> str:
        described = [f"{name}: m={module.adapter_down.out_features} {module.non_linearity}"
                     for name, module in self.bottlenecks.items()]
        described += [f"{name}: fusion of {module.fused}" for name, module in self.compositions.items()]
        return f"adapters=[{', '.join(described)}], active={self.active!r}"


class NormBottleneckLayer(BottleneckLayer):
    """Pfeiffer's position: wraps the norm N after a post-norm block's residual add s; y = N(s + a(N(s)))."""

    def forward(self, x: Tensor) -> Tensor:
        normed = self.base_layer(x)
        update = self.update(normed)
        # The update joins the residual sum before the norm, so the block's output stays normalised (the norm runs
        # twice: once for the adapters' input, once for the output).
        return normed if update is None else self.base_layer(x + update)


def wrap(model: nn.Module, module_name: str, module: nn.Module) -> BottleneckLayer:
    """Replace `module` (named `module_name` in `model`) by a bottleneck layer around it: the norm form around a
    LayerNorm, the output form around a Linear."""
    layer = NormBottleneckLayer(module) if is_norm(module) else BottleneckLayer(module)
    replace_module(model, module_name, layer)
    return layer


def file_keyed(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A run's saved trainable state (one trained adapter) in file keys: `<module>.adapter_down.weight`, ...; other
    tensors (e.g. the head's copy) are left out. A UserError when the state holds several adapters."""
    found: dict[str, Tensor] = {}
    adapters: set[str] = set()
    for key, tensor in state.items():
        match = _SAVED_KEY.match(key)
        if match:
            adapters.add(match["adapter"])
            found[f"{match['module']}.{match['key']}"] = tensor
    if len(adapters) > 1:
        raise UserError(f"the saved weights hold several bottleneck adapters ({sorted(adapters)}); save the one to "
                        f"use with deltatune.save_adapter and give that directory instead")
    return found
