"""The adapter-layer protocol every method's layers implement, and the file layout they are saved in.

`AdapterLayer` is what `deltatune.adapters` (switch, merge, combine, save/load) and the shared module surgery of
`model_surgery.py` rely on; nothing there looks for a particular class. A method class that reads and writes
PEFT's adapter files provides `PeftFormat`. The file names and the key prefix are PEFT's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

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
    is_enabled, set_enabled) comes ready-made in `deltatune.methods.shared.switch`.
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
    PEFT_PREFIX (prompt-learning types keep them under "base_model."), `needs_task_type` (ClassVar[bool]: saving
    is refused when the model's PEFT task type is unknown), and `peft_config_omits` (ClassVar[tuple]),
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
