"""Preference pairs scored by a sequence classifier with one output: the data of a reward model.

Roles as in task `preference`: `prompt`, `chosen`, `rejected` and an optional `margin`. Each half of a pair is the
prompt+response as the classifier reads it: the chat-templated conversation when the tokenizer has a chat template
(a decoder reward model sees what the policy writes), else the tokenizer's text pair ([CLS] prompt [SEP] response
[SEP] for BERT-style encoders). No labels: the objective compares the two scores. Batches are {"chosen":
{input_ids, attention_mask[, token_type_ids]}, "rejected": {...}[, "margin"]}, both halves padded to one length on
the tokenizer's padding side. The model gets a new sequence-classification head of one output (the reward).
Trained with objective `reward` by default.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from deltatune.config.schema import DataConfig
from deltatune.data import DatasetBundle
from deltatune.data.preference import PreferenceCollator, encode_pair_splits, encode_scored_pairs
from deltatune.data.table import Table
from deltatune.data.text import pad_token_id
from deltatune.errors import UserError
from deltatune.tasks import register_task
from deltatune.tasks.base import Task
from deltatune.tasks.classification import pad_with_eos
from deltatune.tasks.preference import PREFERENCE_ROLES


@register_task("reward-pairs")
class RewardPairs(Task):
    description = "prompt/chosen/rejected preference pairs scored by a one-output sequence classifier (reward model)"
    roles = PREFERENCE_ROLES
    default_objective = "reward"
    auto_class = "AutoModelForSequenceClassification"
    labelled = True  # a new head, always of one output: the scalar reward

    def encode(self, table: Table, splits: dict[str, list[int]], data: DataConfig, processor: Any,
               num_labels: int | None) -> DatasetBundle:
        """Nested chosen/rejected classifier inputs per pair; the bundle fixes the head at one output."""
        tokenizer = processor
        if not callable(tokenizer):
            raise UserError("reward pairs need a tokenizer; pick a text model (e.g. model.name: minilm-l6)")
        if num_labels not in (None, 1):
            raise UserError(f"model.num_labels is {num_labels} but a reward model has one output (its score); "
                            "leave model.num_labels unset")
        encode = partial(encode_scored_pairs, tokenizer, max_length=data.max_length)
        parts = encode_pair_splits(table, splits, encode)
        collate = PreferenceCollator(pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right") or "right")
        return DatasetBundle(parts["train"], parts["validation"], parts["test"], collate, 1, None, splits)

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Decoder classifiers refuse batches without pad_token_id; see `pad_with_eos`."""
        return pad_with_eos(model)
