"""The method registry: every fine-tuning method is one file in a family subpackage plus one `@register_method` line.

A method decides which parameters train and may add new ones. Nothing outside this package knows any method by
name: the config parser, the training loop and the CLI look methods up here. Modules of this package and its
subpackages are imported on the first lookup, so importing `deltatune` registers nothing and has no side effects.

Layout: one subpackage per family, `lora/` (lora, dora, qlora), `adapters/` (adapter, adapter_fusion),
`virtual_tokens/` (prompt, ptuning, prefix, ptuning_v2) and `selective/` (full, freeze, bitfit, sparse); the method
registered as X lives in `<family>/X.py`. What every family builds on and no method owns (the adapter-layer
protocol, module surgery, target selection, modules_to_save, the adapter switch) is in `shared/`; `base.py` is
the `Method` interface. A family imports only itself, `shared/` and `base.py`, and nothing here imports
`deltatune.adapters` (the public API above the methods); `tests/test_architecture.py` checks both.
"""

from __future__ import annotations

from deltatune.methods.base import Method
from deltatune.registry import Registry

METHODS: Registry[type[Method]] = Registry(__name__, "method")
register_method = METHODS.register


def available_methods() -> dict[str, type[Method]]:
    """Registered methods by name, sorted."""
    return METHODS.all()


def get_method(name: str) -> type[Method]:
    """The method class registered as `name`; a UserError naming the valid ones otherwise."""
    return METHODS.get(name, "method", " (see `deltatune methods`)")


__all__ = ["METHODS", "Method", "available_methods", "get_method", "register_method"]
