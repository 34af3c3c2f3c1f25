"""Full fine-tuning: every parameter trains (the baseline every other method is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.config.schema import MethodConfig
from deltatune.methods import register_method
from deltatune.methods.base import Method, set_trainable
from deltatune.models.families import Family


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"


@register_method("full")
class FullFineTuning(Method):
    description = "every parameter trains"
    search_space = {"train.lr": {"type": "float", "low": 1e-5, "high": 3e-4, "log": True}}
    config_class = FullConfig
    model_kinds = frozenset({"transformer", "cnn", "dual-encoder"})  # every weight trains, whatever the model

    def apply(self, model: nn.Module, family: Family) -> None:
        set_trainable(model, lambda name: True)
