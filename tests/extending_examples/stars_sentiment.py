"""Sentiment from star ratings: a review's text and its 1-5 stars, learned as three classes (1-2 stars negative,
3 neutral, 4-5 positive), so a dump of rated reviews trains a sentiment classifier without relabelling."""

from typing import Any

from deltatune.config.schema import DataConfig
from deltatune.data import DatasetBundle
from deltatune.data.splits import SPLIT_NAMES
from deltatune.data.table import Table
from deltatune.data.text import ClassificationCollator, encode_classification, pad_token_id
from deltatune.errors import UserError
from deltatune.tasks import register_task
from deltatune.tasks.base import Task

SENTIMENTS = ["negative", "neutral", "positive"]


def sentiment_of(stars: Any, row: int) -> int:
    """0, 1 or 2 for 1-2, 3 and 4-5 stars; a UserError naming the row for anything else."""
    try:
        value = float(stars)
    except (TypeError, ValueError):
        value = float("nan")
    if not 1 <= value <= 5:
        raise UserError(f"row {row}: stars must be a number from 1 to 5, got {stars!r}; fix the row or point "
                        f"data.columns.stars at the rating column")
    return 0 if value < 3 else 1 if value < 4 else 2


@register_task("stars-sentiment")
class StarsSentiment(Task):
    description = "three-way sentiment (negative/neutral/positive) learned from 1-5 star ratings"
    roles = {"text": "text", "stars": "stars"}  # role -> default column (None would make a role optional)
    default_objective = "classification"  # what objective.name: auto trains with (cross-entropy)
    auto_class = "AutoModelForSequenceClassification"  # the head for transformers directories and GGUF files
    labelled = True  # the model ends in a new head of num_labels outputs

    def encode(self, table: Table, splits: dict[str, list[int]], data: DataConfig, processor: Any,
               num_labels: int | None) -> DatasetBundle:
        if not callable(processor):
            raise UserError("stars-sentiment needs a tokenizer; pick a text model (e.g. model.name: minilm-l6)")
        parts = {}
        for name in SPLIT_NAMES:
            indices = splits[name]
            labels = [sentiment_of(stars, row) for stars, row in zip(table.values("stars", indices), indices)]
            parts[name] = encode_classification(processor, table.texts("text", indices), None, labels,
                                                data.max_length)
        return DatasetBundle(parts["train"], parts["validation"], parts["test"],
                             ClassificationCollator(pad_token_id(processor)), len(SENTIMENTS), SENTIMENTS, splits)
