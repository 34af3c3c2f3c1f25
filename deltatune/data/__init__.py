"""Data for every task: load raw rows, split them by seeded indices, turn them into examples and batches.

    rows = load_rows(cfg)                        # raw dicts from an alias or a file
    splits = make_splits(len(rows), cfg.split, cfg.max_examples)
    bundle = build_datasets(cfg, task, processor, splits)
    loader = DataLoader(bundle.train, batch_size=32, shuffle=True, collate_fn=bundle.collate)

`build_datasets` does the first two steps itself when `splits` is None. Runs save `bundle.splits` (row indices into
the raw table) so `eval` rebuilds exactly the same test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from deltatune.config.schema import DataConfig
from deltatune.data.aliases import ALIASES, alias_task
from deltatune.data.images import ImageProcessor, encode_images, image_collator
from deltatune.data.labels import EncodedLabels, encode_labels
from deltatune.data.sft import IGNORE_INDEX, encode_sft, pack_examples, sft_collator
from deltatune.data.sources import column_values, load_rows, require_columns, text_values
from deltatune.data.splits import SPLIT_NAMES, check_splits, make_splits
from deltatune.data.text import ClassificationCollator, encode_classification, pad_token_id
from deltatune.errors import UserError

__all__ = [
    "ALIASES", "IGNORE_INDEX", "DatasetBundle", "ImageProcessor", "TASKS",
    "alias_task", "build_datasets", "load_rows", "make_splits",
]

TASKS = ("classification", "causal-lm", "image-classification")
Row = dict[str, Any]


@dataclass
class DatasetBundle:
    """Processed splits plus what a training loop needs to batch them.

    `packed` is True when `train` holds packed causal-LM sequences (validation/test are never packed, so their
    metrics do not depend on the packing setting); the model must then be called with ``use_cache=False``.
    """

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    num_labels: int | None
    label_names: list[str] | None
    splits: dict[str, list[int]]
    packed: bool = field(default=False)


def build_datasets(
    cfg: DataConfig,
    task: str,
    processor: Any,
    splits: dict[str, list[int]] | None = None,
    num_labels: int | None = None,
) -> DatasetBundle:
    """Load, split and process the dataset for `task`.

    `processor` is a Hugging Face tokenizer for text tasks and an `ImageProcessor` (or any object with image_size,
    mean, std, channels) for images. `splits` given (e.g. from a saved run) are used exactly; otherwise they come
    from `make_splits` with cfg.split and cfg.max_examples. `num_labels` (the model's head size, if fixed) widens
    the allowed integer label range beyond the number of distinct labels.
    """
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; use one of {', '.join(TASKS)}")
    rows = load_rows(cfg)
    chosen = check_splits(splits, len(rows)) if splits is not None else make_splits(len(rows), cfg.split,
                                                                                   cfg.max_examples)
    if not chosen["train"]:
        raise UserError(f"the train split of '{cfg.name}' is empty; add rows or lower data.split fractions")
    if task == "classification":
        return _build_classification(cfg, rows, chosen, processor, num_labels)
    if task == "causal-lm":
        return _build_causal_lm(cfg, rows, chosen, processor)
    return _build_images(cfg, rows, chosen, processor, num_labels)


def _source(cfg: DataConfig) -> str:
    """How error messages name the dataset."""
    return f"dataset '{cfg.name}'"


def _labels(cfg: DataConfig, rows: list[Row], num_labels: int | None) -> EncodedLabels:
    """Label ids for every row of the table (not only the split rows), so ids never depend on the split."""
    values = column_values(rows, list(range(len(rows))), cfg.label_column, _source(cfg))
    known = ALIASES[cfg.name].label_names if cfg.name in ALIASES else None
    return encode_labels(values, cfg.label_column, num_labels, known)


def _build_classification(
    cfg: DataConfig, rows: list[Row], splits: dict[str, list[int]], tokenizer: Any, num_labels: int | None
) -> DatasetBundle:
    """Tokenised text (pair) classification examples with dynamic-padding collation."""
    if not callable(tokenizer):
        raise UserError("text classification needs a tokenizer; pick a text model (e.g. model.name: minilm-l6)")
    columns = {"text_column": cfg.text_column, "label_column": cfg.label_column}
    if cfg.text_pair_column:
        columns["text_pair_column"] = cfg.text_pair_column
    require_columns(rows, columns, _source(cfg))
    labels = _labels(cfg, rows, num_labels)
    parts: dict[str, list[dict]] = {}
    for name in SPLIT_NAMES:
        indices = splits[name]
        texts = text_values(rows, indices, cfg.text_column, _source(cfg))
        pairs = text_values(rows, indices, cfg.text_pair_column, _source(cfg)) if cfg.text_pair_column else None
        parts[name] = encode_classification(tokenizer, texts, pairs, [labels.ids[i] for i in indices], cfg.max_length)
    collate = ClassificationCollator(pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right") or "right")
    return DatasetBundle(parts["train"], parts["validation"], parts["test"], collate, labels.num_labels,
                         labels.label_names, splits)


def _build_causal_lm(cfg: DataConfig, rows: list[Row], splits: dict[str, list[int]], tokenizer: Any) -> DatasetBundle:
    """Prompt/response SFT examples; the train split is packed when cfg.packing is set."""
    if not callable(tokenizer):
        raise UserError("causal-LM fine-tuning needs a tokenizer; pick a language model (e.g. smollm2-135m)")
    require_columns(rows, {"prompt_column": cfg.prompt_column, "response_column": cfg.response_column}, _source(cfg))
    parts: dict[str, list[dict]] = {}
    for name in SPLIT_NAMES:
        prompts = text_values(rows, splits[name], cfg.prompt_column, _source(cfg))
        responses = text_values(rows, splits[name], cfg.response_column, _source(cfg))
        parts[name] = encode_sft(tokenizer, prompts, responses, cfg.max_length)
    if cfg.packing:
        parts["train"] = pack_examples(parts["train"], cfg.max_length)
    return DatasetBundle(parts["train"], parts["validation"], parts["test"], sft_collator(tokenizer), None, None,
                         splits, packed=bool(cfg.packing))


def _build_images(
    cfg: DataConfig, rows: list[Row], splits: dict[str, list[int]], processor: Any, num_labels: int | None
) -> DatasetBundle:
    """Raw-image examples; resizing and normalisation happen per batch in the collate function."""
    if not all(hasattr(processor, name) for name in ("image_size", "mean", "std", "channels")):
        raise UserError("image classification needs an image model (e.g. model.name: efficientnet-lite0)")
    require_columns(rows, {"image_column": cfg.image_column, "label_column": cfg.label_column}, _source(cfg))
    labels = _labels(cfg, rows, num_labels)
    path = Path(cfg.name)
    base_dir = path.parent if cfg.name not in ALIASES and path.is_file() else None
    parts = {
        name: encode_images(column_values(rows, splits[name], cfg.image_column, _source(cfg)),
                            [labels.ids[i] for i in splits[name]], base_dir)
        for name in SPLIT_NAMES
    }
    return DatasetBundle(parts["train"], parts["validation"], parts["test"], image_collator(processor, cfg.image_size),
                         labels.num_labels, labels.label_names, splits)
