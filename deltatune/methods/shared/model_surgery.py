"""Finding, adding and activating adapter layers in a model: what every method does to the model it adapts.

Everything here works on any module implementing `AdapterLayer` (`protocol.py`). The public adapter API in
`deltatune.adapters` (merge, delete, save/load, ...) builds on these functions and re-exports them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

from deltatune.errors import UserError
from deltatune.methods.shared.protocol import AdapterLayer
from deltatune.methods.shared.switch import MergeableSwitch


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


def require_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """A UserError naming the adapters `model` has unless it has every one of `names`."""
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


def check_unmerged(model: nn.Module, name: str) -> None:
    """A UserError if an adapter is merged into `model`'s weights, before new adapter `name` is applied: activating
    it would keep the layers merged (the new adapter outside the graph, so it never trains) or unmerge them
    (dropping the merged adapter's effect), both silently."""
    merged = [module for module, layer in adapter_layers(model).items()
              if isinstance(layer, MergeableSwitch) and layer.merged is not None]
    if merged:
        raise UserError(f"cannot add adapter {name!r}: adapters are merged into this model's weights (e.g. at "
                        f"{merged[0]}); call deltatune.unmerge(model) first, or merge_and_unload it to adapt the "
                        f"merged model")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def set_adapter(model: nn.Module, name: str) -> None:
    """Compute with adapter `name`: layers holding it use it, the others contribute nothing."""
    require_adapters(model, [name])
    for layer in adapter_layers(model).values():
        layer.set_active(name if name in layer.adapter_names() else None)
