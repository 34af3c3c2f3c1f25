"""Per-token and per-response log-probabilities and entropies from a causal LM's logits.

Convention (the same as causal-LM SFT and the data package): `labels` is aligned with `input_ids` and holds the
ignore index (-100) on prompt and padding positions, so logits[:, t] predicts labels[:, t + 1]. Every function here
therefore works on the shifted grid of T - 1 positions, and its mask marks the response tokens on that grid.

Log-softmax over a large vocabulary is the memory peak of DPO and PPO, so the rows of the batch are processed one at
a time (as TRL's `selective_log_softmax` does) and in float32 whatever the model's dtype (bf16 log-probabilities
summed over a response lose whole nats).
"""

from __future__ import annotations

import torch

from deltatune.objectives.causal_lm import IGNORE_INDEX


def shifted_response_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Boolean (B, T-1) mask of the positions whose next token is a response token: labels[:, 1:] != ignore_index."""
    return labels[:, 1:] != ignore_index


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_{t+1} | y_≤t) for every position, and the response mask.

    Args:
        logits: (B, T, V) model outputs for `input_ids` (any float dtype).
        labels: (B, T) token ids aligned with `input_ids`; `ignore_index` where no log-probability is wanted.

    Returns:
        (logprobs, mask), both (B, T-1): logprobs[b, t] = log softmax(logits[b, t])[labels[b, t + 1]] in float32,
        0.0 where mask is False; mask[b, t] = labels[b, t + 1] != ignore_index.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, length)")
    mask = shifted_response_mask(labels, ignore_index)
    targets = labels[:, 1:].masked_fill(~mask, 0)  # any valid id; those positions are zeroed below
    rows = []
    for row_logits, row_targets in zip(logits[:, :-1], targets):
        row_logits = row_logits.float()
        chosen = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(chosen - torch.logsumexp(row_logits, dim=-1))  # log softmax(x)_i = x_i - logsumexp(x)
    logprobs = torch.stack(rows) if rows else logits.new_zeros(mask.shape, dtype=torch.float32)
    return logprobs.masked_fill(~mask, 0.0), mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      average: bool = False) -> torch.Tensor:
    """log π(y | x) = Σ_t log π(y_t | x, y_<t) over the response tokens of each row, shape (B,).

    The building block of DPO (Rafailov et al. 2023), which compares these sums under the policy and the reference.
    With `average=True` the sum is divided by the number of response tokens (a row without any gives 0).
    """
    logprobs, mask = token_logprobs(logits, labels, ignore_index)
    summed = logprobs.sum(dim=1)
    if not average:
        return summed
    return summed / mask.sum(dim=1).clamp(min=1)


def response_lengths(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """How many response tokens each row scores, shape (B,): the lengths IPO's normalised form divides by."""
    return shifted_response_mask(labels, ignore_index).sum(dim=1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of the softmax at every position, shape logits.shape[:-1], float32.

    H = -Σ_i p_i log p_i for p = softmax(z) (equal to logsumexp(z) - Σ_i p_i z_i, the form TRL's PPOTrainer logged).
    Logits of -inf (tokens a sampler filtered out) have p_i = 0 and add 0, not NaN, to H and to its gradient.
    Computed 128 positions at a time so the float32 softmax is never materialised for the whole batch at once.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    rows = []
    for chunk in flat.split(128):
        log_probabilities = torch.log_softmax(chunk.float(), dim=-1)
        # 0 · log 0 must be 0: a finite floor keeps -inf out of the product and of its backward pass.
        finite = log_probabilities.clamp(min=torch.finfo(torch.float32).min)
        rows.append(-(log_probabilities.exp() * finite).sum(dim=-1))
    entropies = torch.cat(rows) if rows else flat.new_zeros(0, dtype=torch.float32)
    return entropies.reshape(logits.shape[:-1])


__all__ = ["IGNORE_INDEX", "entropy_from_logits", "response_lengths", "sequence_logprobs", "shifted_response_mask",
           "token_logprobs"]
