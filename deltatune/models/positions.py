"""How long an input a loaded model takes, so `data.max_length` beyond it is refused before training starts.

A BERT-style model looks every token's position up in a table of `max_position_embeddings` rows; a longer batch is
an index error in the middle of training (or, on CUDA, a device-side assert), at the first long example. Rotary
models (Llama) do not crash but were never trained at those distances. The tokenizer's `model_max_length` can be
stricter than the table (RoBERTa keeps 2 of its 514 rows for padding offsets and says 512), so the smaller of the
two sane values is the limit.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.errors import UserError

# Config attributes naming the position table's size (GPT-2 and relatives call it n_positions).
_CONFIG_ATTRIBUTES = ("max_position_embeddings", "n_positions")
# transformers sets model_max_length to int(1e30) when a tokenizer does not know its model's limit.
_SANE_LIMIT = 1_000_000


def position_limit(model: nn.Module, tokenizer: Any = None) -> tuple[int, str] | None:
    """(the longest input the model takes, where that number comes from), or None when nothing says."""
    candidates: list[tuple[int, str]] = []
    config = getattr(model, "config", None)
    for attribute in _CONFIG_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if _sane(value):
            candidates.append((int(value), f"config.{attribute}"))
            break
    value = getattr(tokenizer, "model_max_length", None)
    if _sane(value):
        candidates.append((int(value), "tokenizer.model_max_length"))
    return min(candidates) if candidates else None


def check_max_length(model: nn.Module, max_length: int, tokenizer: Any = None) -> None:
    """UserError when `max_length` (data.max_length) exceeds what the model takes (see `position_limit`).

    Called once the model is loaded; image models and models that state no limit pass.
    """
    limit = position_limit(model, tokenizer)
    if limit is not None and max_length > limit[0]:
        raise UserError(f"data.max_length={max_length} is longer than this model takes ({limit[1]} = {limit[0]}); "
                        f"set data.max_length to at most {limit[0]}")


def _sane(value: Any) -> bool:
    """A positive int below the 'unknown' sentinel (bools are ints in Python, but never a length)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < _SANE_LIMIT
