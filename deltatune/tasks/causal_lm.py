"""Causal-LM supervised fine-tuning: a prompt and a response per row; the loss is on the response tokens.

Roles: `prompt` (default column "prompt") and `response` (default "response"). Prompts are wrapped in the
tokenizer's chat template when it has one. With `data.packing` the train split is packed into full-length sequences
(examples never attend to each other). Trained with objective `sft` by default; `deltatune generate` accepts its runs.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from deltatune.config.schema import DataConfig
from deltatune.data import DatasetBundle
from deltatune.data.sft import encode_sft, iter_packed, sft_collator
from deltatune.data.splits import SPLIT_NAMES
from deltatune.data.table import Table
from deltatune.errors import UserError
from deltatune.tasks import register_task
from deltatune.tasks.base import Task


@register_task("causal-lm")
class CausalLanguageModelling(Task):
    description = "prompt/response supervised fine-tuning of a causal language model"
    roles = {"prompt": "prompt", "response": "response"}
    default_objective = "sft"
    auto_class = "AutoModelForCausalLM"
    architecture_suffixes = ("ForCausalLM",)
    can_generate = True

    def encode(self, table: Table, splits: dict[str, list[int]], data: DataConfig, processor: Any,
               num_labels: int | None) -> DatasetBundle:
        """Prompt/response SFT examples; the train split is packed when data.packing is set."""
        tokenizer = processor
        if not callable(tokenizer):
            raise UserError("causal-LM fine-tuning needs a tokenizer; pick a language model (e.g. smollm2-135m)")
        parts = {name: encode_sft(tokenizer, table.texts("prompt", splits[name]), table.texts("response", splits[name]),
                                  data.max_length)
                 for name in SPLIT_NAMES}
        packed = self.pack_train(parts["train"], data)
        if packed is not None:
            parts["train"] = list(packed)
        return DatasetBundle(parts["train"], parts["validation"], parts["test"], sft_collator(tokenizer), None, None,
                             splits, packed=bool(data.packing))

    def pack_train(self, examples: Iterable[Any], data: DataConfig) -> Iterator[Any] | None:
        return iter_packed(examples, data.max_length) if data.packing else None
