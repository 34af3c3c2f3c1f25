"""Rewards as functions of text: what PPO asks "how good is this response to this prompt?".

A reward can be a trained reward model (any tokenizer: the policy's responses are decoded to text and re-encoded
for it, so a MiniLM reward model can score a SmolLM2 policy) or a plain Python function. Both are wrapped as modules
with the same call, `scorer(prompts, responses) -> (B,) float scores`, so an objective never asks which it got.
The runner builds them (`deltatune.runs`) for a model role declared with `ModelRole(scores_text=True)`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deltatune.data.preference import PreferenceCollator, scored_half
from deltatune.data.text import pad_token_id
from deltatune.errors import UserError
from deltatune.objectives.pairs import sequence_scores


class TextScorer(nn.Module):
    """A one-output sequence classifier with its tokenizer: each (prompt, response) is encoded as the reward-pairs
    task encoded its training pairs (the chat-templated conversation, or a tokenizer text pair) and scored at its
    last real token (`sequence_scores`)."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, batch_size: int = 32) -> None:
        super().__init__()
        self.model, self.tokenizer, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size
        self.collate = PreferenceCollator(pad_token_id(tokenizer), getattr(tokenizer, "padding_side", None) or "right")

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            examples = scored_half(self.tokenizer, list(prompts[start:start + self.batch_size]),
                                   list(responses[start:start + self.batch_size]), self.max_length)
            longest = max(len(example["input_ids"]) for example in examples)
            batch = {key: value.to(device) for key, value in self.collate._half(examples, longest).items()}
            scores.append(sequence_scores(self.model, batch))
        return torch.cat(scores) if scores else torch.zeros(0, device=device)


class FunctionScorer(nn.Module):
    """A Python reward function `function(prompts, responses) -> one number per response`, as a module. Its result
    is checked: one finite number per response, else a one-line error naming the function."""

    def __init__(self, function: Callable[[list[str], list[str]], Any], name: str) -> None:
        super().__init__()
        self.function, self.name = function, name

    def forward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        values = self.function(list(prompts), list(responses))
        try:
            scores = torch.as_tensor(values, dtype=torch.float32).reshape(-1).cpu()
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"reward function {self.name} returned {type(values).__name__}; return one number per "
                            "response (a list or a 1-D tensor)") from None
        if len(scores) != len(responses):
            raise UserError(f"reward function {self.name} returned {len(scores)} scores for {len(responses)} "
                            "responses; return one number per response")
        if not all(math.isfinite(value) for value in scores.tolist()):
            raise UserError(f"reward function {self.name} returned a non-finite score; return finite numbers")
        return scores


__all__ = ["FunctionScorer", "TextScorer"]
