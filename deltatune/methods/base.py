"""What every fine-tuning method provides.

A method is composed onto any `nn.Module` rather than being a model subclass, so methods combine and the same
model class serves every method. Architecture knowledge (which names are blocks, attention, the head) comes from
the `Family` table passed in, never from the method itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.models.families import Family

# loss_fn(model, batch) -> the scalar loss of one batch, as the run's objective computes it.
LossFunction = Callable[[nn.Module, dict[str, Any]], torch.Tensor]


class Method:
    """Base class: subclass, set `config_class` and `description`, implement `apply`, and register."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # True: applying the method leaves the model's output unchanged. False for methods that change the frozen base
    # itself (qlora stores it quantised); their promise is then that the output equals the model's output with
    # every adapter disabled (`deltatune.disabled`), which the contract tests check instead.
    preserves_output_at_init: ClassVar[bool] = True
    # Where the change at init comes from when the output is not preserved: "base" (the method rewrites the frozen
    # base, e.g. qlora quantises it; its adapters add nothing yet) or "adapter" (the base is untouched but the
    # adapter has no neutral init, e.g. prompt tuning's virtual tokens): `deltatune.disabled` then gives back the
    # original output exactly. The contract tests check the promise that matches.
    init_change_from: ClassVar[str] = "base"
    # The kinds of model the method works on: "transformer" (attention blocks, text) and/or "cnn". Applying it to
    # another kind is a one-line UserError from `check_model_kind`; the contract tests run each listed kind.
    model_kinds: ClassVar[frozenset[str]] = frozenset({"transformer", "cnn"})
    # What the method's adapters promise beyond training; the registry-generated contract tests
    # (tests/test_adapter_contracts.py) check each promise a class declares. named_adapters: the class takes an
    # `adapter_name`, so several of its adapters sit side by side on one base, `deltatune.set_adapter` switches
    # between them and `deltatune.disabled` runs the base. mergeable: `deltatune.merge` folds the active adapter into
    # the base weights (same output) and `deltatune.unmerge` restores them. saves_adapter_files:
    # `deltatune.save_adapter` writes its adapters and `deltatune.load_adapter` reads them back, refusing a file
    # saved for a differently shaped base.
    named_adapters: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    saves_adapter_files: ClassVar[bool] = False
    # What `deltatune tune` searches for this method by default, on top of the shared epochs and batch size:
    # config path -> {"type": "float", "low", "high", "log"} | {"type": "int", "low", "high"} |
    # {"type": "categorical", "choices"}. train.lr here replaces the shared learning-rate range (methods that train
    # few parameters want larger rates).
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @classmethod
    def contract_config(cls) -> MethodConfig:
        """A config valid on any model (BERT, Llama, CNN) for the registry-generated contract tests."""
        return cls.config_class()

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        """(option, value) pairs the method refuses on any model, each alone: the contract tests apply each to a
        tiny model and expect a one-line UserError naming `method.<option>` and a model left as it was."""
        return []

    @classmethod
    def check_model_kind(cls, model: nn.Module) -> None:
        """Raise a UserError when `model` is of a kind this method does not support."""
        kind = model_kind(model)
        if kind not in cls.model_kinds:
            raise UserError(f"method {cls.name or cls.__name__!r} works on {' and '.join(sorted(cls.model_kinds))} "
                            f"models, not on this {kind}; pick another method (deltatune methods lists them)")

    def apply(self, model: nn.Module, family: Family) -> None:
        """Change `model` in place: set `requires_grad` and/or add the method's own modules."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply()")

    def convert_while_loading(self, model: nn.Module, family: Family) -> dict[str, Callable[[nn.Module], nn.Module]]:
        """Modules to replace the moment their weights are read, by name, each with the function that builds the
        replacement from the loaded module (qlora quantises frozen Linears, so the fp32 model never exists whole).
        `model` is the uninitialised skeleton: read names, types and shapes, never values. `apply` runs afterwards
        as usual and must accept the converted modules. {} (the default): load normally."""
        return {}

    def calibration_needed(self) -> str | None:
        """None when `apply` alone readies the model; else why `calibrate` must see data before training (a phrase
        for the error that `deltatune.apply` raises when it is given none)."""
        return None

    def calibrate(self, model: nn.Module, batches: Iterable[dict[str, Any]], loss_fn: LossFunction) -> None:
        """Look at a few training batches after `apply` and before training, e.g. to choose what trains from
        gradients. `deltatune train` calls it for every method with the run's training batches (in training order,
        on the device) and the objective's loss; the batches are produced lazily, so a method that takes none
        costs nothing. The default does nothing."""

    def choices(self) -> dict[str, Any]:
        """What the method chose from data in `calibrate` (e.g. which blocks, with their scores), for the run's
        summary and log; {} for methods that choose nothing."""
        return {}

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Everything this method changes: saved as the run's weights and reloaded by `load_trainable_state`.

        The default is every parameter that trains, which suits selective methods; methods that add modules
        may narrow or extend it.
        """
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Put weights saved by `trainable_state` back into a model this method was applied to."""
        params = dict(model.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"saved weights name parameters this model lacks: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                if params[name].shape != tensor.shape:
                    raise ValueError(f"{name}: saved shape {tuple(tensor.shape)} != model shape {tuple(params[name].shape)}")
                params[name].copy_(tensor)


def model_kind(model: nn.Module) -> str:
    """"transformer" for models with a transformers config (or attention modules), else "cnn"; a model class may say
    what it is itself (`model_kind = "dual-encoder"`)."""
    declared = getattr(type(model), "model_kind", None)
    if isinstance(declared, str):
        return declared
    if getattr(model, "config", None) is not None and hasattr(model.config, "model_type"):
        return "transformer"
    has_convolutions = any(isinstance(module, nn.Conv2d) for module in model.modules())
    return "cnn" if has_convolutions else "transformer"


def set_trainable(model: nn.Module, keep) -> int:
    """Freeze every parameter, then unfreeze those whose name satisfies `keep(name)`; returns how many train.

    Tied weights (e.g. an LM head sharing the embedding matrix) have several names; the tensor trains when any
    of its names is kept, so "train the head" works on tied models too.
    """
    kept = {id(param) for name, param in model.named_parameters(remove_duplicate=False) if keep(name)}
    count = 0
    for param in model.parameters():
        param.requires_grad_(id(param) in kept)
        count += param.numel() if param.requires_grad else 0
    return count


class WrapperLayer(nn.Module):
    """Base for layers that wrap a frozen module as `self.base_layer` (LoRA, bottleneck adapters, sparse deltas).

    Model code sometimes reads attributes of the module it built (`.weight`, `.in_features`); the wrapper answers
    for its base layer so it stays a drop-in replacement.
    """

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)
