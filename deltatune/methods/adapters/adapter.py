"""Bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al.,
2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning").

A small residual bottleneck is inserted after a transformer sublayer's output h ∈ R^d and trained, the rest frozen:

    y = h + W_up · f(W_down · h + b_down) + b_up,     m = max(1, d // reduction_factor),  f = relu|gelu|silu|tanh

W_up, b_up start at zero (the model's output is unchanged at init), W_down small random (the layer maths lives in
`bottleneck_layers.py`). Trainable parameters per adapted module: 2·d·m + d + m.

Where (`placement`): "houlsby" = after the attention output projection and after the feed-forward output (two per
block, Houlsby et al.): the adapter wraps that Linear and acts on the sublayer's output h before the block's
dropout, residual add and norm. "pfeiffer" = once per block, at the feed-forward sublayer, in Pfeiffer et al.'s
position: in post-norm blocks (BERT) it wraps the norm after the residual add, reads the normalised state z = N(s)
and adds its update before that norm, y = N(s + a(z)) (`NormBottleneckLayer`); pre-norm blocks (Llama) have no
such norm, so there it reads the feed-forward output as Houlsby's does. Which modules those are comes from the
family table (`Family.attention_output` / `mlp_output` / `mlp_output_norm`). `modules_to_save` None = the family's
new task head trains in full (one copy per adapter), as for lora; a module an adapter wraps cannot also be one.

Several adapters live side by side under names (`Adapter(config, adapter_name="task2")`), switched with
`deltatune.set_adapter`; `deltatune.adapter_fusion` combines trained ones. `save_adapter`/`load_adapter` write and
read them in PEFT's directory layout under deltatune's own type DELTATUNE_ADAPTER (PEFT has no bottleneck adapters,
so peft cannot load these files). They cannot be merged into the base weights or combined as a weighted sum.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError, closest_names
from deltatune.methods import register_method
from deltatune.methods.adapters.bottleneck_layers import (
    FILE_KEYS,
    NON_LINEARITIES,
    PEFT_TYPE,
    BottleneckLayer,
    output_size,
    wrap,
)
from deltatune.methods.base import Method, set_trainable
from deltatune.methods.shared.layer_selection import LayerSelectionConfig, SelectsLayers
from deltatune.methods.shared.model_surgery import base_modules, check_new_name, set_adapter
from deltatune.methods.shared.modules_to_save import add_copies, choose_modules_to_save
from deltatune.methods.shared.protocol import AdapterLayer
from deltatune.models.families import Family

# The family parts (Family.is_<part>) each placement wraps, best first: a model lacking the first takes the next.
PLACEMENTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "houlsby": (("attention_output", "mlp_output"),),
    "pfeiffer": (("mlp_output_norm",), ("mlp_output",)),  # post-norm blocks: the norm; pre-norm: the FFN output
}


@dataclass
class AdapterConfig(LayerSelectionConfig):
    name: str = "adapter"
    placement: str = "houlsby"  # houlsby: after attention and feed-forward outputs; pfeiffer: feed-forward, post-norm
    reduction_factor: int = 16  # bottleneck width m = hidden size // reduction_factor (at least 1)
    non_linearity: str = "relu"  # relu | gelu | silu | tanh
    modules_to_save: list[str] | None = None  # None: the family's new task head


@register_method("adapter")
class Adapter(SelectsLayers, Method):
    description = "bottleneck adapters after the attention / feed-forward outputs (Houlsby; Pfeiffer placement)"
    search_space = {"train.lr": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True},
                    "method.reduction_factor": {"type": "categorical", "choices": [8, 16, 32, 64]}}
    config_class: ClassVar[type[MethodConfig]] = AdapterConfig
    peft_type: ClassVar[str | None] = PEFT_TYPE  # deltatune's own adapter-file type (see shared.protocol.PeftFormat)
    model_kinds: ClassVar[frozenset[str]] = frozenset({"transformer"})
    named_adapters: ClassVar[bool] = True
    saves_adapter_files: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, adapter_name: str = "default") -> None:
        super().__init__(config)
        self.adapter_name = adapter_name  # a second adapter applied under another name sits beside the first

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [("reduction_factor", 0), ("reduction_factor", -4), ("placement", "parallel"),
                ("non_linearity", "swish"), ("modules_to_save", ["no_such_head"])]

    def apply_to_blocks(self, model: nn.Module, family: Family) -> None:
        config: AdapterConfig = self.config  # type: ignore[assignment]
        validate(config)
        check_new_name(model, self.adapter_name)
        saved = choose_modules_to_save(model, family, config.modules_to_save)
        sites = adapter_sites(model, family, config.placement, excluded=saved)
        set_trainable(model, lambda name: False)  # earlier adapters and the base stay frozen
        for module_name, module in sites.items():
            layer = module if isinstance(module, BottleneckLayer) else wrap(model, module_name, module)
            layer.add_bottleneck(self.adapter_name, bottleneck_size(layer.size, config.reduction_factor),
                                 config.non_linearity)
        add_copies(model, saved, self.adapter_name)
        set_adapter(model, self.adapter_name)

    @classmethod
    def peft_config(cls, model: nn.Module, layers: dict[str, AdapterLayer], name: str) -> dict[str, Any]:
        """adapter_config.json fields: the non-linearity, the usual reduction factor and the adapted modules."""
        own = {module: layer for module, layer in layers.items() if isinstance(layer, BottleneckLayer)}
        bottlenecks = {module: layer.bottleneck(name) for module, layer in own.items()}
        factors = Counter(own[module].size // b.adapter_down.out_features for module, b in bottlenecks.items())
        return {"non_linearity": next(iter(bottlenecks.values())).non_linearity,
                "reduction_factor": factors.most_common(1)[0][0], "target_modules": sorted(bottlenecks)}

    @classmethod
    def plan_peft_load(cls, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], name: str,
                       trainable: bool) -> tuple[Callable[[], None], set[str]]:
        """Check every bottleneck tensor against `model` (keys `<module>.adapter_down.weight`, ...); return the step
        that adds adapter `name` and the keys it uses. Other keys (a head's copy) are left to the caller."""
        non_linearity = str(config.get("non_linearity", "relu"))
        _check_choice("the adapter file's non_linearity", non_linearity, NON_LINEARITIES)
        groups: dict[str, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            for suffix in FILE_KEYS:
                if key.endswith(f".{suffix}"):
                    groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor
        if not groups:
            raise UserError("the adapter file holds no bottleneck weights (no adapter_down/adapter_up keys); it is "
                            "not an adapter written by deltatune's adapter method")
        modules = dict(base_modules(model))
        sizes = {module_name: _check_saved(modules, module_name, parts) for module_name, parts in groups.items()}

        def apply() -> None:
            for module_name, parts in groups.items():
                module = model.get_submodule(module_name)  # looked up now: an earlier step may have wrapped it
                layer = module if isinstance(module, BottleneckLayer) else wrap(model, module_name, module)
                layer.add_bottleneck(name, sizes[module_name], non_linearity, parts, trainable)

        return apply, {f"{module}.{key}" for module, parts in groups.items() for key in parts}


def bottleneck_size(size: int, reduction_factor: int) -> int:
    return max(1, size // reduction_factor)


def validate(config: AdapterConfig) -> None:
    """One-line UserErrors for impossible settings, before the model is touched."""
    _check_choice("method.placement", config.placement, PLACEMENTS)
    _check_choice("method.non_linearity", config.non_linearity, NON_LINEARITIES)
    factor = config.reduction_factor
    if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
        raise UserError(f"method.reduction_factor must be a positive whole number (hidden size / bottleneck width), "
                        f"got {factor!r}; e.g. 16")


def _check_choice(key: str, value: str, choices: dict[str, Any]) -> None:
    if value not in choices:
        close = closest_names(str(value), list(choices), limit=1)
        raise UserError(f"{key} must be one of {', '.join(choices)}, got {value!r}; e.g. {close[0]}")


def adapter_sites(model: nn.Module, family: Family, placement: str, excluded: list[str]) -> dict[str, nn.Module]:
    """Module name -> module (or an existing bottleneck layer around it) that the placement wraps."""
    modules = {name: module for name, module in base_modules(model) if name}

    def found(part: str) -> bool:
        return any(getattr(family, f"is_{part}")(name) for name in modules)

    # The first set of parts the model has (a pre-norm model has no feed-forward output norm); else the last, whose
    # missing part the error below names.
    parts = next((parts for parts in PLACEMENTS[placement] if all(found(part) for part in parts)),
                 PLACEMENTS[placement][-1])
    tests = {part: getattr(family, f"is_{part}") for part in parts}
    sites = {name: module for name, module in modules.items() if any(test(name) for test in tests.values())}
    for part, test in tests.items():
        if not any(test(name) for name in sites):
            raise UserError(f"method adapter found no {part.replace('_', ' ')} module in this {family.name} model; "
                            f"add its name pattern to Family.{part} in deltatune/models/families.py or set "
                            f"model.family")
    for name in sites:
        saved = next((skip for skip in excluded if name == skip or name.startswith(f"{skip}.")), None)
        if saved is not None:
            raise UserError(f"method.modules_to_save trains {saved!r} in full, but the {placement} adapter wraps "
                            f"{name!r}; leave it out of modules_to_save (a narrower pattern, e.g. "
                            f"attention.output.LayerNorm rather than LayerNorm)")
    for name, module in sites.items():
        _check_wrappable(name, module)
    return sites


def _check_wrappable(name: str, module: nn.Module) -> None:
    if isinstance(module, BottleneckLayer):
        return
    if isinstance(module, AdapterLayer):
        raise UserError(f"method adapter cannot wrap {name!r}: it already carries {type(module).__name__} adapters "
                        f"of another method; use one adapter method per module")
    if output_size(module) is None:
        raise UserError(f"method adapter puts adapters at {name!r}, a {type(module).__name__}, but needs a Linear or "
                        f"a LayerNorm there; fix the family's attention_output/mlp_output(_norm) patterns in "
                        f"deltatune/models/families.py")


def _check_saved(modules: dict[str, nn.Module], module_name: str, parts: dict[str, Tensor]) -> int:
    """The saved bottleneck width, after checking the module exists and every tensor fits it."""
    module = modules.get(module_name)
    if module is None:
        close = ", ".join(closest_names(module_name, [m for m in modules if m], limit=3))
        raise UserError(f"the adapter adapts {module_name!r}, which this model lacks (closest: {close}); it was "
                        f"saved for a different base model")
    _check_wrappable(module_name, module)
    base = module.base_layer if isinstance(module, BottleneckLayer) else module
    size = output_size(base)
    missing = [key for key in FILE_KEYS if key not in parts]
    if missing:
        raise UserError(f"{module_name}: the adapter file lacks {missing[0]!r}; re-save the adapter")
    width = int(parts["adapter_down.weight"].shape[0])
    expected = {"adapter_down.weight": (width, size), "adapter_down.bias": (width,),
                "adapter_up.weight": (size, width), "adapter_up.bias": (size,)}
    for key, shape in expected.items():
        if tuple(parts[key].shape) != shape:
            raise UserError(f"{module_name}.{key}: the adapter's shape {tuple(parts[key].shape)} does not fit the "
                            f"model's {shape}; it was saved for a different base model")
    return width
