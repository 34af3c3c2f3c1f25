"""How long an input a loaded model takes, so `data.max_length` beyond it is refused before training starts.

A BERT-style model looks every token's position up in a table of `max_position_embeddings` rows; a longer batch is
an index error in the middle of training (or, on CUDA, a device-side assert), at the first long example. Rotary
models (Llama) do not crash but were never trained at those distances. The tokenizer's `model_max_length` can be
stricter than the table (RoBERTa keeps 2 of its 514 rows for padding offsets and says 512), so the smaller of the
two sane values is the limit.

Virtual tokens count against it: prompt tuning and P-tuning put them before the input (n + L positions), prefix
tuning and P-tuning v2 start the real tokens at position L; either way the last real token sits at position n + L.
A dual encoder's limit is its text tower's, with the text tokenizer's.
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


def check_max_length(model: nn.Module, max_length: int, tokenizer: Any = None, virtual_tokens: int = 0) -> None:
    """UserError when `max_length` (data.max_length) plus the method's `virtual_tokens` exceeds what the model takes
    (see `position_limit`).

    Called once the model is loaded; image models and models that state no limit pass.
    """
    model, tokenizer = _text_side(model, tokenizer)
    limit = position_limit(model, tokenizer)
    if limit is None or max_length + virtual_tokens <= limit[0]:
        return
    if not virtual_tokens:
        raise UserError(f"data.max_length={max_length} is longer than this model takes ({limit[1]} = {limit[0]}); "
                        f"set data.max_length to at most {limit[0]}")
    room = limit[0] - virtual_tokens
    fix = (f"set data.max_length to at most {room} or lower method.num_virtual_tokens" if room > 0 else
           f"lower method.num_virtual_tokens below {limit[0]}")
    raise UserError(f"data.max_length={max_length} plus method.num_virtual_tokens={virtual_tokens} is longer than "
                    f"this model takes ({limit[1]} = {limit[0]}); {fix}")


def virtual_token_count(method_config: Any) -> int:
    """How many virtual tokens a method adds to every sequence: its config's `num_virtual_tokens` (prompt, prefix,
    P-tuning and P-tuning v2 have one), 0 for every other method."""
    count = getattr(method_config, "num_virtual_tokens", 0)
    return count if _sane(count) else 0  # a bad value is the method's own check to report


def _text_side(model: nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    """A dual encoder's text tower and its tokenizer (only text has positions); any other model as it is. The dual
    encoder itself has no config and its processor no model_max_length, so checking it would find no limit."""
    towers = model.towers() if callable(getattr(model, "towers", None)) else None
    if isinstance(towers, dict) and isinstance(towers.get("text"), nn.Module):
        return towers["text"], getattr(tokenizer, "text", None)
    return model, tokenizer


def _sane(value: Any) -> bool:
    """A positive int below the 'unknown' sentinel (bools are ints in Python, but never a length)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < _SANE_LIMIT
