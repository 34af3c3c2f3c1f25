"""Text classification: tokenise once up front, pad per batch.

Examples keep unpadded python lists so each batch is padded only to its own longest sequence (dynamic padding); with
short reviews and max_length 128 that roughly halves the compute of padding everything to max_length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deltatune.errors import UserError

Example = dict[str, Any]

# Sequences the collate pads; anything else in an example (labels) is stacked as-is.
_PAD_VALUES = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token (common for decoder-only models)."""
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, list):  # some configs list several eos ids
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise UserError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before training")


def encode_classification(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, labels: list[int], max_length: int
) -> list[Example]:
    """Tokenise texts (and optional second segments) with truncation; one example per text.

    token_type_ids are kept when the tokenizer produces them (BERT-style models use them to tell the two segments
    of a pair apart); they are padded with 0.
    """
    if max_length < 2:
        raise UserError(f"data.max_length is {max_length}; use at least 2 (typical: 128 or 256)")
    if not texts:  # a split of fraction 0; fast tokenizers refuse an empty batch
        return []
    encoded = tokenizer(*joined_pairs(tokenizer, texts, pairs), truncation=True, max_length=max_length)
    keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
    examples: list[Example] = []
    for i, label in enumerate(labels):
        example: Example = {key: list(encoded[key][i]) for key in keys}
        if "attention_mask" not in example:
            example["attention_mask"] = [1] * len(example["input_ids"])
        example["labels"] = int(label)
        examples.append(example)
    return examples


@dataclass
class ClassificationCollator:
    """Pads a batch of tokenised examples to its longest member and stacks LongTensors.

    A dataclass rather than a closure so DataLoader worker processes can pickle it.
    """

    pad_id: int
    padding_side: str = "right"

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in batch)
        out: dict[str, torch.Tensor] = {}
        for key, pad in _PAD_VALUES.items():
            if key not in batch[0]:
                continue
            value = self.pad_id if pad is None else pad
            rows = [self._pad(example[key], longest, value) for example in batch]
            out[key] = torch.tensor(rows, dtype=torch.long)
        out["labels"] = torch.tensor([example["labels"] for example in batch], dtype=torch.long)
        return out

    def _pad(self, sequence: list[int], length: int, value: int) -> list[int]:
        """Pad on the tokenizer's side (left-padding matters for decoder models that read the last token)."""
        filler = [value] * (length - len(sequence))
        return filler + list(sequence) if self.padding_side == "left" else list(sequence) + filler


def joined_pairs(tokenizer: Any, texts: list[str], pairs: list[str] | None) -> tuple[list[str], list[str] | None]:
    """The (texts, pairs) to tokenise. A tokenizer that marks no boundary between a pair's segments (GPT-2- and
    SmolLM2-style ones add no special tokens to pairs and make no token_type_ids) would run them together, "Great
    movie" + "I loved it" read as "Great movieI loved it": the second segment then starts with a newline. It stays a
    pair, so truncation still trims the longer segment first (a long prompt never cuts its response away)."""
    counts = getattr(tokenizer, "num_special_tokens_to_add", None)
    if pairs is None or not callable(counts) or counts(pair=True) > 0:
        return texts, pairs
    return texts, [f"\n{pair}" for pair in pairs]
