"""Preference pairs: a prompt, a chosen and a rejected response per row, encoded for two kinds of model.

Each example is nested, one sub-example per response, so an objective scores both halves the same way:

    {"chosen": {"input_ids": [...], ...}, "rejected": {"input_ids": [...], ...}, "margin": 0.5}   # margin optional

* For a causal language model (DPO and friends) each half is an SFT example (`deltatune.data.sft.encode_sft`): the
  prompt rendered with the chat template (or "prompt\\n" without one), then the response, with labels equal to the
  input ids on the response tokens only and IGNORE_INDEX elsewhere (unshifted; the objective shifts them).
* For a sequence classifier that scores a prompt+response (a reward model) each half is the pair as that model
  reads it, without labels: a tokenizer with a chat template renders the conversation exactly as the language model
  would see it (the SFT tokens, labels dropped); any other tokenizer encodes (prompt, response) as a text pair
  ([CLS] prompt [SEP] response [SEP] with token_type_ids for BERT-style encoders).

`PreferenceCollator` pads both halves of a batch to one common length, so an objective may concatenate chosen and
rejected along the batch dimension and run a single forward pass (as TRL's concatenated forward does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from deltatune.data.sft import IGNORE_INDEX, encode_sft, encode_sft_pairs, has_chat_template
from deltatune.data.splits import SPLIT_NAMES
from deltatune.data.table import Table
from deltatune.data.text import joined_pairs
from deltatune.errors import UserError

Example = dict[str, Any]
TEXT_ROLES = ("prompt", "chosen", "rejected")


@dataclass
class PreferenceRows:
    """The texts (and optional margins) of some rows of a preference table, in row order."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    margins: list[float] | None


def read_pairs(table: Table, indices: list[int]) -> PreferenceRows:
    """The rows' prompt/chosen/rejected texts and margins; a missing or empty cell is a UserError naming the row."""
    texts = {role: table.filled_texts(role, indices) for role in TEXT_ROLES}
    margins = _margins(table, indices) if table.has("margin") else None
    return PreferenceRows(texts["prompt"], texts["chosen"], texts["rejected"], margins)


def _margins(table: Table, indices: list[int]) -> list[float]:
    """The margin role as finite floats (Bradley–Terry's required reward gap per pair)."""
    margins: list[float] = []
    for index, value in zip(indices, table.values("margin", indices)):
        try:
            margin = float(value)
        except (TypeError, ValueError):
            margin = math.nan
        if isinstance(value, bool) or not math.isfinite(margin):
            raise UserError(f"row {index} of {table.source} has margin {value!r} in column '{table.columns['margin']}'"
                            "; write a finite number there")
        margins.append(margin)
    return margins


def check_pairs_differ(table: Table, parts: dict[str, PreferenceRows]) -> None:
    """A UserError when no row's chosen response differs from its rejected one: such data teaches nothing, and it
    almost always means data.columns points chosen and rejected at the same column. Read one chunk at a time (the
    on-disk example store), only the columns can be compared: a chunk of identical pairs may sit in a good file."""
    same_column = table.columns["chosen"] == table.columns["rejected"]
    pairs = [(good, bad) for rows in parts.values() for good, bad in zip(rows.chosen, rows.rejected)]
    if same_column or (not table.chunk and pairs and all(good.strip() == bad.strip() for good, bad in pairs)):
        raise UserError(f"in every row of {table.source} the chosen text ('{table.columns['chosen']}') equals the "
                        f"rejected text ('{table.columns['rejected']}'); point data.columns.chosen and "
                        "data.columns.rejected at two different responses")


def encode_pair_splits(table: Table, splits: dict[str, list[int]],
                       encode: Callable[[PreferenceRows], list[Example]]) -> dict[str, list[Example]]:
    """Every split's rows read, checked (empty cells, identical pairs) and encoded with `encode`."""
    parts = {name: read_pairs(table, splits[name]) for name in SPLIT_NAMES}
    check_pairs_differ(table, parts)
    return {name: encode(rows) for name, rows in parts.items()}


def encode_language_model_pairs(tokenizer: Any, rows: PreferenceRows, max_length: int) -> list[Example]:
    """Nested causal-LM examples: each half is {"input_ids", "labels"} with labels on the response tokens only."""
    chosen, rejected = encode_sft_pairs(tokenizer, rows.prompts, rows.chosen, rows.rejected, max_length)
    return _nest(chosen, rejected, rows.margins)


def encode_scored_pairs(tokenizer: Any, rows: PreferenceRows, max_length: int) -> list[Example]:
    """Nested sequence-classifier examples: each half is {"input_ids", "attention_mask"[, "token_type_ids"]}."""
    halves = [scored_half(tokenizer, rows.prompts, responses, max_length) for responses in (rows.chosen,
                                                                                              rows.rejected)]
    return _nest(halves[0], halves[1], rows.margins)


def scored_half(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int) -> list[Example]:
    """prompt+response as the classifier reads it: the chat-templated conversation, else a tokenizer text pair."""
    if has_chat_template(tokenizer):
        return [{"input_ids": example["input_ids"]} for example in encode_sft(tokenizer, prompts, responses,
                                                                               max_length)]
    if max_length < 2:
        raise UserError(f"data.max_length is {max_length}; use at least 2 (typical: 128 or 256)")
    if not prompts:  # a split of fraction 0; fast tokenizers refuse an empty batch
        return []
    encoded = tokenizer(*joined_pairs(tokenizer, prompts, responses), truncation=True, max_length=max_length)
    keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
    return [{key: list(encoded[key][i]) for key in keys} for i in range(len(prompts))]


def _nest(chosen: list[Example], rejected: list[Example], margins: list[float] | None) -> list[Example]:
    examples: list[Example] = [{"chosen": good, "rejected": bad} for good, bad in zip(chosen, rejected)]
    if margins is not None:
        for example, margin in zip(examples, margins):
            example["margin"] = margin
    return examples


@dataclass
class PreferenceCollator:
    """Batches nested pair examples into {"chosen": {...}, "rejected": {...}[, "margin": float tensor, ...]}.

    Each half gets input_ids (padded with `pad_id`), attention_mask (1 on real tokens), labels (IGNORE_INDEX on
    padding) and token_type_ids (0 on padding) when the examples carry them. Both halves are padded to the longest
    sequence of either, on `padding_side` ("right" for causal LMs, whose labels line up with the inputs; a
    classifier's tokenizer may ask for "left"). A dataclass so DataLoader workers can pickle it.
    """

    pad_id: int
    padding_side: str = "right"

    def __call__(self, batch: list[Example]) -> dict[str, Any]:
        longest = max(len(example[half]["input_ids"]) for example in batch for half in ("chosen", "rejected"))
        out: dict[str, Any] = {half: self._half([example[half] for example in batch], longest)
                               for half in ("chosen", "rejected")}
        # Per-pair numbers beside the halves (the margin column; an objective's precomputed values, such as DPO's
        # reference log-probabilities) become float tensors with one row per pair.
        for key in batch[0]:
            if key not in ("chosen", "rejected"):
                out[key] = torch.tensor([example[key] for example in batch], dtype=torch.float32)
        return out

    def _half(self, examples: list[Example], length: int) -> dict[str, torch.Tensor]:
        fillers = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "token_type_ids": 0}
        half = {key: self._stack([example[key] for example in examples], length, filler)
                for key, filler in fillers.items() if key in examples[0]}
        half["attention_mask"] = self._stack([[1] * len(example["input_ids"]) for example in examples], length, 0)
        return half

    def _stack(self, sequences: list[list[int]], length: int, filler: int) -> torch.Tensor:
        rows = []
        for sequence in sequences:
            padding = [filler] * (length - len(sequence))
            rows.append(padding + list(sequence) if self.padding_side == "left" else list(sequence) + padding)
        return torch.tensor(rows, dtype=torch.long)
