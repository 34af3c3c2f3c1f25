"""The losses of preference learning, RLHF and distillation as small pure tensor functions (issues 12 and 13),
shared by the objectives.

- `logprobs`: per-token and summed response log-probabilities and entropies from a causal LM's logits;
- `preference`: the Bradley–Terry reward-model loss and its metrics; DPO (sigmoid, IPO, hinge, robust);
- `distillation`: soft labels with a temperature, token-level forward/reverse KL and generalised JSD, hidden-state
  cosine alignment (issue 13);
- `ppo`: GAE, whitening, the KL leash (k1/k3 and the adaptive coefficient), PPO's clipped policy and value losses.

None of them reads a model, a batch layout or a config; each docstring gives the paper and the formula. They are
checked against hand-computed values and against TRL's own implementation in tests/test_objective_losses*.py.
"""

from __future__ import annotations

from deltatune.objectives.losses.distillation import (
    DIVERGENCES,
    classification_distillation_loss,
    hidden_cosine_loss,
    token_divergence,
)
from deltatune.objectives.losses.logprobs import (
    IGNORE_INDEX,
    entropy_from_logits,
    response_lengths,
    sequence_logprobs,
    shifted_response_mask,
    token_logprobs,
)
from deltatune.objectives.losses.ppo import (
    KL_ESTIMATORS,
    KLController,
    PolicyLossOutput,
    ValueLossOutput,
    adaptive_kl_coefficient,
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages_and_returns,
    kl_penalised_rewards,
    kl_per_token,
    masked_mean,
    masked_whiten,
)
from deltatune.objectives.losses.preference import (
    DPO_LOSSES,
    DPOOutput,
    check_dpo_options,
    dpo_loss,
    mean_margin,
    pairwise_accuracy,
    reward_pairwise_loss,
)

__all__ = [
    "DIVERGENCES", "classification_distillation_loss", "hidden_cosine_loss", "token_divergence",
    "DPO_LOSSES", "DPOOutput", "IGNORE_INDEX", "KLController", "KL_ESTIMATORS", "PolicyLossOutput", "ValueLossOutput",
    "adaptive_kl_coefficient", "check_dpo_options", "clipped_policy_loss", "clipped_value_loss", "dpo_loss",
    "entropy_from_logits", "gae_advantages_and_returns", "kl_penalised_rewards", "kl_per_token", "masked_mean",
    "masked_whiten", "mean_margin", "pairwise_accuracy", "reward_pairwise_loss", "response_lengths",
    "sequence_logprobs", "shifted_response_mask", "token_logprobs",
]
