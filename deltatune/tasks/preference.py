"""Preference pairs for a causal language model: a prompt with a chosen and a rejected response per row (DPO).

Roles: `prompt`, `chosen`, `rejected` (default columns of the same names) and an optional `margin` (a number per
pair, for objectives that use one). Each example is nested, {"chosen": {input_ids, labels}, "rejected": {...}}: the
prompt wrapped in the tokenizer's chat template as causal-LM SFT does, then the response; labels hold the response
tokens only (IGNORE_INDEX on the prompt and template). Batches are {"chosen": {input_ids, attention_mask, labels},
"rejected": {...}[, "margin"]}, both halves right-padded to one length (see `deltatune.data.preference`).

The same rows scored by a sequence classifier (a reward model) are the task `reward-pairs`: which form a run needs
follows from the model's head, and the task is what decides the head, so the two forms are two tasks.
Trained with objective `dpo` by default; `deltatune generate` accepts its runs (the model is a language model).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from deltatune.config.schema import DataConfig
from deltatune.data import DatasetBundle
from deltatune.data.preference import PreferenceCollator, encode_language_model_pairs, encode_pair_splits
from deltatune.data.table import Table
from deltatune.data.text import pad_token_id
from deltatune.errors import UserError
from deltatune.tasks import register_task
from deltatune.tasks.base import Task

PREFERENCE_ROLES: dict[str, str | None] = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                                           "margin": None}


@register_task("preference")
class Preference(Task):
    description = "prompt/chosen/rejected preference pairs for a causal language model (DPO)"
    roles = PREFERENCE_ROLES
    default_objective = "dpo"
    auto_class = "AutoModelForCausalLM"
    can_generate = True

    def encode(self, table: Table, splits: dict[str, list[int]], data: DataConfig, processor: Any,
               num_labels: int | None) -> DatasetBundle:
        """Nested chosen/rejected SFT examples (response-only labels) per pair, right-padded in batches."""
        tokenizer = processor
        if not callable(tokenizer):
            raise UserError("preference pairs need a tokenizer; pick a language model (e.g. smollm2-135m)")
        encode = partial(encode_language_model_pairs, tokenizer, max_length=data.max_length)
        parts = encode_pair_splits(table, splits, encode)
        return DatasetBundle(parts["train"], parts["validation"], parts["test"],
                             PreferenceCollator(pad_token_id(tokenizer), "right"), None, None, splits)
