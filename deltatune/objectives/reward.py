"""Reward modelling: a sequence classifier with one output learns to score the chosen response of a preference pair
above the rejected one (the second stage of RLHF; Stiennon et al. 2020, Ouyang et al. 2022).

    L = mean_i −log σ(r(x_i, y_c,i) − r(x_i, y_r,i) − m_i)  [+ c · mean_i (r_c,i + r_r,i)²]

with m_i the optional `margin` column and c = `center_rewards_coefficient` (TRL's names; see
`deltatune.objectives.losses.reward_pairwise_loss`). The score of a prompt+response is read at its last real token
(`deltatune.objectives.pairs.sequence_scores`), so a decoder reward model is right even when pad == eos. Validation
reports pairwise accuracy (the share of pairs ordered correctly) and the mean margin r_c − r_r.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from deltatune.config.constraints import at_least
from deltatune.config.schema import ObjectiveConfig
from deltatune.objectives import register_objective
from deltatune.objectives.base import Objective
from deltatune.objectives.losses import mean_margin, pairwise_accuracy, reward_pairwise_loss
from deltatune.objectives.pairs import concatenated, sequence_scores, split_halves


@dataclass
class RewardConfig(ObjectiveConfig):
    """`center_rewards_coefficient`: weight of the (r_c + r_r)² term that keeps rewards centred on 0 (TRL's name;
    0.01 is the value Eisenstein et al. 2023 use). Off (0) by default, as in TRL."""

    center_rewards_coefficient: float = field(default=0.0, metadata=at_least(0))


def pair_rewards(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards), one per pair, from one forward pass over both halves."""
    return split_halves(sequence_scores(model, concatenated(batch)))


@register_objective("reward")
class RewardModelling(Objective):
    description = "Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin) for a one-output reward model"
    config_class = RewardConfig
    task = "reward-pairs"
    main_metric = "accuracy"
    greater_is_better = True
    metrics = ("loss", "accuracy", "margin")

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_rewards(model, batch)
        loss = reward_pairwise_loss(chosen, rejected, batch.get("margin"),
                                    self.config.center_rewards_coefficient)
        return loss, {"accuracy": float(pairwise_accuracy(chosen, rejected)),
                      "margin": float(mean_margin(chosen.detach(), rejected.detach()))}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        all_chosen, all_rejected, all_margins = [], [], []
        for batch in batches:
            chosen, rejected = pair_rewards(model, batch)
            all_chosen.append(chosen)
            all_rejected.append(rejected)
            if "margin" in batch:
                all_margins.append(batch["margin"])
        if not all_chosen:
            return {}
        chosen, rejected = torch.cat(all_chosen), torch.cat(all_rejected)
        margins = torch.cat(all_margins) if all_margins else None
        loss = reward_pairwise_loss(chosen, rejected, margins, self.config.center_rewards_coefficient)
        return {"loss": float(loss), "accuracy": float(pairwise_accuracy(chosen, rejected)),
                "margin": float(mean_margin(chosen, rejected))}
