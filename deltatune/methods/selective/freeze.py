"""Selective fine-tuning: freeze the network except what is chosen.

Choices combine: the task head, the last N repeated blocks (from the family table, together with whatever sits
between the blocks and the head, e.g. Llama's final norm or EfficientNet's conv head), and regex patterns on
parameter names. For CNNs this gives the classic transfer-learning ladder: head only (`last_n_blocks: 0`), head
plus the last few blocks, and - with the `full` method - the whole network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deltatune.errors import UserError
from deltatune.methods import register_method
from deltatune.methods.base import Method, set_trainable
from deltatune.methods.shared.layer_selection import LayerSelectionConfig, SelectsLayers
from deltatune.models.families import Family


@dataclass
class FreezeConfig(LayerSelectionConfig):
    name: str = "freeze"
    train_head: bool = True
    last_n_blocks: int = 0
    patterns: list[str] = field(default_factory=list)  # regexes searched in parameter names; matches train too


@register_method("freeze")
class Freeze(SelectsLayers, Method):
    description = "train only the head, the last N blocks and/or parameters matching name patterns"
    config_class = FreezeConfig

    @classmethod
    def contract_config(cls) -> FreezeConfig:
        # Head-only selects nothing on a causal LM (its head is pretrained), so the contract uses the last block.
        return FreezeConfig(last_n_blocks=1)

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [("last_n_blocks", -1), ("last_n_blocks", 9), ("patterns", ["("]), ("train_head", "yes")]

    def apply_to_blocks(self, model: nn.Module, family: Family) -> None:
        config: FreezeConfig = self.config  # type: ignore[assignment]
        total_blocks = family.num_blocks(model)
        if config.last_n_blocks < 0 or config.last_n_blocks > total_blocks:
            raise UserError(
                f"method.last_n_blocks={config.last_n_blocks} but the model has {total_blocks} {family.name} blocks; "
                f"use a value from 0 to {total_blocks}"
            )
        patterns = [self._compile(pattern) for pattern in config.patterns]
        first_trained_block = total_blocks - config.last_n_blocks

        def keep(name: str) -> bool:
            if config.train_head and family.is_head(name):
                return True
            if family.selected_blocks is not None and family.in_selected_block(name):
                return True  # method.layers: these blocks train in full
            if config.last_n_blocks > 0:
                index = family.block_index(name)
                if (index is not None and index >= first_trained_block) or family.is_after_blocks(name):
                    return True
            return any(pattern.search(name) for pattern in patterns)

        if set_trainable(model, keep) == 0:
            raise UserError(
                "method freeze selected no parameter to train; set method.train_head=true, "
                "method.last_n_blocks>0 or method.patterns that match parameter names"
            )

    @staticmethod
    def _compile(pattern: str) -> re.Pattern[str]:
        try:
            return re.compile(pattern)
        except re.error as error:
            raise UserError(f"method.patterns: {pattern!r} is not a valid regular expression ({error})") from None
