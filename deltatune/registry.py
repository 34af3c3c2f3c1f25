"""A name → class registry filled by decorators in the modules of one package, discovered on first lookup.

Methods and objectives both use it: adding one is one file with one decorator line, and importing deltatune
imports none of them (no side effects until something is looked up). Discovery imports every module of the
package and its subpackages, whatever their names: module imports have no side effects beyond registering, so
which files are helpers is said by their docstrings and `__all__`, never by a leading underscore.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

from deltatune.errors import UserError, closest_names

Entry = TypeVar("Entry", bound=type)


class Registry(Generic[Entry]):
    def __init__(self, package: str, what: str) -> None:
        self.package, self.what = package, what
        self._entries: dict[str, Entry] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[Entry], Entry]:
        """Class decorator: make the class available under `name` (also sets its `name` attribute)."""

        def decorate(cls: Entry) -> Entry:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.what} {name!r} is registered twice "
                                 f"({self._entries[name].__module__}, {cls.__module__})")
            cls.name = name
            self._entries[name] = cls
            return cls

        return decorate

    def all(self) -> dict[str, Entry]:
        """Every registered entry by name, sorted; imports the package's modules the first time."""
        if not self._discovered:
            package = importlib.import_module(self.package)
            # walk_packages lists a subpackage's modules after importing it; importing each listed module here
            # lets an error in one surface as itself (walk_packages alone would swallow a subpackage's ImportError).
            for module in pkgutil.walk_packages(package.__path__, prefix=f"{self.package}."):
                importlib.import_module(module.name)
            self._discovered = True
        return dict(sorted(self._entries.items()))

    def get(self, name: str, key: str, listing_hint: str = "") -> Entry:
        """The entry called `name`; otherwise a UserError naming the config `key`, a close match and all choices."""
        entries = self.all()
        if name not in entries:
            close = closest_names(name, list(entries), limit=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown {key} {name!r}{guess}; valid: {', '.join(entries)}{listing_hint}")
        return entries[name]
