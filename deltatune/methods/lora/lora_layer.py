"""LoRA layers: a frozen base module plus named low-rank adapters, composed around it (never a subclass of it).

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen weight W gains a trainable
low-rank update W' = W + s·B·A, with A ∈ R^{r×in}, B ∈ R^{out×r} and s = alpha/r (rsLoRA, Kalajdzievski 2023:
s = alpha/√r). B starts at zero, so the model is unchanged at init:  y = W x + b + s·B(A(dropout(x))).

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") is a variant of the same layer, switched on
per adapter by a magnitude vector m:  W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm taken per output unit over the
input dimensions and m initialised to that norm (so again nothing changes at init). Following the paper (§4.3) the
norm is a constant for backpropagation:  y = (m / ‖W + s·B·A‖) ⊙ ((W + s·B·A) x) + b.

Layouts: every layer stores A as (r, fan_in, ...) and B as (fan_out, r, ...), so s·B.flatten(1) @ A.flatten(1) is
the update in "output-major" form (one row per output unit) for every base type. The subclasses in `layers_per_type.py`
(Linear/Conv1D, Conv2d, Embedding) only say how that maps to the base weight's own layout and how A and B are
applied to an input; everything else (forward, DoRA, merge, combination) is here, once.

Parameter names and file keys follow PEFT (`lora_A.<adapter>.weight`, `lora_embedding_A.<adapter>`, magnitudes
under `lora_magnitude_vector`), so adapters move between the two libraries unchanged. Layers implement the adapter
protocol of `deltatune.methods.shared.protocol` (set_active, set_enabled, merge, unmerge, combine, adapter_state, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import UserError
from deltatune.methods.base import WrapperLayer
from deltatune.methods.lora.fused_linear import keep_probability
from deltatune.methods.shared.switch import MergeableSwitch

MAGNITUDE_KEY = "lora_magnitude_vector"


@dataclass(frozen=True)
class LoRASettings:
    """One adapter's hyper-parameters on one layer."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    lora_dropout: float = 0.0
    use_dora: bool = False
    init_lora_weights: bool | str = True

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def check_dropout(key: str, value: float) -> None:
    """A one-line UserError unless `value` is a usable lora_dropout: in [0, 1), and not so close to 1 that the keep
    probability, drawn to 16 bits (`fused_linear.keep_mask`), rounds to 0 and the 1/q rescale divides by it."""
    in_range = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value < 1.0
    if not in_range or keep_probability(value) == 0.0:
        raise UserError(f"{key} must be in [0, 1) with 1 - p at least 2^-17 (some inputs kept), got {value!r}; "
                        f"e.g. 0.05")


class LoRALayer(MergeableSwitch, WrapperLayer):
    """Shared bookkeeping, forward, DoRA, merge and combination; subclasses supply the base-type specifics."""

    peft_type: ClassVar[str | None] = "LORA"
    factor_keys: ClassVar[tuple[str, str]] = ("lora_A.weight", "lora_B.weight")  # PEFT's file keys for A and B

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.settings: dict[str, LoRASettings] = {}
        self.merged: str | None = None  # the adapter currently folded into the base weight
        self.dropout_off = False  # `disable_dropout`: the settings (and saved files) keep their lora_dropout
        # DoRA: m/‖W+ΔW‖ at merge time, needed to unmerge exactly. A buffer so that it follows `.to()` / `.cpu()`
        # with the weight it divides; non-persistent so that state_dict and saved files never hold it.
        self._merged_ratio: Tensor | None
        self.register_buffer("_merged_ratio", None, persistent=False)

    # ---- per base type -------------------------------------------------------------------------------------
    @classmethod
    def expected_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """PEFT file key -> shape of each adapter tensor for rank r (the magnitude only for DoRA)."""
        raise NotImplementedError

    def _new_factors(self, name: str, r: int) -> None:
        raise NotImplementedError

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A, B) of adapter `name`, A as (r, fan_in, ...) and B as (fan_out, r, ...)."""
        raise NotImplementedError

    def _output_major(self, weight: Tensor) -> Tensor:
        """The base weight as a (fan_out, fan_in) matrix (a view where possible)."""
        return weight.flatten(1)

    def _to_base_layout(self, output_major: Tensor) -> Tensor:
        return output_major.reshape(self.base_layer.weight.shape)

    def _per_output(self, vector: Tensor) -> Tensor:
        """A per-output-unit vector shaped to broadcast against this layer's output."""
        return vector

    def _low_rank(self, x: Tensor, name: str) -> Tensor:
        """s·B(A(x)) in the layer's output shape."""
        raise NotImplementedError

    def _base_no_bias(self, x: Tensor) -> Tensor:
        """W x without the bias (DoRA rescales only the weight's part of the output)."""
        raise NotImplementedError

    def dropout_now(self, name: str) -> float:
        """The dropout adapter `name` applies to its input now: its lora_dropout in training, unless switched off
        (`disable_dropout`), else 0."""
        return self.settings[name].lora_dropout if self.training and not self.dropout_off else 0.0

    def _dropout(self, x: Tensor, name: str) -> Tensor:
        p = self.dropout_now(name)
        # At p=0 (and in eval) there is no dropout call at all: no mask and no copy of the input.
        return F.dropout(x, p, training=True) if p > 0 else x

    def _initialise(self, name: str, how: bool | str) -> None:
        """PEFT's choices: True = Kaiming-uniform A and zero B, "gaussian" = N(0, 1/r) A and zero B, False = the
        modules' default init (B random; for tests)."""
        lora_A, lora_B = self.factors(name)
        if how is True:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        elif how == "gaussian":
            nn.init.normal_(lora_A, std=1 / self.settings[name].r)
        if how is not False:
            nn.init.zeros_(lora_B)

    # ---- adapters --------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, settings: LoRASettings, tensors: dict[str, Tensor] | None = None) -> None:
        """Create adapter `name`, initialised per `settings` or copied from PEFT-keyed `tensors`."""
        self.settings[name] = settings
        self._new_factors(name, settings.r)
        lora_A, lora_B = self.factors(name)
        with torch.no_grad():
            if tensors is None:
                self._initialise(name, settings.init_lora_weights)
            else:
                lora_A.copy_(tensors[self.factor_keys[0]])
                lora_B.copy_(tensors[self.factor_keys[1]])
            if settings.use_dora:
                # m starts at ‖W + s·B·A‖, so the layer's output is exactly the plain LoRA output at init.
                if tensors is None:
                    magnitude = self._weight_norm(name)
                else:
                    # A file's tensor comes in the file's dtype, on the CPU (safetensors): give it the layer's, as
                    # copy_ gives A and B, or it trains in fp16 or meets CUDA tensors in the first forward.
                    magnitude = tensors[MAGNITUDE_KEY].reshape(-1).to(device=lora_A.device, dtype=lora_A.dtype)
                self.lora_magnitude_vector[name] = nn.Parameter(magnitude.clone())

    def disable_dropout(self) -> None:
        """No dropout for any adapter of the layer (`objectives.base.disable_dropout`): DPO and PPO compare
        log-probabilities the policy computes in train mode with ones computed without dropout. The adapters'
        lora_dropout stays as configured, as saved files say."""
        self.dropout_off = True

    def adapter_names(self) -> list[str]:
        return list(self.settings)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = list(self.factors(name))
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params  # type: ignore[return-value]

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        lora_A, lora_B = self.factors(name)
        state = {self.factor_keys[0]: lora_A, self.factor_keys[1]: lora_B}
        if name in self.lora_magnitude_vector:
            shape = self.expected_shapes(self.base_layer, lora_A.shape[0])[MAGNITUDE_KEY]
            state[MAGNITUDE_KEY] = self.lora_magnitude_vector[name].reshape(shape)
        return state

    def delete_adapter(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        for container in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", MAGNITUDE_KEY):
            holder = getattr(self, container, None)
            if holder is not None and name in holder:
                del holder[name]
        del self.settings[name]
        self._forget(name)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        name = self.active
        if name is None or not self.enabled or self.merged is not None:
            return self.base_layer(x)
        if name not in self.lora_magnitude_vector:
            fused = self._fused_forward(x, name)
            if fused is not None:
                return fused
        lora_in = self._dropout(x, name)
        if name in self.lora_magnitude_vector:
            return self._dora_forward(x, lora_in, name)
        return self._lora_forward(x, lora_in, name)

    def _fused_forward(self, x: Tensor, name: str) -> Tensor | None:
        """Plain LoRA in one fused step where the base type has one (see `fused_linear.py`), else None."""
        return None

    def _lora_forward(self, x: Tensor, lora_in: Tensor, name: str) -> Tensor:
        return self.base_layer(x) + self._low_rank(lora_in, name)

    def _dora_forward(self, x: Tensor, lora_in: Tensor, name: str) -> Tensor:
        ratio = self._per_output(self.lora_magnitude_vector[name] / self._weight_norm(name))
        direction = self._base_no_bias(lora_in) + self._low_rank(lora_in, name)  # (W + s·B·A) x
        if lora_in is x:
            bias = getattr(self.base_layer, "bias", None)
            return ratio * direction if bias is None else torch.addcmul(self._per_output(bias), ratio, direction)
        # With dropout, PEFT's formulation: the base path sees the undropped input, the DoRA correction the dropped:
        # y = base(x) + (m/n - 1)·W·d + (m/n)·s·B·A·d, with d = dropout(x).
        return self.base_layer(x) + ratio * direction - self._base_no_bias(lora_in)

    def _delta(self, name: str) -> Tensor:
        """s·B·A in output-major form."""
        lora_A, lora_B = self.factors(name)
        return self.settings[name].scaling * (lora_B.flatten(1) @ lora_A.flatten(1))

    def _weight_norm(self, name: str) -> Tensor:
        """‖W + s·B·A‖ per output unit, without gradient (DoRA paper §4.3)."""
        with torch.no_grad():
            weight = self._output_major(self.base_layer.weight)
            return torch.linalg.vector_norm(weight + self._delta(name), dim=1)

    # ---- merge -----------------------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the active adapter into the base weight: W += s·B·A (DoRA: W = m/‖W+s·B·A‖ ⊙ (W + s·B·A))."""
        name = self.active
        if self.merged is not None or name is None or not self.enabled:
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            merged = self._output_major(weight) + self._delta(name)
            if name in self.lora_magnitude_vector:
                self._merged_ratio = self.lora_magnitude_vector[name] / torch.linalg.vector_norm(merged, dim=1)
                merged = merged * self._merged_ratio[:, None]
            weight.copy_(self._to_base_layout(merged))
        self.merged = name

    def weights_changed_by_merge(self) -> list[Tensor]:
        return [self.base_layer.weight]

    def unwrap(self) -> nn.Module:
        """The plain base module, which after `merge` computes what this layer computes."""
        return self.base_layer

    def unmerge(self) -> None:
        """Exact inverse of `merge` (up to floating-point rounding)."""
        name = self.merged
        if name is None:
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            current = self._output_major(weight)
            if self._merged_ratio is not None:
                current = current / self._merged_ratio[:, None]
            weight.copy_(self._to_base_layout(current - self._delta(name)))
        self.merged, self._merged_ratio = None, None

    def combine(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        """Adapter `new_name` with update Σ wᵢ·sᵢ·Bᵢ·Aᵢ, exactly: the factors are concatenated along the rank
        (PEFT's "cat" combination), each side scaled by √|wᵢ·sᵢ| (A also by its sign), with scaling 1."""
        present = [(name, weight) for name, weight in zip(names, weights) if name in self.settings]
        if not present:
            return
        if any(name in self.lora_magnitude_vector for name, _ in present):
            raise UserError("DoRA adapters cannot be combined as a weighted sum (their update is not linear in the "
                            "factors); combine plain LoRA adapters, or merge a DoRA adapter instead")
        factors_A, factors_B = [], []
        for name, weight in present:
            lora_A, lora_B = self.factors(name)
            coefficient = weight * self.settings[name].scaling
            root = math.sqrt(abs(coefficient))
            factors_A.append(lora_A.detach() * math.copysign(root, coefficient))
            factors_B.append(lora_B.detach() * root)
        rank = sum(a.shape[0] for a in factors_A)
        first = self.settings[present[0][0]]
        settings = replace(first, r=rank, lora_alpha=float(rank), use_rslora=False, use_dora=False)
        self.add_adapter(new_name, settings, {self.factor_keys[0]: torch.cat(factors_A, 0),
                                              self.factor_keys[1]: torch.cat(factors_B, 1)})
        # Frozen, like a loaded adapter (and like the other layers' combinations): a combination is a result to
        # use, not a start that an optimizer over all trainable parameters should silently move.
        for param in self.adapter_parameters(new_name):
            param.requires_grad_(False)

    def extra_repr(self) -> str:
        described = ", ".join(f"{name}: r={s.r}{' dora' if s.use_dora else ''}" for name, s in self.settings.items())
        return f"adapters=[{described}], active={self.active!r}, merged={self.merged!r}"
