"""Which blocks a method adapts: all of them (the default), a list (`layers: [2, 5]`), or the best-scoring fraction
chosen from training batches before training (`layers: auto`, `layer_budget: 0.25`).

Scores (`layer_score`), each over `calibration_batches` batches of the task loss with the base weights:
- "gradient": the relative gradient norm of the block, ‖ḡ_b‖ / ‖θ_b‖ with ḡ the mean gradient (Lee et al. 2022,
  "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", Auto-RGN): how strongly the task pulls on the
  block relative to its size;
- "fisher": the mean diagonal Fisher information of the block's weights, mean_i E[g_i²] (the statistic sparse
  fine-tuning ranks single weights by).
The top ⌈budget · blocks⌉ blocks are kept, in model order. The choice is written back into the method's config
(`layers: [...]`), so the saved run reloads without choosing again, and `layer_scores` keeps the evidence.

A method opts in by inheriting `SelectsLayers` and `LayerSelectionConfig` and implementing `apply_to_blocks(model,
family)`, where `family` is restricted to the chosen blocks (`Family.restricted_to`): its attention / MLP / adapter
site tests then match inside those blocks only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deltatune.config.constraints import at_least, between, one_of
from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods.base import LossFunction
from deltatune.methods.shared.gradient_scores import calibration_scores
from deltatune.models.families import Family, check_block_indices

LAYER_SCORES = ("gradient", "fisher")


@dataclass
class LayerSelectionConfig(MethodConfig):
    layers: list[int] | str | None = None  # None: every block; a list of block indices; "auto": chosen from data
    layer_budget: float = field(default=0.25, metadata=between(0, 1, low_open=True))  # share of blocks, with auto
    layer_score: str = field(default="gradient", metadata=one_of(*LAYER_SCORES))
    calibration_batches: int = field(default=8, metadata=at_least(1))


class SelectsLayers:
    """Mixin for a Method: `apply` restricts the family to the configured blocks, or waits for `calibrate` with
    `layers: auto`."""

    config: LayerSelectionConfig
    layer_scores: list[float] | None = None

    def apply_to_blocks(self, model: nn.Module, family: Family) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement apply_to_blocks()")

    def apply(self, model: nn.Module, family: Family) -> None:
        self.layer_scores = None
        layers = self.config.layers
        if layers == "auto":
            for param in model.parameters():
                param.requires_grad_(False)  # nothing trains until calibrate has chosen
            self._waiting = family
            return
        self.apply_to_blocks(model, restricted(family, model, layers))

    def calibration_needed(self) -> str | None:
        if self.config.layers == "auto" and getattr(self, "_waiting", True) is not None:
            return "method.layers=auto scores the blocks on training batches before choosing them"
        return None

    def calibrate(self, model: nn.Module, batches: Iterable[dict[str, Any]], loss_fn: LossFunction) -> None:
        family = getattr(self, "_waiting", None)
        if self.config.layers != "auto" or family is None:
            return
        scores = block_scores(model, family, itertools.islice(batches, self.config.calibration_batches), loss_fn,
                              self.config.layer_score)
        # rounded first: 0.28 × 25 is 7.000000000000001 in floating point, which must keep 7 blocks, not 8
        keep = max(1, math.ceil(round(self.config.layer_budget * len(scores), 9)))
        chosen = sorted(sorted(range(len(scores)), key=lambda block: -scores[block])[:keep])
        self.config.layers = chosen
        self.layer_scores = scores
        self._waiting = None
        self.apply_to_blocks(model, family.restricted_to(chosen))


    def choices(self) -> dict[str, Any]:
        if self.layer_scores is None:
            return {}
        return {"layers": list(self.config.layers), "layer_score": self.config.layer_score,
                "layer_scores": [round(score, 6) for score in self.layer_scores]}


def restricted(family: Family, model: nn.Module, layers: list[int] | str | None) -> Family:
    """`family` limited to the listed blocks (checked against the model's), or as it is for None."""
    if layers is None:
        return family
    total = family.num_blocks(model)
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) for i in layers):
        raise UserError(f"method.layers must be auto or a non-empty list of block indices 0 to {total - 1}, got "
                        f"{layers!r}")
    check_block_indices(layers, total, "method.layers")
    return family.restricted_to(layers)


def block_scores(model: nn.Module, family: Family, batches: Iterable[dict[str, Any]], loss_fn: LossFunction,
                 score: str) -> list[float]:
    """One score per block (see the module docstring)."""
    total = family.num_blocks(model)
    if total == 0:
        raise UserError("method.layers=auto needs a model with repeated blocks the family table knows; list the "
                        "modules to adapt instead")
    members = [(name, param) for name, param in model.named_parameters()
               if family.block_index(name) is not None and param.is_floating_point()]
    statistics = calibration_scores(model, [param for _, param in members], batches, loss_fn,
                                    "gradient" if score == "gradient" else "fisher")
    squares, norms, counts = [0.0] * total, [0.0] * total, [0] * total
    for (name, param), statistic in zip(members, statistics):
        block = family.block_index(name)
        squares[block] += float(statistic.double().square().sum() if score == "gradient" else statistic.sum())
        norms[block] += float(param.detach().double().square().sum())
        counts[block] += param.numel()
    if score == "gradient":
        return [math.sqrt(s) / max(math.sqrt(n), 1e-12) for s, n in zip(squares, norms)]
    return [s / max(c, 1) for s, c in zip(squares, counts)]
