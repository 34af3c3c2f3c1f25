"""The pieces of PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT).

All per-token tensors are (B, T) over one rollout, with a `mask` that is True on the response tokens (on the shifted
grid of `logprobs.token_logprobs`, the response is contiguous and ends each row's real tokens). Positions outside the
mask never reach a loss or a statistic: every mean here is a masked mean, and returned per-token tensors are zero
there. The formulas and defaults follow TRL's PPOTrainer (removed from TRL in 2026), which users compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from deltatune.errors import UserError

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values·mask / Σ mask over every element, a scalar (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − μ)/√(σ² + 1e-8) over the masked elements, zero elsewhere; with `shift_mean=False` μ is added back.

    μ and σ² are the masked mean and the unbiased masked variance (Bessel's n/(n−1); a single element gets σ² = 0).
    Whitening the advantages (shift_mean) is standard PPO; whitening the per-token rewards keeps their mean
    (`shift_mean=False`, TRL's `whiten_rewards`) so that a run of all-positive rewards still reads as positive.
    """
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask)
    if count > 1:
        variance = variance * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def gae_advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                               gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response, and the value targets.

        δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1},    R_t = A_t + V_t

    The response ends each row (episode end), so V and A after its last token are 0. Rewards and values outside the
    mask are treated as 0, and the returned advantages A and returns R are 0 there too. The advantages are not
    whitened: call `masked_whiten(advantages, mask)` for that. TRL's defaults: γ = 1, λ = 0.95.
    """
    weights = mask.to(values.dtype)
    rewards, values = rewards * weights, values * weights
    length = rewards.shape[1]
    next_values = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)
    deltas = rewards + gamma * next_values - values
    running = values.new_zeros(values.shape[0])
    advantages = torch.zeros_like(values)
    for position in reversed(range(length)):
        running = deltas[:, position] + gamma * lam * running
        advantages[:, position] = running
    returns = advantages + values
    return advantages * weights, returns * weights


def kl_per_token(policy_logprobs: torch.Tensor, reference_logprobs: torch.Tensor,
                 estimator: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(π ‖ π_ref) from the log-probs of the sampled tokens (Schulman 2020,
    "Approximating KL divergence"), with the ratio r = π_ref(y_t)/π(y_t) = exp(log q − log p):

        k1 = −log r = log p − log q      unbiased, high variance, can be negative per token
        k3 = (r − 1) − log r             unbiased and never negative (the k3 of TRL's PPO and GRPO)
    """
    if estimator not in KL_ESTIMATORS:
        raise UserError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    log_ratio = reference_logprobs - policy_logprobs
    if estimator == "k1":
        return -log_ratio
    return torch.expm1(log_ratio) - log_ratio  # expm1 keeps precision when r is close to 1


def kl_penalised_rewards(scores: torch.Tensor, policy_logprobs: torch.Tensor, reference_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float,
                         estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token rewards of RLHF's PPO (Ziegler et al. 2019; InstructGPT): a KL leash on every token and the
    reward model's score of the whole response on its last token.

        r_t = −kl_coef · KL_t  +  [t is the last response token] · score

    `scores` is (B,). Returns (rewards, kl): both (B, T), zero outside the mask; kl is the per-token estimate,
    so kl.sum(1) is each response's KL to the reference. A row without response tokens gets no reward at all.
    """
    weights = mask.to(policy_logprobs.dtype)
    kl = kl_per_token(policy_logprobs, reference_logprobs, estimator) * weights
    rewards = -kl_coef * kl
    last_token = mask.shape[1] - 1 - weights.flip(1).argmax(dim=1)  # the last True of each row
    rewards[torch.arange(len(scores), device=scores.device), last_token] += scores.to(rewards.dtype)
    return rewards * weights, kl


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # the clipped surrogate to minimise, a scalar
    clip_fraction: torch.Tensor  # the share of tokens where clipping changed the objective, a detached scalar
    approx_kl: torch.Tensor  # ½ mean (log π − log π_old)², a detached scalar: how far this epoch moved the policy


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float = 0.2) -> PolicyLossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss averaged over the response tokens:

        ρ_t = exp(log π(a_t) − log π_old(a_t)),    L = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))

    with ε = `cliprange`. The clip fraction counts the tokens where the clipped term is the larger one, i.e. the
    ratio has left [1 − ε, 1 + ε] in the direction the advantage rewards; approx_kl is the k2 estimate
    ½ (log ρ_t)² of KL(π_old ‖ π), as TRL's PPOTrainer logged (here masked to the response).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return PolicyLossOutput(loss, clip_fraction, approx_kl)


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # a scalar, to be weighted by vf_coef
    clip_fraction: torch.Tensor  # the share of tokens where the clipped error was the larger one, detached


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, cliprange_value: float = 0.2) -> ValueLossOutput:
    """The value head's clipped squared error (the PPO2 baselines recipe; InstructGPT, TRL):

        V^clip_t = clip(V_t, V_old,t − ε_v, V_old,t + ε_v),    L = ½ mean_t max((V_t − R_t)², (V^clip_t − R_t)²)

    with ε_v = `cliprange_value`: the value head may not move further than ε_v from the rollout's estimate per
    epoch where doing so would lower its error.
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return ValueLossOutput(loss, clip_fraction)


def adaptive_kl_coefficient(coefficient: float, observed_kl: float, target: float, horizon: float,
                            steps: int) -> float:
    """One update of the adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", eq. 2), a proportional controller that steers the observed KL towards `target`:

        e = clip(KL / target − 1, −0.2, 0.2),    β ← β · (1 + e · steps / horizon)

    `steps` is how many samples (responses) the observed KL was measured on, `horizon` how many it takes to close
    the error (TRL's defaults: target 6, horizon 10000).
    """
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coefficient * (1.0 + error * steps / horizon)


@dataclass
class KLController:
    """The KL coefficient of a PPO run: fixed when `target` is None, else adapted by `adaptive_kl_coefficient`.

    Its whole state is these three floats, so a checkpoint saves it with `dataclasses.asdict` and restores it with
    `KLController(**saved)`.
    """

    coefficient: float
    target: float | None = None
    horizon: float = 10000.0

    def __post_init__(self) -> None:
        if self.coefficient < 0:
            raise UserError(f"kl_coef must be 0 or more, got {self.coefficient}")
        if self.target is not None and not (self.target > 0 and self.horizon > 0):
            raise UserError(f"an adaptive KL coefficient needs target > 0 and horizon > 0, "
                            f"got target {self.target} and horizon {self.horizon}")

    def update(self, observed_kl: float, steps: int) -> float:
        """Adapt the coefficient to the KL just observed over `steps` responses; returns the new value."""
        if self.target is not None:
            self.coefficient = adaptive_kl_coefficient(self.coefficient, observed_kl, self.target, self.horizon,
                                                       steps)
        return self.coefficient


__all__ = ["KLController", "KL_ESTIMATORS", "PolicyLossOutput", "ValueLossOutput", "adaptive_kl_coefficient",
           "clipped_policy_loss", "clipped_value_loss", "gae_advantages_and_returns", "kl_penalised_rewards",
           "kl_per_token", "masked_mean", "masked_whiten"]
