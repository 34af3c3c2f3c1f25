"""Text classification: a text (or text pair) per row and a class label; the model gets a new sequence head.

Roles: `text` (default column "text"), optional `text_pair` (a second segment, e.g. NLI hypotheses), `label`
(default "label"; integers 0..N-1 or class names). Trained with cross-entropy by default (objective
`classification`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.config.schema import DataConfig
from deltatune.data import DatasetBundle
from deltatune.data.splits import SPLIT_NAMES
from deltatune.data.table import Table
from deltatune.data.text import ClassificationCollator, encode_classification, pad_token_id
from deltatune.errors import UserError
from deltatune.tasks import register_task
from deltatune.tasks.base import Task


@register_task("classification")
class Classification(Task):
    description = "text (pair) classification with a new sequence-classification head"
    roles = {"text": "text", "text_pair": None, "label": "label", "task": None}  # task: meta-learning's episodes
    default_objective = "classification"
    auto_class = "AutoModelForSequenceClassification"
    labelled = True
    architecture_suffixes = ("ForSequenceClassification",)
    architecture_fallback = True  # encoders saved bare (BertModel, ...) get a sequence head

    def encode(self, table: Table, splits: dict[str, list[int]], data: DataConfig, processor: Any,
               num_labels: int | None) -> DatasetBundle:
        """Tokenised text (pair) examples with dynamic-padding collation."""
        tokenizer = processor
        if not callable(tokenizer):
            raise UserError("text classification needs a tokenizer; pick a text model (e.g. model.name: minilm-l6)")
        labels = table.labels("label", num_labels)
        parts: dict[str, list[dict]] = {}
        for name in SPLIT_NAMES:
            indices = splits[name]
            pairs = table.texts("text_pair", indices) if table.has("text_pair") else None
            parts[name] = encode_classification(tokenizer, table.texts("text", indices), pairs,
                                                [labels.ids[i] for i in indices], data.max_length)
            mark_tasks(parts[name], table, indices)
        collate = ClassificationCollator(pad_token_id(tokenizer),
                                         getattr(tokenizer, "padding_side", "right") or "right")
        return DatasetBundle(parts["train"], parts["validation"], parts["test"], collate, labels.num_labels,
                             labels.label_names, splits)

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Decoder classifiers refuse batches without pad_token_id; see `pad_with_eos`."""
        return pad_with_eos(model)


def pad_with_eos(model: nn.Module) -> nn.Module:
    """Decoder classifiers pick the last non-pad token, so they refuse batches unless pad_token_id is set.

    Use end-of-sequence, matching `load_tokenizer`, which pads with the EOS token when there is no pad token.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "pad_token_id", None) is not None:
        return model
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is not None:
        config.pad_token_id = eos
    return model


def mark_tasks(examples: list[dict], table: Table, indices: list[int]) -> None:
    """With data.columns.task, each example keeps its row's task (as text): meta-learning draws an episode's
    classes from one task and holds whole tasks out for meta-testing."""
    if table.has("task") and indices:
        for example, task in zip(examples, table.filled_texts("task", indices)):
            example["task"] = task
