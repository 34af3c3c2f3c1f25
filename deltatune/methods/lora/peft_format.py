"""LoRA's side of PEFT's adapter files: the LoRA fields of adapter_config.json, and reading LoRA/rsLoRA/DoRA tensors.

Which modules an adapter covers is read from the tensor keys (`<module>.lora_A.weight`, ...), not re-derived from
`target_modules`, so any file peft wrote loads whatever patterns produced it. Per-module rank comes from A's shape
and alpha from `alpha_pattern` with PEFT's matching rule, which fixes the scaling alpha/r (alpha/√r for rsLoRA).
When writing, exceptions to the most common rank/alpha are spelled out per module (escaped full names) and
`target_modules` is the shortest list of name suffixes that selects exactly the adapted modules under PEFT's rule.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from deltatune.errors import UserError, closest_names
from deltatune.methods.lora.layers_per_type import SUPPORTED_TYPES, layer_class_for, wrap
from deltatune.methods.lora.lora_layer import MAGNITUDE_KEY, LoRALayer, LoRASettings, check_dropout
from deltatune.methods.shared.model_surgery import base_modules
from deltatune.methods.shared.protocol import AdapterLayer

FILE_KEYS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", MAGNITUDE_KEY)
# PEFT options that change what the layer computes; loading such a file as plain LoRA would run something else.
UNSUPPORTED_OPTIONS = ("lora_bias", "target_parameters", "layer_replication", "use_qalora", "alora_invocation_tokens",
                       "arrow_config", "trainable_token_indices")
# Initialisations after which PEFT subtracts the initial update from the base weights (PiSSA, OLoRA, CorDA, LoftQ).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def peft_config(model: nn.Module, layers: dict[str, AdapterLayer], name: str) -> dict[str, Any]:
    """The LoRA fields of adapter_config.json for adapter `name` (`layers` are LoRA layers: peft_type "LORA")."""
    lora_layers: dict[str, LoRALayer] = layers  # type: ignore[assignment]
    settings = {module: layer.settings[name] for module, layer in lora_layers.items()}
    dora = {s.use_dora for s in settings.values()}
    if len(dora) > 1:
        raise UserError(f"adapter {name!r} mixes DoRA and plain LoRA layers, which PEFT's format cannot express")
    for module, layer in lora_layers.items():
        base = layer.base_layer
        # PEFT builds a conv's lora_A without the base's dilation and padding mode: it would compute something else
        if any(d != 1 for d in getattr(base, "dilation", (1,))) or getattr(base, "padding_mode", "zeros") != "zeros":
            raise UserError(f"{module} is a convolution with dilation {base.dilation} or padding_mode "
                            f"{base.padding_mode!r}, which PEFT's LoRA conv ignores; leave it out of "
                            f"method.target_modules to save the adapter for PEFT")
    use_rslora = all(s.use_rslora for s in settings.values())
    # A single use_rslora flag covers the file: where layers disagree, express every alpha as plain alpha/r.
    alphas = {m: s.lora_alpha if s.use_rslora == use_rslora else s.scaling * s.r for m, s in settings.items()}
    ranks = {m: s.r for m, s in settings.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    first = next(iter(settings.values()))
    return {
        "r": r,
        "lora_alpha": _plain_number(alpha),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): _plain_number(v) for m, v in alphas.items() if v != alpha},
        "lora_dropout": first.lora_dropout,
        "use_rslora": use_rslora,
        "use_dora": dora.pop(),
        "target_modules": target_suffixes(model, set(layers)),
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "init_lora_weights": True,
        "lora_bias": False,
    }


def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def target_suffixes(model: nn.Module, adapted: set[str]) -> list[str]:
    """The fewest trailing name components that select exactly `adapted` under PEFT's list rule
    (a module is targeted when its name equals an entry or ends with "." + entry); full names at worst."""
    names = [name for name, _ in base_modules(model) if name]
    depth = max(name.count(".") + 1 for name in adapted)
    for components in range(1, depth + 1):
        suffixes = {".".join(name.split(".")[-components:]) for name in adapted}
        selected = {n for n in names if n in suffixes or any(n.endswith(f".{s}") for s in suffixes)}
        if selected == adapted:
            return sorted(suffixes)
    return sorted(adapted)


def plan_peft_load(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], name: str,
                   trainable: bool) -> tuple[Callable[[], None], set[str]]:
    """Check every LoRA tensor against `model`; return the step that adds adapter `name`, and the keys used."""
    for unsupported in UNSUPPORTED_OPTIONS:
        if config.get(unsupported):
            raise UserError(f"the adapter uses PEFT's {unsupported}, which deltatune does not support")
    init = str(config.get("init_lora_weights", ""))
    if init.startswith(BASE_CHANGING_INITS):
        raise UserError(f"the adapter was initialised with PEFT's init_lora_weights={init!r}, which also changed the "
                        f"base weights, so it fits only that changed base; convert it to plain LoRA in PEFT first "
                        f"(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix in FILE_KEYS:
            for spelling in (suffix, f"{suffix}.weight"):  # older PEFT wrote magnitudes with ".weight"
                if key.endswith(f".{spelling}"):
                    groups.setdefault(key[: -len(spelling) - 1], {})[suffix] = tensor
    claimed = {key for key in tensors if any(key.endswith(f".{s}") or key.endswith(f".{s}.weight") for s in FILE_KEYS)}
    if not groups:
        raise UserError("the adapter file holds no LoRA weights (no lora_A/lora_B keys); it is not a LoRA adapter")
    modules = dict(base_modules(model))
    steps = [_plan_module(modules, module_name, parts, config) for module_name, parts in groups.items()]

    def apply() -> None:
        for module_name, module, settings, parts in steps:
            layer = module if isinstance(module, LoRALayer) else wrap(model, module_name, module)
            layer.add_adapter(name, settings, parts)
            for param in layer.adapter_parameters(name):
                param.requires_grad_(trainable)

    return apply, claimed


def _plan_module(modules: dict[str, nn.Module], module_name: str, parts: dict[str, Tensor],
                 config: dict[str, Any]) -> tuple[str, nn.Module, LoRASettings, dict[str, Tensor]]:
    module = modules.get(module_name)
    if module is None:
        close = ", ".join(closest_names(module_name, [m for m in modules if m], limit=3))
        raise UserError(f"the adapter adapts {module_name!r}, which this model lacks (closest: {close}); "
                        f"it was saved for a different base model")
    base = module.base_layer if isinstance(module, LoRALayer) else module
    layer_class = layer_class_for(base)
    if layer_class is None:
        raise UserError(f"the adapter adapts {module_name!r}, a {type(base).__name__}; LoRA supports {SUPPORTED_TYPES}")
    key_A, key_B = layer_class.factor_keys
    for key in (key_A, key_B):
        if key not in parts:
            raise UserError(f"{module_name}: the adapter has no {key!r} for this {type(base).__name__}; it was "
                            f"saved for a different base model")
    expected = layer_class.expected_shapes(base, parts[key_A].shape[0])
    for key, tensor in parts.items():
        if key not in expected or tuple(tensor.shape) != expected[key]:
            want = expected.get(key, "no such tensor")
            raise UserError(f"{module_name}.{key}: the adapter's shape {tuple(tensor.shape)} does not fit the "
                            f"model's {want}; it was saved for a different base model")
    dropout = float(config.get("lora_dropout") or 0.0)
    check_dropout("the adapter's lora_dropout", dropout)  # the file is input too: training with it divides by 1-p
    settings = LoRASettings(
        r=int(parts[key_A].shape[0]),
        lora_alpha=float(pattern_value(config.get("alpha_pattern") or {}, module_name, config.get("lora_alpha", 8))),
        use_rslora=bool(config.get("use_rslora", False)),
        lora_dropout=dropout,
        use_dora=MAGNITUDE_KEY in parts,
    )
    return module_name, module, settings, parts
