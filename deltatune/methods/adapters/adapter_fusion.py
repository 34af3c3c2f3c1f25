"""AdapterFusion (Pfeiffer et al., 2021, EACL, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning"): combine bottleneck adapters trained on other tasks through a learned attention over their outputs.

Stage 1 trains n `adapter` adapters separately. Stage 2 (this method) loads them frozen and learns, at every adapted
module, a fusion layer. With h the adapters' input (the module's output; for Pfeiffer adapters the block's
normalised output) and aᵢ = adapterᵢ(h) each adapter's update (its output minus the residual h):

    sᵢ = (W_Q h + b_Q) · (W_K aᵢ + b_K),     pᵢ = softmax(s)ᵢ,     u = W_V Σᵢ pᵢ aᵢ

(no 1/√d scaling and no bias on W_V, as in the authors' AdapterHub implementation; W_V Σ pᵢ aᵢ = Σ pᵢ W_V aᵢ).
u joins the layer as a single adapter's update would: y = h + u (Houlsby's position), y = N(s + u) (Pfeiffer's).
Init as in the paper (§3.2): W_Q, W_K ~ N(0, 0.02²), biases 0, so the scores start near 0 and p near uniform; W_V =
identity plus 1e-6 off the diagonal. Fusion therefore starts from the average of the adapters' updates, NOT as the
base model's output (hence `preserves_output_at_init = False`); it equals the base output only when the fused
adapters add nothing (freshly initialised ones, as in `contract_config`). The paper's optional l2 penalty pulling
W_V towards identity is not applied (the training loop has no per-method loss term). The loaded adapters stay
frozen: the fusion layers (3·d² + 2·d parameters per adapted module), the new task head (`modules_to_save`, as in
lora) and any new adapters (below) train.

Which adapters (`adapters`): directories written by `deltatune.save_adapter`, or run directories of `deltatune
train` with method `adapter` (their final `weights/`). Each is added under its directory's name, so
`deltatune.set_adapter(model, name)` also runs one alone. Only their bottleneck weights are read: their task heads
belong to their own tasks. A module some of them do not adapt fuses the others. `num_new_adapters` adds that many
fresh adapters (the adapter method's defaults: houlsby, reduction_factor 16, relu) for the target task, trained
together with the fusion (AdapterHub's "unfreeze adapters" for a new one); they start at zero, so they change
nothing at init. They also make a config valid with no files on disk (`contract_config`).
A fusion is saved with its training run (trainable_state); save_adapter refuses it (it writes single adapters).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods import register_method
from deltatune.methods.adapters.adapter import Adapter, AdapterConfig, bottleneck_size
from deltatune.methods.adapters.bottleneck_layers import (
    PEFT_TYPE,
    BottleneckLayer,
    Composition,
    file_keyed,
    like_options,
)
from deltatune.methods.base import Method, set_trainable
from deltatune.methods.shared.model_surgery import adapter_layers, adapter_names, check_new_name, set_adapter
from deltatune.methods.shared.modules_to_save import add_copies, choose_modules_to_save
from deltatune.methods.shared.protocol import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE
from deltatune.models.families import Family
from deltatune.training.run_dir import RunDir, holds_weights, read_weights


@dataclass
class AdapterFusionConfig(MethodConfig):
    name: str = "adapter_fusion"
    adapters: list[str] = field(default_factory=list)  # save_adapter directories or `adapter` run directories
    num_new_adapters: int = 0  # fresh adapters fused beside them and trained with the fusion (start at zero)
    modules_to_save: list[str] | None = None  # None: the family's new task head


class FusionAttention(Composition):
    """One fusion layer: attention from the sublayer output (query) over the adapters' updates (keys, values)."""

    def __init__(self, size: int, fused: list[str], like: Tensor | None = None) -> None:
        super().__init__(fused)
        self.query = nn.Linear(size, size, **like_options(like))
        self.key = nn.Linear(size, size, **like_options(like))
        self.value = nn.Linear(size, size, bias=False, **like_options(like))
        with torch.no_grad():
            for projection in (self.query, self.key):
                nn.init.normal_(projection.weight, std=0.02)
                nn.init.zeros_(projection.bias)
            # Identity value: the fused update starts as the plain average of the adapters' updates (paper §3.2).
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def forward(self, hidden: Tensor, updates: Tensor) -> Tensor:
        scores = (self.key(updates) @ self.query(hidden).unsqueeze(-1)).squeeze(-1)  # (..., n)
        weights = scores.softmax(dim=-1)
        return self.value((weights.unsqueeze(-1) * updates).sum(dim=-2))


@dataclass
class SavedAdapter:
    """A stage-1 adapter read from disk: its directory name, its settings and its bottleneck tensors (file keys)."""

    name: str
    config: dict[str, Any]
    tensors: dict[str, Tensor]


@register_method("adapter_fusion")
class AdapterFusion(Method):
    description = "AdapterFusion: learned attention over frozen, separately trained bottleneck adapters"
    config_class: ClassVar[type[MethodConfig]] = AdapterFusionConfig
    model_kinds: ClassVar[frozenset[str]] = frozenset({"transformer"})
    # Fusion starts as the average of the fused adapters (the paper's init), not as the base model; see above.
    preserves_output_at_init: ClassVar[bool] = False
    named_adapters: ClassVar[bool] = True  # fusions side by side; save_adapter refuses them (see above)

    def __init__(self, config: MethodConfig, adapter_name: str = "default") -> None:
        super().__init__(config)
        self.adapter_name = adapter_name  # the fusion's name; the fused adapters keep their own

    @classmethod
    def contract_config(cls) -> AdapterFusionConfig:
        return AdapterFusionConfig(num_new_adapters=2)  # no files on disk in the contract tests

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [("num_new_adapters", -1), ("adapters", ["no/such/adapter", "no/such/other"])]

    def apply(self, model: nn.Module, family: Family) -> None:
        config: AdapterFusionConfig = self.config  # type: ignore[assignment]
        validate(config)
        check_new_name(model, self.adapter_name)
        loaded = [read_adapter(path) for path in config.adapters]
        saved = choose_modules_to_save(model, family, config.modules_to_save)
        names = _unique_names([*(adapter.name for adapter in loaded),
                               *(f"new_{index}" for index in range(config.num_new_adapters))],
                              taken={*adapter_names(model), self.adapter_name})
        # Every file is checked against the model before anything changes; a bad one leaves the model as it was.
        steps = [Adapter.plan_peft_load(model, adapter.config, adapter.tensors, name, trainable=False)[0]
                 for adapter, name in zip(loaded, names)]
        check_some_site_fuses_two(loaded, config.num_new_adapters)
        for step in steps:
            step()
        if loaded:  # new adapters sit where the loaded ones do, shaped like them, so each fusion weighs them all
            add_beside(model, names[:len(loaded)], names[len(loaded):], loaded[0].config)
        for name in names[len(loaded):] if not loaded else []:
            Adapter(AdapterConfig(modules_to_save=[]), adapter_name=name).apply(model, family)
        set_trainable(model, lambda name: False)  # the loaded adapters and the base stay frozen
        new = set(names[len(loaded):])
        for layer in adapter_layers(model).values():
            if isinstance(layer, BottleneckLayer):
                fused = [name for name in names if name in layer.bottlenecks]
                for name in new.intersection(fused):
                    layer.bottlenecks[name].requires_grad_(True)  # new adapters train with the fusion
                if fused:
                    layer.add_composition(self.adapter_name, FusionAttention(layer.size, fused, layer.base_weight))
        add_copies(model, saved, self.adapter_name)
        set_adapter(model, self.adapter_name)


def adapted_modules(adapter: SavedAdapter) -> set[str]:
    """The modules a saved adapter's bottlenecks wrap (file keys `<module>.adapter_down.weight`, ...)."""
    return {key.split(".adapter_down.")[0] for key in adapter.tensors if ".adapter_down." in key}


def check_some_site_fuses_two(loaded: list[SavedAdapter], new: int) -> None:
    """A UserError when no adapted module would fuse two adapters: adapters trained with different placements
    (Houlsby's attention and feed-forward outputs, Pfeiffer's feed-forward norm) sit on disjoint modules, and the
    fusion would then weigh each alone. Adapters of one placement on different layers still fuse where they
    overlap (a module some of them do not adapt fuses the others)."""
    if new or len(loaded) < 2:
        return
    sites = [adapted_modules(adapter) for adapter in loaded]
    shared = any(len([modules for modules in sites if module in modules]) >= 2 for module in set().union(*sites))
    if not shared:
        raise UserError(f"method.adapters: {', '.join(adapter.name for adapter in loaded)} adapt no module in common, "
                        "so nothing would be fused; fuse adapters trained with the same placement (or add "
                        "method.num_new_adapters)")


def add_beside(model: nn.Module, loaded: list[str], new: list[str], config: dict[str, Any]) -> None:
    """Bottlenecks `new`, near-identity, on every module holding one of the `loaded` adapters, with the first loaded
    adapter's reduction factor and non-linearity."""
    factor, non_linearity = int(config.get("reduction_factor", 16)), str(config.get("non_linearity", "relu"))
    for layer in adapter_layers(model).values():
        if isinstance(layer, BottleneckLayer) and any(name in layer.bottlenecks for name in loaded):
            for name in new:
                layer.add_bottleneck(name, bottleneck_size(layer.size, factor), non_linearity)


def validate(config: AdapterFusionConfig) -> None:
    """One-line UserErrors for impossible settings, before anything is read or changed."""
    count = config.num_new_adapters
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise UserError(f"method.num_new_adapters must be a whole number, 0 or more, got {count!r}; e.g. 0")
    total = len(config.adapters) + count
    if total < 2:
        raise UserError(f"method.adapters lists {len(config.adapters)} adapter(s), but fusion needs at least 2; list "
                        f"the directories of trained adapters (save_adapter output or `adapter` run directories)")


def read_adapter(path: str) -> SavedAdapter:
    """A stage-1 adapter from a save_adapter directory, a run directory or a run's weights/ directory."""
    directory = Path(path)
    if (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file():
        return _read_adapter_files(directory)
    # A run directory's final weights, or such a weights directory itself: either way named after the run.
    for weights, run_name in ((RunDir(directory).weights, directory.name), (directory, directory.parent.name)):
        if holds_weights(weights):
            return _read_run_weights(weights, run_name)
    what = "does not exist" if not directory.exists() else "holds no saved adapter"
    raise UserError(f"method.adapters: {path} {what}; give a directory written by save_adapter or the directory of "
                    f"a finished `deltatune train` run with method adapter")


def _read_adapter_files(directory: Path) -> SavedAdapter:
    from safetensors.torch import load_file

    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{directory / CONFIG_FILE} is not valid JSON ({error}); re-save the adapter") from None
    if config.get("peft_type") != PEFT_TYPE:
        raise UserError(f"method.adapters: {directory} holds a {config.get('peft_type')} adapter; fusion combines "
                        f"bottleneck adapters trained with method adapter")
    tensors = {key.removeprefix(PEFT_PREFIX): t for key, t in load_file(str(directory / WEIGHTS_FILE)).items()}
    return SavedAdapter(directory.name, config, tensors)


def _read_run_weights(weights: Path, name: str) -> SavedAdapter:
    tensors, state = read_weights(weights)
    method = state.get("method") or {}
    if method.get("name") != "adapter":
        raise UserError(f"method.adapters: {weights} is a {method.get('name')!r} run; fusion combines bottleneck "
                        f"adapters trained with method adapter")
    return SavedAdapter(name, method, file_keyed(tensors))


def _unique_names(wanted: list[str], taken: set[str]) -> list[str]:
    """Adapter names from directory names: dots and other symbols become '_', repeats get a number."""
    names: list[str] = []
    for raw in wanted:
        base = re.sub(r"[^0-9A-Za-z_-]", "_", raw) or "adapter"
        name, number = base, 2
        while name in taken or name in names:
            name, number = f"{base}_{number}", number + 1
        names.append(name)
    return names
