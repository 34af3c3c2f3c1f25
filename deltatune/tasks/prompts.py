"""Prompts alone, for objectives that generate their own responses and have them scored (PPO).

Role: `prompt` (default column "prompt"); any other column is ignored, so a preference file's prompts (for example
`rotten-tomatoes-pairs`) serve as they are. A prompt that repeats within a split is kept once. Each example is the prompt as the model sees it before answering (the
chat template's generation prompt, as causal-LM SFT builds it) plus the prompt text, which a reward model or reward
function reads beside the response. Batches are left-padded for generation: {"input_ids", "attention_mask",
"prompt": list of texts}. Trained with objective `ppo` by default; `deltatune generate` accepts its runs.
"""

from __future__ import annotations

from typing import Any

from deltatune.config.schema import DataConfig
from deltatune.data import DatasetBundle
from deltatune.data.sft import PromptCollator, encode_prompts
from deltatune.data.splits import SPLIT_NAMES
from deltatune.data.table import Table
from deltatune.data.text import pad_token_id
from deltatune.errors import UserError
from deltatune.tasks import register_task
from deltatune.tasks.base import Task


@register_task("prompts")
class Prompts(Task):
    description = "prompts for a causal language model to answer, its answers scored by a reward (PPO)"
    roles = {"prompt": "prompt"}
    default_objective = "ppo"
    auto_class = "AutoModelForCausalLM"
    can_generate = True

    def encode(self, table: Table, splits: dict[str, list[int]], data: DataConfig, processor: Any,
               num_labels: int | None) -> DatasetBundle:
        """Generation-ready prompt examples, left-padded in batches."""
        tokenizer = processor
        if not callable(tokenizer):
            raise UserError("prompts need a tokenizer; pick a language model (e.g. smollm2-135m)")
        pad = pad_token_id(tokenizer)  # a tokenizer with neither pad nor eos is refused here, before any generation
        # A prompt repeated within a split (one per preference pair of the same movie) adds nothing a rollout
        # would not sample anyway, and makes every evaluation generate for it again: keep each once.
        parts = {name: encode_prompts(tokenizer, list(dict.fromkeys(table.filled_texts("prompt", splits[name]))),
                                      data.max_length)
                 for name in SPLIT_NAMES}
        return DatasetBundle(parts["train"], parts["validation"], parts["test"], PromptCollator(pad), None, None,
                             splits)
