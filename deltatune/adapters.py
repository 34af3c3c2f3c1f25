"""Named adapters on one base model: switch, disable, merge, combine, and save/load in PEFT's file format.

    deltatune.apply(model, {"name": "lora", "r": 8})        # adds adapter "default"
    deltatune.save_adapter(model, "out/")                     # adapter_config.json + adapter_model.safetensors
    deltatune.load_adapter(model, "other/", name="other")     # also reads adapters that peft wrote
    deltatune.set_adapter(model, "default")
    with deltatune.disabled(model): base_logits = model(**batch).logits
    deltatune.add_weighted_adapter(model, ["default", "other"], [0.7, 0.3], "mix")

Everything here is method-agnostic: it works on any module implementing the small `AdapterLayer` protocol below
(LoRA layers, full-copy `modules_to_save`, and later methods alike) and never looks for a particular class. File
formats belong to the methods: a method class that reads and writes PEFT's files sets `peft_type` and provides
the two class methods of `PeftFormat`; `load_adapter` finds it by the file's `peft_type` through the registry.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from deltatune.errors import UserError, closest_names

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT stores keys relative to PeftModel, whose base model sits under this path


@runtime_checkable
class AdapterLayer(Protocol):
    """A module holding named adapters around (or beside) a part of the base model.

    peft_type: the PEFT type its tensors belong to ("LORA"), or None when it joins an adapter of any type
    (modules_to_save). weights_changed_by_merge lists the base tensors merge() rewrites in place (so merging can
    refuse tied weights). adapter_state returns the adapter's tensors under PEFT's keys relative to the module
    (e.g. "lora_A.weight"). combine creates `new_name` as the weighted sum of the named adapters' updates, skipping
    names the layer does not hold. set_active(None) makes the layer contribute nothing. The switch part (set_active,
    is_enabled, set_enabled) comes ready-made in `deltatune.methods._adapter_switch`.
    """

    peft_type: ClassVar[str | None]

    def adapter_names(self) -> list[str]: ...
    def set_active(self, name: str | None) -> None: ...
    def is_enabled(self) -> bool: ...
    def set_enabled(self, enabled: bool) -> None: ...
    def merge(self) -> None: ...
    def unmerge(self) -> None: ...
    def weights_changed_by_merge(self) -> list[Tensor]: ...
    def unwrap(self) -> nn.Module: ...
    def combine(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None: ...
    def adapter_state(self, name: str) -> dict[str, Tensor]: ...
    def delete_adapter(self, name: str) -> None: ...


class PeftFormat(Protocol):
    """What a method class provides to read and write PEFT's adapter files (set `peft_type` on the class).

    Optional: `peft_key_prefix` (ClassVar[str]), where the file keeps the base model's modules when it is not
    PEFT_PREFIX (prompt-learning types keep them under "base_model."), and `peft_config_omits` (ClassVar[tuple]),
    common fields its config class lacks (they have no "bias"). A layer that is no part of the base model (a
    prompt encoder) sets `outside_base_model = True`: its `adapter_state` keys are then the file's own keys.
    """

    peft_type: ClassVar[str | None]

    @classmethod
    def peft_config(cls, model: nn.Module, layers: dict[str, AdapterLayer], name: str) -> dict[str, Any]:
        """The method's fields of adapter_config.json for adapter `name` held by `layers` (module name -> layer)."""

    @classmethod
    def plan_peft_load(cls, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], name: str,
                       trainable: bool) -> tuple[Callable[[], None], set[str]]:
        """Validate `tensors` (keys relative to the base model) against `model` without changing it; return the
        function that then adds adapter `name`, and the keys it consumed. Bad input is a UserError."""


# ---- finding layers ------------------------------------------------------------------------------------------
def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module as the base model names it: an adapter layer stands for the module it
    wraps and is not descended into (its internals are not part of the base)."""
    yield prefix, model
    if isinstance(model, AdapterLayer):
        return
    for child_name, child in model.named_children():
        yield from base_modules(child, f"{prefix}.{child_name}" if prefix else child_name)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer in `model` by module name."""
    return {name: module for name, module in base_modules(model) if isinstance(module, AdapterLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on `model`, in the order they were added."""
    names: dict[str, None] = {}
    for layer in adapter_layers(model).values():
        names.update(dict.fromkeys(layer.adapter_names()))
    return list(names)


def _require(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    for name in names:
        if name not in known:
            listing = ", ".join(known) if known else "none (apply a method or load_adapter first)"
            raise UserError(f"no adapter named {name!r} on this model; adapters: {listing}")


def check_new_name(model: nn.Module, name: str) -> None:
    """A UserError unless `name` can name a new adapter on `model`."""
    if not name or "." in name:
        raise UserError(f"adapter name {name!r} is not valid; use a non-empty name without dots (e.g. 'default')")
    if name in adapter_names(model):
        raise UserError(f"the model already has an adapter named {name!r}; choose another name or delete_adapter it")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ---- switching ------------------------------------------------------------------------------------------------
def set_adapter(model: nn.Module, name: str) -> None:
    """Compute with adapter `name`: layers holding it use it, the others contribute nothing."""
    _require(model, [name])
    for layer in adapter_layers(model).values():
        layer.set_active(name if name in layer.adapter_names() else None)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`with disabled(model): ...` runs the base model: every adapter layer is off (merged ones unmerge for the
    duration and merge again afterwards)."""
    layers = list(adapter_layers(model).values())
    previous = [layer.is_enabled() for layer in layers]
    for layer in layers:
        layer.set_enabled(False)
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.set_enabled(enabled)


def merge(model: nn.Module) -> None:
    """Fold each layer's active adapter into the base weights (same outputs, no adapter cost per call)."""
    layers = adapter_layers(model)
    _refuse_tied(model, layers)
    for layer in layers.values():
        layer.merge()


def _refuse_tied(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Merging rewrites a weight in place; if another module shares it (tied embeddings), that module would change
    too, so refuse before touching anything."""
    users: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(param), []).append(name)
    for layer_name, layer in layers.items():
        for weight in layer.weights_changed_by_merge():
            outside = [name for name in users.get(id(weight), []) if not name.startswith(f"{layer_name}.")]
            if outside:
                raise UserError(f"cannot merge into {layer_name}: its weight is tied to {outside[0]}, which would "
                                f"change too; untie the weights before adapting, or keep the adapter unmerged")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters in and replace every adapter layer by the plain module it then equals (and every
    module offering `to_standard_module()` by that module), leaving a model with the original architecture (what
    `deltatune export` saves). Returns `model`, changed in place."""
    merge(model)
    for name, layer in adapter_layers(model).items():
        plain = layer.unwrap()
        for param in plain.parameters():
            param.requires_grad_(False)
        if name:
            replace_module(model, name, plain)
        else:
            raise UserError("the whole model is one adapter layer; nothing to unload it into")
    # Frozen stand-ins for standard modules (qlora's 4-bit NF4Linear for nn.Linear) that no adapter wrapped go
    # back to the standard module too, so the result loads where deltatune is not installed.
    for name, module in list(model.named_modules()):
        to_standard = getattr(module, "to_standard_module", None)
        if name and callable(to_standard):
            replace_module(model, name, to_standard())
    return model


def unmerge(model: nn.Module) -> None:
    """Undo `merge`, restoring the base weights (up to floating-point rounding)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer holding it."""
    _require(model, [name])
    for layer in adapter_layers(model).values():
        if name in layer.adapter_names():
            layer.delete_adapter(name)


def add_weighted_adapter(model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
    """New adapter `new_name` whose update is Σ weightᵢ · updateᵢ of the named adapters (exact for LoRA: the
    factors are concatenated, so ranks may differ). It is not activated; call set_adapter."""
    names, weights = list(names), [float(weight) for weight in weights]
    if not names or len(names) != len(weights):
        raise UserError(f"add_weighted_adapter needs one weight per adapter; got {len(names)} names and "
                        f"{len(weights)} weights")
    _require(model, names)
    check_new_name(model, new_name)
    for layer in adapter_layers(model).values():
        layer.combine(names, weights, new_name)


# ---- files ----------------------------------------------------------------------------------------------------
def _format_for(peft_type: str) -> type[PeftFormat]:
    from deltatune.methods import available_methods

    formats = {getattr(method, "peft_type", None): method for method in available_methods().values()}
    formats.pop(None, None)
    if peft_type not in formats:
        raise UserError(f"adapter type {peft_type!r} is not supported; deltatune reads {', '.join(sorted(formats))}")
    return formats[peft_type]  # type: ignore[return-value]


def save_adapter(model: nn.Module, path: str | Path, name: str = "default") -> None:
    """Write adapter `name` as PEFT does: `adapter_config.json` + `adapter_model.safetensors` in directory `path`,
    loadable with `peft.PeftModel.from_pretrained(base_model, path)`."""
    from safetensors.torch import save_file

    _require(model, [name])
    layers = {module: layer for module, layer in adapter_layers(model).items() if name in layer.adapter_names()}
    types = {layer.peft_type for layer in layers.values()} - {None}
    if len(types) != 1:
        raise UserError(f"adapter {name!r} has no single PEFT type ({sorted(map(str, types))}); it cannot be saved")
    peft_type = types.pop()
    assert peft_type is not None
    file_format = _format_for(peft_type)
    prefix = getattr(file_format, "peft_key_prefix", PEFT_PREFIX)
    tensors: dict[str, Tensor] = {}
    for module_name, layer in layers.items():
        where = "" if getattr(layer, "outside_base_model", False) else f"{prefix}{module_name}."
        for key, tensor in layer.adapter_state(name).items():
            tensors[f"{where}{key}"] = tensor.detach().to("cpu").contiguous()
    biases = _trained_biases(model)
    tensors.update({f"{prefix}{key}": tensor.detach().to("cpu").contiguous() for key, tensor in biases.items()})
    config = {"peft_type": peft_type, "task_type": _task_type(model),
              "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
              "inference_mode": True, "bias": _bias_mode(biases),
              "modules_to_save": [module for module, layer in layers.items() if layer.peft_type is None] or None}
    own = {module: layer for module, layer in layers.items() if layer.peft_type == peft_type}
    config.update(file_format.peft_config(model, own, name))
    for key in getattr(file_format, "peft_config_omits", ()):
        config.pop(key, None)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def _trained_biases(model: nn.Module) -> dict[str, Tensor]:
    """Base-model biases that train (LoRA's bias="all"/"lora_only"); adapters' own copies are not among them."""
    found = {}
    for module_name, module in base_modules(model):
        inner = getattr(module, "base_layer", None) if isinstance(module, AdapterLayer) else module
        if isinstance(inner, nn.Module):
            bias = inner._parameters.get("bias")
            if bias is not None and bias.requires_grad:
                owner = f"{module_name}.base_layer" if inner is not module else module_name
                found[f"{owner}.bias"] = bias
    return found


def _bias_mode(biases: dict[str, Tensor]) -> str:
    if not biases:
        return "none"
    return "lora_only" if all(key.endswith(".base_layer.bias") for key in biases) else "all"


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task type, which picks the PeftModel class that from_pretrained builds."""
    class_name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS")):
        if class_name.endswith(suffix):
            return task
    return None


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", activate: bool = True,
                 trainable: bool = False) -> None:
    """Add the adapter in directory `path` (written by `save_adapter` or by peft) to `model` as `name`.

    Everything is validated before the model changes: a file for a different base is a UserError naming the module
    and both shapes, and leaves the model as it was. `activate` makes it the active adapter; `trainable` lets its
    parameters train (default: frozen, for inference). Never unpickles: `adapter_model.bin` is refused, and an
    unreadable config or weights file (a renamed pickle, a truncated download) is a UserError naming the file."""
    from deltatune.models.weight_files import read_json_object, read_safetensors

    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not weights_path.is_file() and (directory / "adapter_model.bin").is_file():
        raise UserError(f"{directory}/adapter_model.bin is a pickle, which deltatune never loads; convert it to "
                        f"safetensors first (e.g. load with peft and save_pretrained(..., safe_serialization=True))")
    for required in (config_path, weights_path):
        if not required.is_file():
            raise UserError(f"{required} not found; give a directory written by save_adapter or peft's save_pretrained")
    config = read_json_object(config_path, "re-save the adapter")
    check_new_name(model, name)
    file_format = _format_for(str(config.get("peft_type")))
    prefix = getattr(file_format, "peft_key_prefix", PEFT_PREFIX)
    tensors = {key.removeprefix(prefix): tensor for key, tensor in read_safetensors(weights_path).items()}
    steps = _plan_modules_to_save(model, config.get("modules_to_save") or [], tensors, name, trainable)
    claimed = {key for key in tensors if any(key.startswith(f"{module}.") for module in steps)}
    apply_method, method_keys = file_format.plan_peft_load(
        model, config, {k: v for k, v in tensors.items() if k not in claimed}, name, trainable)
    apply_base = _plan_base_tensors(model, {k: v for k, v in tensors.items() if k not in claimed | method_keys})
    apply_method()
    for apply_copy in steps.values():
        apply_copy()
    apply_base()
    if activate:
        set_adapter(model, name)


def _plan_modules_to_save(model: nn.Module, entries: list[str], tensors: dict[str, Tensor], name: str,
                          trainable: bool) -> dict[str, Callable[[], None]]:
    """Module name -> the step that adds its full copy for adapter `name`, after checking keys and shapes."""
    from deltatune.methods._modules_to_save import ModulesToSaveLayer

    modules = dict(base_modules(model))
    # PEFT's rule: a module is saved when its name ends with an entry; keep the outermost of nested matches.
    matched = [m for m in modules if m and any(m.endswith(entry) for entry in entries)]
    matched = [m for m in matched if not any(m.startswith(f"{outer}.") for outer in matched)]
    steps: dict[str, Callable[[], None]] = {}
    for module_name in matched:
        state = {k.removeprefix(f"{module_name}."): v for k, v in tensors.items() if k.startswith(f"{module_name}.")}
        if not state:
            continue  # e.g. PEFT adds "score" for every classifier; only modules with saved weights count
        module = modules[module_name]
        original = module.original_module if isinstance(module, ModulesToSaveLayer) else module
        _check_shapes(module_name, state, dict(original.state_dict()))

        def step(module_name: str = module_name, module: nn.Module = module, state: dict = state) -> None:
            layer = module if isinstance(module, ModulesToSaveLayer) else ModulesToSaveLayer(module)
            if layer is not module:
                replace_module(model, module_name, layer)
            layer.add_copy(name, state, trainable)

        steps[module_name] = step
    return steps


def _plan_base_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> Callable[[], None]:
    """Base weights an adapter file may carry (trained biases; PEFT also saves embedding weights): copied in."""
    # Our wrappers and PEFT's both put the wrapped module under `base_layer`, so compare names without it.
    params = {name.replace(".base_layer.", "."): p for name, p in model.named_parameters(remove_duplicate=False)}
    for key, tensor in tensors.items():
        target = params.get(key.replace(".base_layer.", "."))
        if target is None:
            close = ", ".join(closest_names(key, list(params), limit=3))
            raise UserError(f"the adapter has weights for {key!r}, which this model lacks (closest: {close}); "
                            f"it was saved for a different base model")
        _check_shapes(key, {"": tensor}, {"": target})

    def apply() -> None:
        with torch.no_grad():
            for key, tensor in tensors.items():
                params[key.replace(".base_layer.", ".")].copy_(tensor)

    return apply


def _check_shapes(module_name: str, saved: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    for key, tensor in saved.items():
        where = f"{module_name}.{key}" if key else module_name
        if key not in expected:
            raise UserError(f"the adapter has {where!r}, which this model lacks; it was saved for a different base")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{where}: the adapter's shape {tuple(tensor.shape)} does not fit the model's "
                            f"{tuple(expected[key].shape)}; it was saved for a different base model")
