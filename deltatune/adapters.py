"""Named adapters on one base model: switch, disable, merge, combine, and save/load in PEFT's file format.

    deltatune.apply(model, {"name": "lora", "r": 8})        # adds adapter "default"
    deltatune.save_adapter(model, "out/")                     # adapter_config.json + adapter_model.safetensors
    deltatune.load_adapter(model, "other/", name="other")     # also reads adapters that peft wrote
    deltatune.set_adapter(model, "default")
    with deltatune.disabled(model): base_logits = model(**batch).logits
    deltatune.add_weighted_adapter(model, ["default", "other"], [0.7, 0.3], "mix")

Everything here is method-agnostic: it works on any module implementing the small `AdapterLayer` protocol
(`deltatune.methods.shared.protocol`: LoRA layers, full-copy `modules_to_save`, and later methods alike) and never
looks for a particular class. File formats belong to the methods: a method class that reads and writes PEFT's files
sets `peft_type` and provides the two class methods of `PeftFormat`; `load_adapter` finds it by the file's
`peft_type` through the registry. This module sits above the methods: finding, replacing and activating layers
live in `deltatune.methods.shared.model_surgery` (which methods use) and are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.errors import UserError, closest_names
from deltatune.methods import available_methods
from deltatune.methods.shared.model_surgery import (
    adapter_layers,
    adapter_names,
    base_modules,
    check_new_name,
    check_unmerged,
    replace_module,
    require_adapters,
    set_adapter,
)
from deltatune.methods.shared.modules_to_save import ModulesToSaveLayer
from deltatune.methods.shared.protocol import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, AdapterLayer, PeftFormat

__all__ = [
    "CONFIG_FILE", "PEFT_PREFIX", "WEIGHTS_FILE", "AdapterLayer", "PeftFormat", "adapter_layers", "adapter_names",
    "add_weighted_adapter", "base_modules", "check_new_name", "delete_adapter", "disabled", "load_adapter", "merge",
    "merge_and_unload", "replace_module", "save_adapter", "set_adapter", "unmerge", "AdaptersDisabled",
    "switches_off_fully",
]


# ---- switching off, merging, deleting, combining --------------------------------------------------------------
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


def switches_off_fully(model: nn.Module) -> bool:
    """True when `disabled(model)` gives back the model as it was before its method was applied: it has adapter
    layers and every trainable parameter lives inside one (full fine-tuning, BitFit or sparse change base weights,
    which no switch can undo)."""
    layers = adapter_layers(model)
    inside = {id(param) for layer in layers.values() for param in layer.parameters()}
    return bool(layers) and all(id(param) in inside for param in model.parameters() if param.requires_grad)


class AdaptersDisabled(nn.Module):
    """A frozen view of `model` with every adapter switched off: the base model without a second copy in memory (a
    DPO/PPO reference). Each call runs `model` in eval mode, without gradients, inside `disabled(model)`, and
    restores every module's mode afterwards. The model is kept outside this module's tree, so its parameters are never
    counted, saved, moved or optimised twice."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.__dict__["policy"] = model  # not a registered submodule (see the docstring)

    def forward(self, *args: object, **kwargs: object) -> object:
        policy: nn.Module = self.__dict__["policy"]
        # Each module's own mode comes back, not one flag for all: training keeps frozen BatchNorms in eval mode.
        modes = [(module, module.training) for module in policy.modules()]
        policy.eval()
        try:
            with torch.no_grad(), disabled(policy):
                return policy(*args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training


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
    require_adapters(model, [name])
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
    require_adapters(model, names)
    check_new_name(model, new_name)
    layers = list(adapter_layers(model).values())
    try:
        for layer in layers:
            layer.combine(names, weights, new_name)
    except BaseException:  # a layer that cannot combine (DoRA) leaves no half-made adapter behind
        for layer in layers:
            if new_name in layer.adapter_names():
                layer.delete_adapter(new_name)
        raise


# ---- files ----------------------------------------------------------------------------------------------------
def _format_for(peft_type: str) -> type[PeftFormat]:
    formats = {getattr(method, "peft_type", None): method for method in available_methods().values()}
    formats.pop(None, None)
    if peft_type not in formats:
        raise UserError(f"adapter type {peft_type!r} is not supported; deltatune reads {', '.join(sorted(formats))}")
    return formats[peft_type]  # type: ignore[return-value]


def save_adapter(model: nn.Module, path: str | Path, name: str = "default") -> None:
    """Write adapter `name` as PEFT does: `adapter_config.json` + `adapter_model.safetensors` in directory `path`,
    loadable with `peft.PeftModel.from_pretrained(base_model, path)`."""
    from safetensors.torch import save_file

    require_adapters(model, [name])
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
    task_type = _task_type(model)
    if task_type is None and getattr(file_format, "needs_task_type", False):
        raise UserError(f"PEFT applies a {peft_type} adapter only through a task-specific PeftModel, and "
                        f"{type(model).__name__} is none of the heads it knows (causal LM, sequence or token "
                        f"classification, seq2seq, question answering); PEFT would load it and ignore it")
    config = {"peft_type": peft_type, "task_type": task_type,
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
    """PEFT's task type, which picks the PeftModel class that from_pretrained builds: from transformers' own lists
    of the classes of each head (GPT2LMHeadModel is a causal LM without the "ForCausalLM" suffix), else from the
    class name's suffix."""
    from transformers.models.auto import modeling_auto

    class_name = type(model).__name__
    for mapping, task in (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                          ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                          ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                          ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
                          ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS")):
        names = getattr(modeling_auto, mapping, {}).values()
        if any(class_name == name or (isinstance(name, tuple) and class_name in name) for name in names):
            return task
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
    check_unmerged(model, name)
    file_format = _format_for(str(config.get("peft_type")))
    prefix = getattr(file_format, "peft_key_prefix", PEFT_PREFIX)
    tensors = {key.removeprefix(prefix): tensor for key, tensor in read_safetensors(weights_path).items()}
    steps = _plan_modules_to_save(model, config.get("modules_to_save") or [], tensors, name, trainable)
    claimed = {key for key in tensors if any(key.startswith(f"{module}.") for module in steps)}
    apply_method, method_keys = file_format.plan_peft_load(
        model, config, {k: v for k, v in tensors.items() if k not in claimed}, name, trainable)
    # PEFT's bias="all" also saves the biases inside its full-copy wrappers (original_module, modules_to_save):
    # the copies are loaded above, and the original is the base's own.
    wrapped = (".original_module.", ".modules_to_save.")
    apply_base = _plan_base_tensors(model, {k: v for k, v in tensors.items() if k not in claimed | method_keys
                                            and not any(part in k for part in wrapped)})
    apply_method()
    for apply_copy in steps.values():
        apply_copy()
    apply_base()
    _freeze_base(model, trainable_biases=[key for key in tensors if key.endswith(".bias")] if trainable else [])
    if activate:
        set_adapter(model, name)


def _freeze_base(model: nn.Module, trainable_biases: list[str]) -> None:
    """As PEFT's from_pretrained: the base model is frozen once an adapter is loaded (only adapters train, and a
    re-saved adapter then lists as trained only the biases its file trained). Adapters keep their settings."""
    layers = list(adapter_layers(model).values())
    inside = {id(param) for layer in layers for param in layer.parameters()}
    # the modules a layer wraps, under PEFT's names for them (LoRA's base_layer, a full copy's original_module)
    wrapped = {id(param) for layer in layers for attribute in ("base_layer", "original_module")
               if isinstance(getattr(layer, attribute, None), nn.Module)
               for param in getattr(layer, attribute).parameters()}
    for param in model.parameters():
        if id(param) not in inside or id(param) in wrapped:
            param.requires_grad_(False)
    params = _parameters_by_base_name(model)
    for key in trainable_biases:
        if _base_name(key) in params:
            params[_base_name(key)].requires_grad_(True)


def _plan_modules_to_save(model: nn.Module, entries: list[str], tensors: dict[str, Tensor], name: str,
                          trainable: bool) -> dict[str, Callable[[], None]]:
    """Module name -> the step that adds its full copy for adapter `name`, after checking keys and shapes."""
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
    params = _parameters_by_base_name(model)
    for key, tensor in tensors.items():
        target = params.get(_base_name(key))
        if target is None:
            close = ", ".join(closest_names(key, list(params), limit=3))
            raise UserError(f"the adapter has weights for {key!r}, which this model lacks (closest: {close}); "
                            f"it was saved for a different base model")
        _check_shapes(key, {"": tensor}, {"": target})

    def apply() -> None:
        with torch.no_grad():
            for key, tensor in tensors.items():
                params[_base_name(key)].copy_(tensor)

    return apply


def _base_name(key: str) -> str:
    """A parameter's name without the wrapper level: our wrappers and PEFT's both put the wrapped module under
    `base_layer`, so names are compared without it."""
    return key.replace(".base_layer.", ".")


def _parameters_by_base_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return {_base_name(name): param for name, param in model.named_parameters(remove_duplicate=False)}


def _check_shapes(module_name: str, saved: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    for key, tensor in saved.items():
        where = f"{module_name}.{key}" if key else module_name
        if key not in expected:
            raise UserError(f"the adapter has {where!r}, which this model lacks; it was saved for a different base")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{where}: the adapter's shape {tuple(tensor.shape)} does not fit the model's "
                            f"{tuple(expected[key].shape)}; it was saved for a different base model")
