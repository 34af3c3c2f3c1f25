"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

n trainable vectors P ∈ R^{n×d} (a "soft prompt") are prepended to the frozen model's input embeddings:

    h⁰ = [P ; E(x₁), ..., E(x_L)]        attention_mask' = [1ⁿ ; mask],   positions of x: n, ..., n+L-1

and only P (plus the new task head, when the model has one) trains. The outputs at the n virtual positions are
dropped, so logits line up with the input as without the method (see `virtual_token_layer.py`).

Initialisation (`prompt_tuning_init`): "sample_vocab" (default; the paper's best) = embeddings of n random
vocabulary tokens; "text" = embeddings of `prompt_tuning_init_text` tokenised by `tokenizer_name_or_path` (default:
the model's own name_or_path), repeated or cut to n tokens as PEFT does; "random" = N(0, σ²) with σ the standard
deviation of the model's embedding table, so the prompt starts at the scale of real tokens. Adapter files are
PEFT's PROMPT_TUNING files (`prompt_embeddings` = P).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods import register_method
from deltatune.methods.virtual_tokens.encoders import PromptTable
from deltatune.methods.virtual_tokens.method_base import InputPromptConfig, InputPromptMethod
from deltatune.methods.virtual_tokens.model_layout import input_embeddings

INITS = ("sample_vocab", "text", "random")


@dataclass
class PromptTuningConfig(InputPromptConfig):
    name: str = "prompt"
    prompt_tuning_init: str = "sample_vocab"  # sample_vocab | text | random
    prompt_tuning_init_text: str | None = None  # for "text": e.g. "Classify the sentiment of this review:"
    tokenizer_name_or_path: str | None = None  # for "text"; None: the model's own name_or_path


@register_method("prompt")
class PromptTuning(InputPromptMethod):
    description = "a trained soft prompt of num_virtual_tokens vectors before the input embeddings (prompt tuning)"
    config_class: ClassVar[type[MethodConfig]] = PromptTuningConfig
    file_type: ClassVar[str] = "PROMPT_TUNING"
    peft_type: ClassVar[str | None] = "PROMPT_TUNING"
    peft_field_names: ClassVar[tuple[str, ...]] = ("prompt_tuning_init", "prompt_tuning_init_text",
                                                   "tokenizer_name_or_path", "tokenizer_kwargs")

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [*super().contract_bad_options(), ("prompt_tuning_init", "zeros"), ("prompt_tuning_init", "text")]

    def build_encoder(self, model: nn.Module) -> PromptTable:
        config: PromptTuningConfig = self.config  # type: ignore[assignment]
        init = str(config.prompt_tuning_init).lower()
        if init not in INITS:
            raise UserError(f"method.prompt_tuning_init must be one of {', '.join(INITS)}, got "
                            f"{config.prompt_tuning_init!r}")
        table = input_embeddings(model, self.name).weight.detach().float()
        count = config.num_virtual_tokens
        fields = {"prompt_tuning_init": init.upper(), "prompt_tuning_init_text": None,
                  "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
        if init == "random":
            tokens = torch.randn(count, table.shape[1], device=table.device) * table.std()
        elif init == "sample_vocab":
            tokens = table[torch.randint(0, table.shape[0], (count,), device=table.device)]
        else:
            path, ids = text_token_ids(model, config)
            fields.update(prompt_tuning_init_text=config.prompt_tuning_init_text, tokenizer_name_or_path=path)
            if max(ids) >= table.shape[0]:
                raise UserError(f"method.tokenizer_name_or_path {path!r} gives token ids up to {max(ids)} but the "
                                f"model has {table.shape[0]} embeddings; use the model's own tokenizer")
            ids = (ids * math.ceil(count / len(ids)))[:count]  # PEFT's rule: repeat the text, cut to n tokens
            tokens = table[torch.tensor(ids, device=table.device)]
        return PromptTable(tokens.clone(), fields)


def text_token_ids(model: nn.Module, config: PromptTuningConfig) -> tuple[str, list[int]]:
    """(tokenizer path, token ids of prompt_tuning_init_text) for the "text" init; UserErrors name the fix."""
    if not config.prompt_tuning_init_text:
        raise UserError("method.prompt_tuning_init: text needs method.prompt_tuning_init_text (the words to start "
                        "from, e.g. 'Classify the sentiment:')")
    path = config.tokenizer_name_or_path or getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not path:
        raise UserError("method.prompt_tuning_init: text needs a tokenizer; set method.tokenizer_name_or_path to "
                        "the model's tokenizer directory or hub name")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"method.tokenizer_name_or_path {path!r}: no tokenizer could be loaded ({first_line}); "
                        f"give a tokenizer directory or hub name") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise UserError("method.prompt_tuning_init_text tokenises to nothing; give some words")
    return path, ids
