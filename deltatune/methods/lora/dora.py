"""DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): LoRA with `use_dora` on by default.

W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖: the direction of the weight takes the low-rank update, a trainable magnitude m
(one value per output unit, initialised to ‖W‖) rescales it. The same layers, options and files as `lora`; this
entry only changes the default, so `method.name=dora` is a one-word switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltatune.config.schema import MethodConfig
from deltatune.methods import register_method
from deltatune.methods.lora.lora import LoRA, LoRAConfig


@dataclass
class DoRAConfig(LoRAConfig):
    name: str = "dora"
    use_dora: bool = True


@register_method("dora")
class DoRA(LoRA):
    description = "weight-decomposed LoRA: low-rank direction update plus a trained magnitude per output"
    config_class: ClassVar[type[MethodConfig]] = DoRAConfig
    peft_type: ClassVar[str | None] = None  # PEFT files with use_dora are LoRA files: `lora` reads and writes them
