"""The method registry: every fine-tuning method is one file in this package plus one `@register_method` line.

A method decides which parameters train and may add new ones. Nothing outside this package knows any method by
name: the config parser, the training loop and the CLI look methods up here. Modules of this package are imported
on the first lookup, so importing `deltatune` registers nothing and has no side effects.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from deltatune.errors import UserError, closest_names
from deltatune.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_discovered = False
MethodClass = TypeVar("MethodClass", bound=type[Method])


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    """Class decorator: make a `Method` subclass available under `name` in configs and on the CLI."""

    def decorate(cls: MethodClass) -> MethodClass:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _discover() -> None:
    """Import every module of this package once so their decorators run."""
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    _discovered = True


def available_methods() -> dict[str, type[Method]]:
    """Registered methods by name, sorted."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    """The method class registered as `name`; a UserError naming the valid ones otherwise."""
    methods = available_methods()
    if name not in methods:
        hint = closest_names(name, list(methods), limit=1)
        raise UserError(
            f"unknown method {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
            f"valid methods: {', '.join(methods)} (see `deltatune methods`)"
        )
    return methods[name]


__all__ = ["Method", "available_methods", "get_method", "register_method"]
