"""Sampling responses from a causal LM and laying them out for scoring and training (PPO's rollout phase).

Prompts arrive left-padded (every row's last position is its last prompt token, so generated tokens line up);
generation uses the KV cache. A response ends at its first eos token, which is kept (stopping was the policy's
choice, an action like any other); what follows it is padding. The rollout is then re-laid out right-padded, prompt
then response, exactly like a causal-LM SFT example: positions start at 0 in every row, and `labels` hold the
response tokens only, so the same log-probability code scores rollouts, DPO pairs and SFT data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.data.sft import IGNORE_INDEX
from deltatune.data.text import pad_token_id
from deltatune.objectives.losses import token_logprobs
from deltatune.training import sharding


@dataclass
class Rollout:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: right-padded prompt + response
    texts: list[str]  # the decoded responses, special tokens dropped


def end_of_sequence_id(tokenizer: Any) -> int | None:
    """The tokenizer's eos id (the first, when a config lists several), or None."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos


def response_mask(responses: torch.Tensor, eos: int | None) -> torch.Tensor:
    """True on each row's response tokens: everything up to and including the first eos (all of it without one)."""
    if eos is None:
        return torch.ones_like(responses, dtype=torch.bool)
    is_end = responses == eos
    return (is_end.long().cumsum(dim=1) - is_end.long()) == 0


@torch.no_grad()
def generate_responses(model: nn.Module, batch: dict[str, Any], tokenizer: Any, options: Any) -> Rollout:
    """Sample one response per prompt of `batch` with `options`' max_new_tokens, temperature, top_k and top_p."""
    from transformers import GenerationConfig

    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    pad, eos = pad_token_id(tokenizer), end_of_sequence_id(tokenizer)
    # The checkpoint's own generation_config.json (a repetition_penalty, a min_new_tokens, suppressed tokens) must not
    # shape the samples: PPO's ratios and KL assume they come from softmax(logits / T) alone, as TRL's do. transformers
    # fills every setting a passed config leaves unset from model.generation_config, so that one is set aside too.
    sampling = GenerationConfig(do_sample=True, temperature=options.temperature, top_k=options.top_k,
                                top_p=options.top_p, max_new_tokens=options.max_new_tokens, pad_token_id=pad,
                                eos_token_id=eos, use_cache=True)
    checkpoint_settings = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=sampling,
                                synced_gpus=sharding.model_is_sharded(model))  # FSDP ranks gather blocks together
    finally:
        model.generation_config = checkpoint_settings
    responses = output[:, prompt_ids.shape[1]:]
    keep = response_mask(responses, eos)
    rows = [(prompt_ids[row][prompt_mask[row].bool()], responses[row][keep[row]]) for row in range(len(responses))]
    return Rollout(right_padded(rows, pad), [tokenizer.decode(response, skip_special_tokens=True).strip()
                                              for _, response in rows])


def right_padded(rows: list[tuple[torch.Tensor, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    """(prompt ids, response ids) per row as one right-padded batch with response-only labels."""
    longest = max(len(prompt) + len(response) for prompt, response in rows)
    device = rows[0][0].device
    input_ids = torch.full((len(rows), longest), pad, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for index, (prompt, response) in enumerate(rows):
        end = len(prompt) + len(response)
        input_ids[index, :end] = torch.cat([prompt, response])
        attention_mask[index, :end] = 1
        labels[index, len(prompt):end] = response
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prompts_of(batch: dict[str, torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    """The prompts of a right-padded SFT batch (each row's tokens before its first labelled one), left-padded for
    `generate_responses`: what on-policy distillation has the student answer itself."""
    labelled = batch["labels"] != IGNORE_INDEX
    starts = torch.where(labelled.any(dim=1), labelled.float().argmax(dim=1), batch["attention_mask"].sum(dim=1))
    longest = int(starts.max())
    input_ids = torch.full((len(starts), longest), pad, dtype=torch.long, device=batch["input_ids"].device)
    attention_mask = torch.zeros_like(input_ids)
    for row, start in enumerate(starts.tolist()):
        input_ids[row, longest - start:] = batch["input_ids"][row, :start]
        attention_mask[row, longest - start:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def policy_outputs(model: nn.Module, inputs: dict[str, torch.Tensor],
                   hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, last hidden state or None) for a right-padded rollout batch, one position per input token (a method
    that prepends virtual tokens, such as prompt tuning, has its extra leading positions cut off)."""
    output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                   output_hidden_states=hidden)
    length = inputs["input_ids"].shape[1]
    states = output.hidden_states[-1][:, -length:] if hidden else None
    return output.logits[:, -length:], states


def kl_per_response(model: nn.Module, reference: nn.Module, inputs: dict[str, torch.Tensor],
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL to `reference`, response length) per row of a rollout batch: Σ_t log π(y_t) − log π_ref(y_t) over the
    response tokens (the k1 estimate, unbiased for KL(π ‖ π_ref) when the responses were sampled from π), with both
    models' logits divided by the sampling temperature."""
    policy, mask = token_logprobs(policy_outputs(model, inputs)[0] / temperature, inputs["labels"])
    base, _ = token_logprobs(policy_outputs(reference, inputs)[0] / temperature, inputs["labels"])
    return ((policy - base) * mask).sum(dim=1), mask.sum(dim=1).float()


__all__ = ["Rollout", "end_of_sequence_id", "generate_responses", "kl_per_response", "policy_outputs", "prompts_of",
           "response_mask", "right_padded"]
