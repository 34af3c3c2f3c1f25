"""Preference losses: the pairwise reward-model loss and DPO with its IPO, hinge and robust variants.

Every function takes tensors of one value per preference pair (shape (B,)), chosen and rejected at the same index,
and returns tensors; none reads a model or a config. The names of the options are TRL's (`margin`,
`center_rewards_coefficient`, `beta`, `loss_type`, `label_smoothing`), so a TRL user finds the same knobs.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from deltatune.errors import UserError


def reward_pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                         margin: torch.Tensor | None = None,
                         center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """The Bradley–Terry loss of a reward model on preference pairs, a scalar.

    Bradley & Terry (1952) model P(chosen ≻ rejected) = σ(r_c − r_r); reward modelling for RLHF (Stiennon et al.
    2020, Ouyang et al. 2022 "InstructGPT") minimises its negative log-likelihood:

        L = mean_i −log σ(r_c,i − r_r,i − m_i)  +  c · mean_i (r_c,i + r_r,i)²

    m_i is an optional per-pair margin (Llama 2, Touvron et al. 2023: a pair rated "significantly better" must be
    separated by more). The second term, with c = `center_rewards_coefficient` (Eisenstein et al. 2023), pulls the
    rewards towards zero mean, since the first term only sees differences and leaves the offset free.
    """
    differences = chosen_rewards - rejected_rewards
    if margin is not None:
        differences = differences - margin
    loss = -F.logsigmoid(differences).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """The fraction of pairs the rewards order correctly, r_c > r_r strictly (a tie counts as wrong), a scalar."""
    return (chosen_rewards > rejected_rewards).float().mean()


def mean_margin(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """mean_i (r_c,i − r_r,i), a scalar: how far apart the rewards put the two responses on average."""
    return (chosen_rewards - rejected_rewards).mean()


class DPOOutput(NamedTuple):
    """What `dpo_loss` returns; all three have one value per pair (B,)."""

    losses: torch.Tensor  # per-pair loss; the objective averages it
    chosen_rewards: torch.Tensor  # β · (log π(y_c|x) − log π_ref(y_c|x)), detached: a statistic to log
    rejected_rewards: torch.Tensor  # β · (log π(y_r|x) − log π_ref(y_r|x)), detached


def _sigmoid(log_ratio_difference: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): each label is flipped with
    # probability ε, so the target of σ(βh) is 1 − ε instead of 1.
    scaled = beta * log_ratio_difference
    return -(1 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def _ipo(log_ratio_difference: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # IPO regresses h onto the fixed target 1/(2β) instead of pushing it to infinity, so it cannot overfit
    # deterministic preferences; β here is the paper's τ.
    return (log_ratio_difference - 1 / (2 * beta)) ** 2


def _hinge(log_ratio_difference: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # The SLiC hinge (Zhao et al. 2023) on the DPO margin: zero loss once βh ≥ 1.
    return torch.relu(1 - beta * log_ratio_difference)


def _robust(log_ratio_difference: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # rDPO (Chowdhury et al. 2024): with flip rate ε the unbiased estimate of the clean loss is
    # ((1 − ε) ℓ(h) − ε ℓ(−h)) / (1 − 2ε), where ℓ(h) = −log σ(βh).
    scaled = beta * log_ratio_difference
    clean = -(1 - label_smoothing) * F.logsigmoid(scaled)
    flipped = -label_smoothing * F.logsigmoid(-scaled)
    return (clean - flipped) / (1 - 2 * label_smoothing)


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid, "ipo": _ipo, "hinge": _hinge, "robust": _robust,
}
LABEL_SMOOTHING_LOSSES = ("sigmoid", "robust")  # the loss types that read label_smoothing


def check_dpo_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise a one-line UserError for options `dpo_loss` cannot use (the objective's config can call it early)."""
    if loss_type not in DPO_LOSSES:
        raise UserError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSSES)}")
    if not (beta > 0 and math.isfinite(beta)):
        raise UserError(f"DPO beta must be a positive number, got {beta}")
    if label_smoothing and loss_type not in LABEL_SMOOTHING_LOSSES:
        raise UserError(f"label_smoothing applies to loss_type {' or '.join(LABEL_SMOOTHING_LOSSES)} only; "
                        f"set it to 0 for {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise UserError(f"label_smoothing is a label-flip probability in [0, 0.5), got {label_smoothing}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> DPOOutput:
    """Direct Preference Optimisation (Rafailov et al. 2023) and its variants, from summed response log-probs.

    With the log-ratios ρ_c = log π(y_c|x) − log π_ref(y_c|x) and ρ_r likewise, and h = ρ_c − ρ_r:

        sigmoid  −(1 − ε) log σ(βh) − ε log σ(−βh)       DPO; ε = label_smoothing > 0 is conservative DPO
        ipo      (h − 1/(2β))²                            Azar et al. 2023, "A General Theoretical Paradigm …"
        hinge    max(0, 1 − βh)                           SLiC-style hinge (Zhao et al. 2023)
        robust   ((1 − ε) ℓ(βh) − ε ℓ(−βh)) / (1 − 2ε)    Chowdhury et al. 2024, ℓ(z) = −log σ(z)

    For ipo, when `chosen_lengths` and `rejected_lengths` (response tokens per row) are given, each log-ratio is
    divided by its response's length first: h = ρ_c/|y_c| − ρ_r/|y_r|, TRL's form, which the IPO authors confirmed
    (summed log-ratios make the squared loss grow with length); without them h is the paper's unnormalised one.

    At initialisation (policy = reference) h = 0, so sigmoid DPO gives exactly ln 2 per pair.
    Returns the per-pair losses and the implicit rewards β·ρ_c and β·ρ_r (detached).
    """
    check_dpo_options(beta, loss_type, label_smoothing)
    chosen_log_ratios = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratios = policy_rejected_logps - reference_rejected_logps
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    if loss_type == "ipo" and chosen_lengths is not None and rejected_lengths is not None:
        difference = (chosen_log_ratios / chosen_lengths.clamp(min=1)
                      - rejected_log_ratios / rejected_lengths.clamp(min=1))
    else:
        difference = chosen_log_ratios - rejected_log_ratios
    losses = DPO_LOSSES[loss_type](difference, beta, label_smoothing)
    return DPOOutput(losses, beta * chosen_log_ratios.detach(), beta * rejected_log_ratios.detach())


__all__ = ["DPOOutput", "DPO_LOSSES", "check_dpo_options", "dpo_loss", "mean_margin", "pairwise_accuracy",
           "reward_pairwise_loss"]
