"""Modules that train in full beside an adapter (PEFT's `modules_to_save`), e.g. a new classification head.

Each adapter gets its own trainable copy of the module, so switching adapters also switches heads and disabling
adapters gives back the original module. Names follow PEFT (`original_module`, `modules_to_save.<adapter>`).
Implements the adapter protocol (`protocol.py`); it has nothing to merge (a full copy is already a
weight), and a weighted combination is taken on the copies' differences from the original, like LoRA deltas.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.methods.shared.model_surgery import base_modules, replace_module
from deltatune.methods.shared.protocol import AdapterLayer
from deltatune.methods.shared.switch import AdapterSwitch
from deltatune.methods.shared.targets import select_modules
from deltatune.models.families import Family


class ModulesToSaveLayer(AdapterSwitch, nn.Module):
    peft_type: ClassVar[str | None] = None  # joins an adapter of any type

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()

    def __getattr__(self, name: str) -> Any:
        # Model code may read attributes of the module it built (e.g. `.weight`); answer for the original.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)

    def add_copy(self, name: str, state: dict[str, Tensor] | None = None, trainable: bool = True) -> None:
        """A copy of the original module for adapter `name`, optionally with the given (PEFT-keyed) state."""
        module = copy.deepcopy(self.original_module)
        if state:
            module.load_state_dict(state, strict=False)
        for param in module.parameters():
            param.requires_grad_(trainable)
        self.modules_to_save[name] = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.enabled and self.active is not None:
            return self.modules_to_save[self.active](*args, **kwargs)
        return self.original_module(*args, **kwargs)

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return dict(self.modules_to_save[name].state_dict())

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self._forget(name)

    def merge(self) -> None:
        """Nothing to fold: the active copy already is the weight."""

    def unmerge(self) -> None:
        """Nothing was folded."""

    def weights_changed_by_merge(self) -> list[Tensor]:
        return []

    def unwrap(self) -> nn.Module:
        """The module this layer currently runs: the active copy, or the original when disabled/inactive."""
        if self.enabled and self.active is not None:
            return self.modules_to_save[self.active]
        return self.original_module

    def combine(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        """A copy whose every floating-point tensor is original + Σ wᵢ·(copyᵢ - original)."""
        present = [(name, weight) for name, weight in zip(names, weights) if name in self.modules_to_save]
        if not present:
            return
        combined = copy.deepcopy(self.original_module)
        original = self.original_module.state_dict()
        states = [(self.modules_to_save[name].state_dict(), weight) for name, weight in present]
        with torch.no_grad():
            for key, tensor in combined.state_dict().items():
                if tensor.is_floating_point():
                    tensor.add_(sum(weight * (state[key] - original[key]) for state, weight in states))
        for param in combined.parameters():
            param.requires_grad_(False)
        self.modules_to_save[new_name] = combined


def add_copies(model: nn.Module, module_names: Sequence[str], adapter_name: str) -> None:
    """Give each named module of `model` a trainable copy for adapter `adapter_name`, wrapping it on first use."""
    for module_name in module_names:
        module = model.get_submodule(module_name)
        layer = module if isinstance(module, ModulesToSaveLayer) else ModulesToSaveLayer(module)
        if layer is not module:
            replace_module(model, module_name, layer)
        layer.add_copy(adapter_name)


def choose_modules_to_save(model: nn.Module, family: Family, wanted: list[str] | None) -> list[str]:
    """Modules that train in full (a method's `modules_to_save` setting): those `wanted` names select (names, name
    suffixes or regular expressions), or by default the family's task head; the outermost of nested ones only."""
    if wanted is not None:
        chosen = select_modules(model, wanted, "method.modules_to_save")
    else:
        chosen = []
        for name, module in base_modules(model):
            if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveLayer):
                continue  # another method's layer: what it wraps is adapted, not trained in full
            owner = module.original_module if isinstance(module, ModulesToSaveLayer) else module
            params = owner.named_parameters() if owner is not module else module.named_parameters(recurse=False)
            if name and any(family.is_head(f"{name}.{param}") for param, _ in params):
                chosen.append(name)
    return [name for name in chosen if not any(name.startswith(f"{outer}.") for outer in chosen)]
