"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), with rsLoRA scaling and DoRA.

Chosen modules W (nn.Linear, transformers' Conv1D, nn.Conv2d, nn.Embedding) stay frozen and gain a trainable
low-rank update:  W' = W + s·B·A,  A ∈ R^{r×in}, B ∈ R^{out×r},  s = lora_alpha/r  (use_rslora: lora_alpha/√r,
Kalajdzievski 2023). B = 0 at init, so training starts from the pretrained function. With `use_dora` (Liu et al.,
2024) the update is weight-decomposed: W' = m ⊙ (W + s·B·A)/‖W + s·B·A‖ with a trainable magnitude m per output.
The maths lives in `_lora_layers.py` (per base type: `_lora_types.py`; PEFT files: `_lora_peft.py`); this file
chooses the modules and wires the config.

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

from deltatune.adapters import AdapterLayer, base_modules, check_new_name, set_adapter
from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError, closest_names
from deltatune.methods import _lora_peft, register_method
from deltatune.methods._lora_layers import LoRALayer, LoRASettings
from deltatune.methods._lora_types import SUPPORTED_TYPES, LoRALinear, layer_class_for, wrap
from deltatune.methods._modules_to_save import ModulesToSaveLayer, add_copies
from deltatune.methods.base import Method, set_trainable
from deltatune.models.families import Family


@dataclass
class LoRAConfig(MethodConfig):
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
class LoRA(Method):
    description = "low-rank adapters on Linear/Conv1D/Conv2d/Embedding weights (LoRA, rsLoRA, DoRA)"
    config_class: ClassVar[type[MethodConfig]] = LoRAConfig
    peft_type: ClassVar[str | None] = "LORA"  # reads and writes PEFT's LoRA adapter files (see deltatune.adapters)

    def __init__(self, config: MethodConfig, adapter_name: str = "default") -> None:
        super().__init__(config)
        self.adapter_name = adapter_name  # a second LoRA applied under another name adds a second adapter

    def apply(self, model: nn.Module, family: Family) -> None:
        config: LoRAConfig = self.config  # type: ignore[assignment]
        validate(config)
        check_new_name(model, self.adapter_name)
        saved = modules_to_save(model, family, config)
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
        return _lora_peft.peft_config(model, layers, name)

    @classmethod
    def plan_peft_load(cls, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], name: str,
                       trainable: bool) -> tuple[Callable[[], None], set[str]]:
        return _lora_peft.plan_peft_load(model, config, tensors, name, trainable)


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
    if not 0.0 <= config.lora_dropout < 1.0:
        raise UserError(f"method.lora_dropout must be in [0, 1), got {config.lora_dropout}")
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
        r=_lora_peft.pattern_value(config.rank_pattern, module_name, config.r),
        lora_alpha=float(_lora_peft.pattern_value(config.alpha_pattern, module_name, config.lora_alpha)),
        use_rslora=config.use_rslora,
        lora_dropout=config.lora_dropout,
        use_dora=config.use_dora,
        init_lora_weights=config.init_lora_weights,
    )


# ---- which modules ---------------------------------------------------------------------------------------------
def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoRALayer) else module


def _matches(entry: str, name: str) -> bool:
    """A module name, a trailing part of one (PEFT's rule), or a regular expression matching the whole name."""
    if name == entry or name.endswith(f".{entry}"):
        return True
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def _select(model: nn.Module, entries: list[str], key: str) -> list[str]:
    """Module names matching any entry; a UserError for an entry that matches nothing, naming the closest."""
    names = [name for name, _ in base_modules(model) if name]
    selected: list[str] = []
    for entry in entries:
        found = [name for name in names if _matches(entry, name)]
        if not found:
            candidates = sorted(set(names) | {name.rsplit(".", 1)[-1] for name in names})
            close = ", ".join(closest_names(entry, candidates, limit=5))
            raise UserError(f"{key}: {entry!r} matches no module of this model; closest names: {close}")
        selected += [name for name in found if name not in selected]
    return selected


def modules_to_save(model: nn.Module, family: Family, config: LoRAConfig) -> list[str]:
    """Modules that train in full: the given ones, or by default the family's task head (outermost only)."""
    if config.modules_to_save is not None:
        chosen = _select(model, config.modules_to_save, "method.modules_to_save")
    else:
        chosen = []
        for name, module in base_modules(model):
            if isinstance(module, LoRALayer):
                continue
            owner = module.original_module if isinstance(module, ModulesToSaveLayer) else module
            params = owner.named_parameters() if owner is not module else module.named_parameters(recurse=False)
            if name and any(family.is_head(f"{name}.{param}") for param, _ in params):
                chosen.append(name)
    return [name for name in chosen if not any(name.startswith(f"{outer}.") for outer in chosen)]


def target_modules(model: nn.Module, family: Family, config: LoRAConfig, excluded: list[str]) -> dict[str, nn.Module]:
    """Module name -> module (or an existing LoRA layer around it) for every module to adapt."""

    def outside(name: str) -> bool:
        return not any(name == skip or name.startswith(f"{skip}.") for skip in excluded)

    modules = {name: module for name, module in base_modules(model) if name and outside(name)}
    targets = config.target_modules
    if isinstance(targets, list) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"  # the same shorthand whether written as a string or a one-item list
    if targets is None:
        chosen = _family_defaults(modules, family)
    elif targets == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [n for n, m in modules.items() if _is_linear(_base_of(m)) and m is not output]
    else:
        entries = [targets] if isinstance(targets, str) else targets
        chosen = [name for name in _select(model, entries, "method.target_modules") if name in modules]
        for name in chosen:
            _check_supported(name, _base_of(modules[name]))
    if not chosen:
        raise UserError(f"method lora found no module to adapt with target_modules={config.target_modules!r}; "
                        f"set method.target_modules to module names (e.g. [q_proj, v_proj]) or all-linear")
    return {name: modules[name] for name in chosen}


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, Conv1D, or any module a LoRALinear wraps (e.g. qlora's 4-bit NF4Linear)."""
    layer_class = layer_class_for(module)
    return layer_class is not None and issubclass(layer_class, LoRALinear)


def _family_defaults(modules: dict[str, nn.Module], family: Family) -> list[str]:
    """The family's attention + MLP modules that LoRA supports; else every Linear/Conv2d inside the blocks.
    Grouped convolutions (e.g. depthwise) are skipped: their LoRA update would not be a grouped conv."""
    supported = [name for name, module in modules.items() if layer_class_for(_base_of(module)) is not None]
    chosen = [name for name in supported if family.is_attention(name) or family.is_mlp(name)]
    if chosen:
        return chosen
    return [name for name in supported if family.block_index(f"{name}.") is not None
            and not isinstance(_base_of(modules[name]), nn.Embedding)]


def _check_supported(name: str, module: nn.Module) -> None:
    if layer_class_for(module) is not None:
        return
    detail = f" with groups={module.groups}" if isinstance(module, nn.Conv2d) else ""
    raise UserError(f"method.target_modules selects {name!r}, a {type(module).__name__}{detail}, which LoRA cannot "
                    f"adapt; it supports {SUPPORTED_TYPES} (narrow the pattern to those)")


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
