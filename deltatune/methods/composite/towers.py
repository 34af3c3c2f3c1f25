"""One method per tower of a dual encoder (`deltatune.models.dual_encoder`): e.g. the image tower frozen but for its
last two blocks and a LoRA on the text tower,

    method: {image: {name: freeze, last_n_blocks: 2}, text: {name: lora, r: 8}}

(`name: towers` is implied by the tower keys). Each tower's method is applied to that tower alone, with the family
table entry of that tower's architecture, exactly as it would be to the model on its own; the projections and the
temperature, new in every dual encoder, always train. What each method saves is saved under its tower's prefix.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods import get_method, register_method
from deltatune.methods.base import LossFunction, Method
from deltatune.models.families import Family, family_of


@dataclass
class TowersConfig(MethodConfig):
    # A method section without `name` whose keys are all fields here means this method (see config.loader).
    chosen_by_keys: ClassVar[bool] = True
    name: str = "towers"
    image: MethodConfig = field(default_factory=MethodConfig)  # default: full fine-tuning of the tower
    text: MethodConfig = field(default_factory=MethodConfig)


def model_towers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's towers by name; a UserError for a model that has none."""
    towers = getattr(model, "towers", None)
    if not callable(towers):
        raise UserError("method 'towers' adapts the towers of a dual encoder; set model.name=dual-encoder, or give "
                        "the method section a single method's name")
    return towers()


@register_method("towers")
class Towers(Method):
    description = "a method per tower of a dual encoder (method.image, method.text); the projections train"
    config_class = TowersConfig
    model_kinds = frozenset({"dual-encoder"})

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.methods: dict[str, Method] = {}
        for tower in ("image", "text"):
            tower_config = getattr(config, tower)
            self.methods[tower] = get_method(tower_config.name)(tower_config)

    @classmethod
    def contract_config(cls) -> MethodConfig:
        return TowersConfig(image=get_method("freeze").config_class(last_n_blocks=1),  # type: ignore[call-arg]
                            text=get_method("lora").config_class(r=2))  # type: ignore[call-arg]

    def apply(self, model: nn.Module, family: Family) -> None:
        towers = model_towers(model)
        for name, tower in towers.items():
            method = self.methods[name]
            try:
                method.check_model_kind(tower)
            except UserError as error:
                raise UserError(f"method.{name}: {error}") from None
            method.apply(tower, family_of(tower))
        inside = tuple(f"{name}." for name in towers)
        for parameter_name, parameter in model.named_parameters():
            if not parameter_name.startswith(inside):
                parameter.requires_grad_(True)  # projections and temperature: new, so they always train

    def calibration_needed(self) -> str | None:
        needs = [f"method.{name}: {why}" for name, method in self.methods.items() if (why := method.calibration_needed())]
        return "; ".join(needs) or None

    def calibrate(self, model: nn.Module, batches: Iterable[dict[str, Any]], loss_fn: LossFunction) -> None:
        """Each tower's method sees the same batches, with the loss of the whole dual encoder."""
        copies = itertools.tee(batches, len(self.methods))
        for (name, method), tower_batches in zip(self.methods.items(), copies):
            method.calibrate(model_towers(model)[name], tower_batches, lambda _tower, batch: loss_fn(model, batch))

    def choices(self) -> dict[str, Any]:
        return {name: chosen for name, method in self.methods.items() if (chosen := method.choices())}

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        towers = model_towers(model)
        state = {f"{name}.{key}": value for name, tower in towers.items()
                 for key, value in self.methods[name].trainable_state(tower).items()}
        inside = tuple(f"{name}." for name in towers)
        state.update({name: p.detach() for name, p in model.named_parameters()
                      if p.requires_grad and not name.startswith(inside)})
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        towers = model_towers(model)
        for name, tower in towers.items():
            prefix = f"{name}."
            self.methods[name].load_trainable_state(
                tower, {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})
        own = {key: value for key, value in state.items() if not key.startswith(tuple(f"{n}." for n in towers))}
        Method.load_trainable_state(self, model, own)
