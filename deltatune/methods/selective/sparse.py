"""Sparse fine-tuning with a fixed mask: a few entries of each chosen weight train, picked once before training.

Update: for every targeted weight W with n entries, k = ⌈density·n⌉ flat positions S are fixed and
    W' = W + Δ,   Δ_S = values ∈ R^k (trainable, zero at init),   Δ elsewhere = 0,
so the model is unchanged at init and only `values` receive gradients (∂L/∂values = (∂L/∂W')_S) and optimizer
state (2k numbers under AdamW, not 2n). Saved weights are the sparse delta itself: `indices` (S) and `values`.
k is rounded up from the density as written (0.07 of 100 entries is 7, not 8), so every targeted tensor trains
at least one entry; density 1 trains every entry of the targets.

How S is chosen (`selection`), per tensor, top-k by a score:
  magnitude  s = -|W|: the smallest-magnitude pretrained entries (PaFi; Liao, Meng & Monz, 2023, "Parameter-
             Efficient Fine-Tuning without Introducing New Latency"). By the magnitude-pruning argument these
             entries matter least to the pretrained function, so they are the spare capacity that can move; the
             mask needs no data and is the same for every task.
  gradient   s = |ḡ|,  ḡ = (1/B) Σ_b ∇_W L_b over B calibration batches: the entries along which the task loss
             falls fastest at the start. One SGD step from W moves each entry by lr·ḡ, so this is the one-step
             limit of LT-SFT's criterion (Ansell, Ponti, Korhonen & Vulić, 2022, "Composable Sparse Fine-Tuning
             for Cross-Lingual Transfer"), which keeps the entries that moved most, |θ₁ - θ₀|, in a full
             fine-tuning phase.
  fisher     s = (1/B) Σ_b (∇_W L_b)²: the diagonal empirical Fisher information, as in FISH Mask (Sung, Nair &
             Raffel, 2021, "Training Neural Networks with Fixed Sparse Masks"). The paper squares per-example
             gradients; here each calibration batch's mean gradient is squared (batch size 1 gives the paper's
             estimator). FISH takes the top-k over all parameters together; here it is per tensor, so every
             targeted layer adapts with the same, predictable budget.
Diff pruning (Guo, Rush & Kim, 2021, "Parameter-Efficient Transfer Learning with Diff Pruning") learns the sparse
difference with an L0 relaxation while training; here, as in FISH Mask and LT-SFT's second phase, the mask is
fixed before training and only the values of the difference are learnt. Sparse deltas compose by addition
(Ansell et al.), which `deltatune.add_weighted_adapter` does: Δ = Σ wᵢ·Δᵢ on the union of the positions.

Calibration data. gradient/fisher need a few batches before training: `calibration_batches` of them.
  - `deltatune train` passes the run's first training batches (epoch 0's seeded order, train.batch_size) and the
    objective's loss, through `Method.calibrate`, which the runner calls for every method (a no-op by default).
  - The Python API: `deltatune.apply(model, cfg, calibration=batches, loss_fn=None)`, where `batches` are dicts
    called as `model(**batch)` and the default loss is the output's `.loss` (include labels). Without
    `calibration` these selections are a UserError before the model is touched. Calling `method.calibrate(model,
    batches, loss_fn)` after `method.apply` also works; training before either is a UserError.
Calibration runs in eval mode (no dropout; BatchNorm statistics untouched), leaves no `.grad` behind and never
changes the model's output; it holds one fp32 score tensor per targeted weight while it runs. Positions are chosen once: calibrating again is refused, and reloading saved weights
(or a checkpoint, on resume) restores the saved `indices`, so a reload is exact whatever the selection.

Which weights: `target_modules` None = the family's attention and MLP modules (as for LoRA), else every Linear/Conv
inside the family's blocks (a CNN's convolutions, depthwise ones included); "all-linear" = every Linear/Conv1D but
the output layer; a list = names, name suffixes or regular expressions (LoRA's rule). Any module with a weight
works. `modules_to_save` None = the family's new task head, which trains in full (one copy per adapter).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods import register_method
from deltatune.methods.base import LossFunction, Method, set_trainable
from deltatune.methods.selective.sparse_layer import SparseDelta, SparseDeltaLayer, wrap
from deltatune.methods.shared.gradient_scores import calibration_scores
from deltatune.methods.shared.model_surgery import adapter_layers, check_new_name, check_unmerged, set_adapter
from deltatune.methods.shared.modules_to_save import add_copies, choose_modules_to_save
from deltatune.methods.shared.protocol import AdapterLayer
from deltatune.methods.shared.targets import TargetRule, choose_targets, is_conv1d
from deltatune.models.families import Family

SELECTIONS = ("magnitude", "gradient", "fisher")


@dataclass
class SparseConfig(MethodConfig):
    name: str = "sparse"
    density: float = 0.01  # fraction of each targeted weight's entries that train
    selection: str = "magnitude"  # magnitude | gradient | fisher
    target_modules: str | list[str] | None = None  # None: the family's attention + MLP modules; or "all-linear"
    calibration_batches: int = 8  # batches that gradient/fisher selection averages over
    modules_to_save: list[str] | None = None  # None: the family's new task head


@register_method("sparse")
class Sparse(Method):
    description = "train a fixed sparse subset of weight entries, chosen by magnitude, gradient or Fisher information"
    config_class: ClassVar[type[MethodConfig]] = SparseConfig
    named_adapters: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True  # PEFT has no sparse type: no adapter files

    def __init__(self, config: MethodConfig, adapter_name: str = "default") -> None:
        super().__init__(config)
        self.adapter_name = adapter_name  # a second sparse method applied under another name adds a second delta

    @classmethod
    def contract_config(cls) -> SparseConfig:
        # A tenth of each weight: enough for the tiny contract task's loss to fall, and still needs no data.
        return SparseConfig(density=0.1)

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [("density", 0), ("density", 1.5), ("selection", "random"), ("calibration_batches", 0),
                ("target_modules", ["no_such_module"])]

    def calibration_needed(self) -> str | None:
        config: SparseConfig = self.config  # type: ignore[assignment]
        validate(config)  # a misspelt selection is reported as such, not as missing data
        if config.selection == "magnitude":
            return None
        return (f"method.selection={config.selection!r} ranks weights by gradients on calibration data "
                f"(selection=magnitude needs none)")

    def apply(self, model: nn.Module, family: Family) -> None:
        config: SparseConfig = self.config  # type: ignore[assignment]
        validate(config)
        check_new_name(model, self.adapter_name)
        check_unmerged(model, self.adapter_name)
        saved = choose_modules_to_save(model, family, config.modules_to_save)
        targets = target_modules(model, family, config, excluded=saved)
        set_trainable(model, lambda name: False)  # the base and earlier adapters stay frozen
        for module_name, module in targets.items():
            layer = module if isinstance(module, SparseDeltaLayer) else wrap(model, module_name, module)
            weight = layer.base_layer.weight
            delta = layer.add_adapter(self.adapter_name, entries_for(config.density, weight.numel()))
            if config.selection == "magnitude":
                delta.choose(top_positions(-weight.detach().abs(), delta.values.numel()))
        add_copies(model, saved, self.adapter_name)
        set_adapter(model, self.adapter_name)

    def calibrate(self, model: nn.Module, batches: Iterable[dict[str, Any]], loss_fn: LossFunction) -> None:
        """Choose the trained positions of gradient/fisher selection from the first `calibration_batches`."""
        config: SparseConfig = self.config  # type: ignore[assignment]
        if config.selection == "magnitude":
            return
        deltas = self._deltas(model)
        if any(delta.is_chosen() for _, delta in deltas):
            raise UserError(f"the sparse weights of adapter {self.adapter_name!r} are already chosen; they are "
                            f"chosen once, before training (apply the method to a fresh model to choose again)")
        weights = [layer.base_layer.weight for layer, _ in deltas]
        scores = calibration_scores(model, weights, itertools.islice(batches, config.calibration_batches),
                                    loss_fn, config.selection)
        with torch.no_grad():
            for (_, delta), score in zip(deltas, scores):
                delta.choose(top_positions(score, delta.values.numel()))

    def trainable_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The trainable values plus, beside each, the `indices` buffer that says where they go."""
        state = super().trainable_state(model)
        prefixes = {f"{module_name}.sparse_deltas.{self.adapter_name}"
                    for module_name, layer in adapter_layers(model).items() if isinstance(layer, SparseDeltaLayer)
                    and self.adapter_name in layer.sparse_deltas}
        buffers = dict(model.named_buffers())
        state.update({f"{prefix}.indices": buffers[f"{prefix}.indices"] for prefix in prefixes})
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        buffers = dict(model.named_buffers())
        positions = {key: tensor for key, tensor in state.items() if key.endswith(".indices") and key in buffers}
        for key, tensor in positions.items():
            if buffers[key].shape != tensor.shape:
                raise UserError(f"{key}: the saved weights train {tensor.numel()} entries but this model "
                                f"{buffers[key].numel()}; use the method.density they were trained with")
        super().load_trainable_state(model, {key: t for key, t in state.items() if key not in positions})
        with torch.no_grad():
            for key, tensor in positions.items():
                buffers[key].copy_(tensor)
        for module in model.modules():
            if isinstance(module, SparseDelta):
                module.recheck()

    def _deltas(self, model: nn.Module) -> list[tuple[SparseDeltaLayer, SparseDelta]]:
        layers = [layer for layer in adapter_layers(model).values() if isinstance(layer, SparseDeltaLayer)]
        return [(layer, layer.sparse_deltas[self.adapter_name]) for layer in layers  # type: ignore[misc]
                if self.adapter_name in layer.sparse_deltas]


def validate(config: SparseConfig) -> None:
    """One-line UserErrors for impossible settings, before the model is touched."""
    density = config.density
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise UserError(f"method.density must be in (0, 1] (the fraction of each weight's entries that trains), "
                        f"got {density!r}; e.g. 0.01")
    if config.selection not in SELECTIONS:
        raise UserError(f"method.selection must be {', '.join(SELECTIONS[:-1])} or {SELECTIONS[-1]}, "
                        f"got {config.selection!r}")
    batches = config.calibration_batches
    if isinstance(batches, bool) or not isinstance(batches, int) or batches <= 0:
        raise UserError(f"method.calibration_batches must be a positive whole number, got {batches!r}; e.g. 8")


def entries_for(density: float, numel: int) -> int:
    """k = ⌈density·numel⌉, with the density taken as the decimal it is written as (0.07·100 is 7, not 8)."""
    return max(1, min(numel, math.ceil(Fraction(str(density)) * numel)))


def top_positions(score: Tensor, k: int) -> Tensor:
    """Flat positions of the k largest scores."""
    return torch.topk(score.reshape(-1), k, sorted=False).indices


# ---- which modules ---------------------------------------------------------------------------------------------
def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, SparseDeltaLayer) else module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _is_linear_or_conv(module: nn.Module) -> bool:
    return _is_linear(module) or isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _has_weight(module: nn.Module) -> bool:
    """A sparse layer already, or a plain module with a floating-point weight of its own."""
    if isinstance(module, SparseDeltaLayer):
        return True
    weight = module._parameters.get("weight")
    return not isinstance(module, AdapterLayer) and weight is not None and weight.is_floating_point()


def _check_adaptable(name: str, module: nn.Module) -> None:
    if _has_weight(module):
        return
    if isinstance(module, AdapterLayer):
        raise UserError(f"method.target_modules selects {name!r}, which already carries a {type(module).__name__} "
                        f"adapter; sparse cannot wrap another method's layer (narrow method.target_modules)")
    raise UserError(f"method.target_modules selects {name!r}, a {type(module).__name__} with no floating-point "
                    f"weight of its own; choose modules that have one (e.g. Linear, Conv2d)")


# The family's attention + MLP modules with a weight; else every Linear/Conv inside the blocks (depthwise too).
TARGETS = TargetRule(
    method="sparse", verb="update", example="[query, value]", base_of=_base_of, by_default=_has_weight,
    in_blocks=lambda module: _is_linear_or_conv(_base_of(module)),
    linear=lambda module: _is_linear(_base_of(module)), check=_check_adaptable,
)


def target_modules(model: nn.Module, family: Family, config: SparseConfig,
                   excluded: list[str]) -> dict[str, nn.Module]:
    """Module name -> module (or an existing sparse layer around it) for every weight to update sparsely."""
    return choose_targets(model, family, config.target_modules, excluded, TARGETS)
