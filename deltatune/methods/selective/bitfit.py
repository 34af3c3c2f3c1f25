"""BitFit (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models"): only the bias terms train, plus the new task head.

Update: for every layer y = W x + b, W stays frozen and only b moves; about 0.1% of a BERT's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods import register_method
from deltatune.methods.base import Method, set_trainable
from deltatune.models.families import Family


@dataclass
class BitFitConfig(MethodConfig):
    name: str = "bitfit"
    train_head: bool = True  # a freshly initialised head must train or the model cannot learn the task


@register_method("bitfit")
class BitFit(Method):
    description = "train only bias terms (and the task head)"
    search_space = {"train.lr": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True}}
    config_class = BitFitConfig

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [("train_head", "sometimes")]

    def apply(self, model: nn.Module, family: Family) -> None:
        config: BitFitConfig = self.config  # type: ignore[assignment]
        # Counted apart from the head: on a model without biases (Llama, Qwen2) but with a new head, the head alone
        # would train, a linear probe rather than BitFit. Checked before anything is frozen.
        if not any(_is_bias(name) and not family.is_head(name) for name, _ in model.named_parameters()):
            raise UserError("method bitfit found no bias parameters outside the task head in this model (e.g. "
                            "Llama has none); choose another method, e.g. lora")
        set_trainable(model, lambda name: _is_bias(name) or (config.train_head and family.is_head(name)))


def _is_bias(name: str) -> bool:
    return name.endswith(".bias")
