"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), with rsLoRA scaling and DoRA.

Chosen modules W (nn.Linear, transformers' Conv1D, nn.Conv2d, nn.Embedding) stay frozen and gain a trainable
low-rank update:  W' = W + s·B·A,  A ∈ R^{r×in}, B ∈ R^{out×r},  s = lora_alpha/r  (use_rslora: lora_alpha/√r,
Kalajdzievski 2023). B = 0 at init, so training starts from the pretrained function. With `use_dora` (Liu et al.,
2024) the update is weight-decomposed: W' = m ⊙ (W + s·B·A)/‖W + s·B·A‖ with a trainable magnitude m per output.
The maths lives in `lora_layer.py` (per base type: `layers_per_type.py`; PEFT files: `peft_format.py`); this file
chooses the modules (by the rules of `deltatune.methods.shared.targets`) and wires the config.

Which modules: `target_modules` None = the family's attention and MLP modules (falling back to every Linear/Conv2d
inside the blocks when the family names none that exist); "all-linear" = every Linear/Conv1D except the output
layer; a list = module names, name suffixes or regular expressions (full match). `modules_to_save` None = the
family's new task head, which must train in full; a list = those modules train in full (one copy per adapter).
Field names follow PEFT's LoraConfig wherever the concept is the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods import register_method
from deltatune.methods.base import Method, set_trainable
from deltatune.methods.lora import peft_format
from deltatune.methods.lora.layers_per_type import SUPPORTED_TYPES, LoRALinear, layer_class_for, wrap
from deltatune.methods.lora.lora_layer import LoRALayer, LoRASettings, check_dropout
from deltatune.methods.shared.layer_selection import LayerSelectionConfig, SelectsLayers
from deltatune.methods.shared.model_surgery import base_modules, check_new_name, check_unmerged, set_adapter
from deltatune.methods.shared.modules_to_save import ModulesToSaveLayer, add_copies, choose_modules_to_save
from deltatune.methods.shared.protocol import AdapterLayer
from deltatune.methods.shared.targets import TargetRule, choose_targets
from deltatune.models.families import Family


@dataclass
class LoRAConfig(LayerSelectionConfig):
    name: str = "lora"
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None  # None: the family's attention + MLP modules; or "all-linear"
    use_rslora: bool = False  # scale by lora_alpha/sqrt(r) instead of lora_alpha/r
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex on module names -> r (PEFT's rule)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex on module names -> lora_alpha
    init_lora_weights: bool | str = True  # true: Kaiming A, zero B; "gaussian": N(0, 1/r) A, zero B; false: random B
    modules_to_save: list[str] | None = None  # None: the family's new task head
    bias: str = "none"  # none | all | lora_only
    use_dora: bool = False


@register_method("lora")
class LoRA(SelectsLayers, Method):
    description = "low-rank adapters on Linear/Conv1D/Conv2d/Embedding weights (LoRA, rsLoRA, DoRA)"
    search_space = {"train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
                    "method.r": {"type": "categorical", "choices": [4, 8, 16, 32]},
                    "method.lora_alpha": {"type": "categorical", "choices": [8, 16, 32, 64]}}
    config_class: ClassVar[type[MethodConfig]] = LoRAConfig
    peft_type: ClassVar[str | None] = "LORA"  # reads and writes PEFT's LoRA files (see shared.protocol.PeftFormat)
    named_adapters: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    saves_adapter_files: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, adapter_name: str = "default") -> None:
        super().__init__(config)
        self.adapter_name = adapter_name  # a second LoRA applied under another name adds a second adapter

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [("r", 0), ("lora_alpha", -1), ("lora_dropout", 1.0), ("lora_dropout", 0.999999), ("bias", "some"),
                ("init_lora_weights", "orthogonal"), ("rank_pattern", {"q_proj": 0}), ("alpha_pattern", {"(": 4}),
                ("target_modules", ["no_such_module"]), ("modules_to_save", ["no_such_head"])]

    def apply_to_blocks(self, model: nn.Module, family: Family) -> None:
        config: LoRAConfig = self.config  # type: ignore[assignment]
        validate(config)
        check_new_name(model, self.adapter_name)
        check_unmerged(model, self.adapter_name)
        saved = choose_modules_to_save(model, family, config.modules_to_save)
        targets = target_modules(model, family, config, excluded=saved)
        targets = self.prepare_targets(model, family, targets, saved)
        set_trainable(model, lambda name: False)  # earlier adapters and the base stay frozen
        for module_name, module in targets.items():
            layer = module if isinstance(module, LoRALayer) else wrap(model, module_name, module)
            layer.add_adapter(self.adapter_name, settings_for(config, module_name))
        add_copies(model, saved, self.adapter_name)
        _train_biases(model, config.bias, set(targets))
        set_adapter(model, self.adapter_name)

    def prepare_targets(self, model: nn.Module, family: Family, targets: dict[str, nn.Module],
                        saved: list[str]) -> dict[str, nn.Module]:
        """Hook for variants that change base modules before LoRA wraps them (qlora quantises them); returns the
        modules to wrap by name. `saved` are the modules_to_save, which train in full. Runs before anything else
        changes the model, so a UserError raised before its own changes leaves the model as it was."""
        return targets

    @classmethod
    def peft_config(cls, model: nn.Module, layers: dict[str, AdapterLayer], name: str) -> dict[str, Any]:
        return peft_format.peft_config(model, layers, name)

    @classmethod
    def plan_peft_load(cls, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], name: str,
                       trainable: bool) -> tuple[Callable[[], None], set[str]]:
        return peft_format.plan_peft_load(model, config, tensors, name, trainable)


def validate(config: LoRAConfig) -> None:
    """One-line UserErrors for impossible settings, before the model is touched."""
    _check_rank("method.r", config.r)
    _check_alpha("method.lora_alpha", config.lora_alpha)
    for pattern, value in config.rank_pattern.items():
        _check_regex("method.rank_pattern", pattern)
        _check_rank(f"method.rank_pattern[{pattern!r}]", value)
    for pattern, value in config.alpha_pattern.items():
        _check_regex("method.alpha_pattern", pattern)
        _check_alpha(f"method.alpha_pattern[{pattern!r}]", value)
    check_dropout("method.lora_dropout", config.lora_dropout)
    if config.bias not in ("none", "all", "lora_only"):
        raise UserError(f"method.bias must be none, all or lora_only, got {config.bias!r}")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise UserError(f"method.init_lora_weights must be true, false or gaussian, got {config.init_lora_weights!r}")


def _check_rank(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{key} must be a positive whole number (the adapter rank), got {value!r}; e.g. 8")


def _check_alpha(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"{key} must be a positive number (the update is scaled by alpha/r), got {value!r}; e.g. 16")


def _check_regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise UserError(f"{key}: {pattern!r} is not a valid regular expression ({error})") from None


def settings_for(config: LoRAConfig, module_name: str) -> LoRASettings:
    return LoRASettings(
        r=peft_format.pattern_value(config.rank_pattern, module_name, config.r),
        lora_alpha=float(peft_format.pattern_value(config.alpha_pattern, module_name, config.lora_alpha)),
        use_rslora=config.use_rslora,
        lora_dropout=config.lora_dropout,
        use_dora=config.use_dora,
        init_lora_weights=config.init_lora_weights,
    )


# ---- which modules ---------------------------------------------------------------------------------------------
def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoRALayer) else module


def _supported(module: nn.Module) -> bool:
    return layer_class_for(_base_of(module)) is not None


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, Conv1D, or any module a LoRALinear wraps (e.g. qlora's 4-bit NF4Linear)."""
    layer_class = layer_class_for(_base_of(module))
    return layer_class is not None and issubclass(layer_class, LoRALinear)


def _check_supported(name: str, module: nn.Module) -> None:
    base = _base_of(module)
    if layer_class_for(base) is not None:
        return
    detail = f" with groups={base.groups}" if isinstance(base, nn.Conv2d) else ""
    raise UserError(f"method.target_modules selects {name!r}, a {type(base).__name__}{detail}, which LoRA cannot "
                    f"adapt; it supports {SUPPORTED_TYPES} (narrow the pattern to those)")


# The family's attention + MLP modules LoRA supports; else every supported module inside the blocks but embeddings.
# Grouped convolutions (e.g. depthwise) are not supported: their LoRA update would not be a grouped conv.
TARGETS = TargetRule(
    method="lora", verb="adapt", example="[q_proj, v_proj]", base_of=_base_of, by_default=_supported,
    in_blocks=lambda module: _supported(module) and not isinstance(_base_of(module), nn.Embedding),
    linear=_is_linear, check=_check_supported,
)


def target_modules(model: nn.Module, family: Family, config: LoRAConfig, excluded: list[str]) -> dict[str, nn.Module]:
    """Module name -> module (or an existing LoRA layer around it) for every module to adapt."""
    return choose_targets(model, family, config.target_modules, excluded, TARGETS)


def _train_biases(model: nn.Module, mode: str, targets: set[str]) -> None:
    """bias="all": every base bias trains; "lora_only": the biases of the adapted modules (in place, shared by
    all adapters, as in PEFT)."""
    if mode == "none":
        return
    for name, module in base_modules(model):
        if isinstance(module, ModulesToSaveLayer) or (mode == "lora_only" and name not in targets):
            continue
        bias = _base_of(module)._parameters.get("bias")
        if bias is not None:
            bias.requires_grad_(True)
