"""The switch state shared by every adapter layer (the `AdapterLayer` protocol's set_active /
is_enabled / set_enabled), written once: plain layers mix in `AdapterSwitch`, layers that fold an adapter into
their base weight mix in `MergeableSwitch`."""

from __future__ import annotations


class AdapterSwitch:
    """The switch state every adapter layer keeps, mixed into its nn.Module class: `active` names the adapter in use
    (None: the layer adds nothing), `enabled` False turns them all off at once (`disabled`). The class provides
    `adapter_names()`."""

    active: str | None = None
    enabled: bool = True

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def set_active(self, name: str | None) -> None:
        self._check_adapter(name)
        self.active = name

    def is_enabled(self) -> bool:
        return self.enabled

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def _check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapter_names():
            raise KeyError(f"{type(self).__name__} has no adapter {name!r}")

    def _forget(self, name: str) -> None:
        """Bookkeeping after adapter `name` was deleted."""
        if self.active == name:
            self.active = None


class MergeableSwitch(AdapterSwitch):
    """The switch of layers that can fold their active adapter into the base weight (`merged` names it; the class
    provides `merge()` / `unmerge()`): switching keeps the layer merged, now with the new adapter, and a disabled
    layer unmerges (it must give the base output) until it is enabled again."""

    merged: str | None = None
    _remerge_on_enable: bool = False

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def set_active(self, name: str | None) -> None:
        self._check_adapter(name)
        was_merged = self.merged is not None
        if was_merged and name != self.merged:
            self.unmerge()
        self.active = name
        if was_merged:
            self.merge()

    def set_enabled(self, enabled: bool) -> None:
        if not enabled and self.merged is not None:
            self.unmerge()
            self._remerge_on_enable = True
        self.enabled = enabled
        if enabled and self._remerge_on_enable:
            self._remerge_on_enable = False
            self.merge()
