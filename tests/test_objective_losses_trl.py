"""deltatune's preference and RLHF losses against TRL 1.16's own code, on the same tensors (a dev dependency).

TRL keeps its losses inside trainer methods rather than as functions, so each test calls the unbound method
(`RewardTrainer.compute_loss`, `DPOTrainer._compute_loss`, `GRPOTrainer._compute_loss`) with a stand-in `self`
that holds only the attributes that method reads, and a stand-in model that returns the tensors under test. What runs
is TRL's arithmetic, line for line; the stand-ins only skip the Trainer's setup (datasets, accelerate, a real model).

Where TRL 1.16 has the same computation, the values agree within 1e-6:
- the reward loss with margin and centring, its accuracy and margin (RewardTrainer);
- DPO sigmoid, ipo (TRL's length-normalised form), hinge and robust, and the implicit rewards (DPOTrainer);
- PPO's clipped policy loss, its clip fraction and the k3 KL (GRPOTrainer's "bnpo" loss is the PPO clipped surrogate
  averaged over the completion tokens; its KL term is k3);
- response log-probabilities (TRL's fused LM head and selective_log_softmax) and entropies (entropy_from_logits).
TRL 1.16 no longer has PPO (PPOTrainer was removed), so GAE, whitening, the clipped value loss, the k1 estimator,
the KL-penalised rewards, the adaptive KL controller and conservative (label-smoothed sigmoid) DPO are checked
against hand-computed values in tests/test_objective_losses.py only.
"""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Any

import pytest
import torch

from deltatune.objectives.losses import (
    clipped_policy_loss,
    dpo_loss,
    entropy_from_logits,
    kl_per_token,
    mean_margin,
    masked_mean,
    pairwise_accuracy,
    response_lengths,
    reward_pairwise_loss,
    sequence_logprobs,
    token_logprobs,
)
from tests.helpers import seeded
from tests.tiny_models import tiny_llama

pytest.importorskip("trl")
from trl.trainer import utils as trl_utils  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

TOLERANCE = 1e-6


def assert_equal_within_tolerance(ours: torch.Tensor | float, trls: torch.Tensor | float) -> None:
    torch.testing.assert_close(torch.as_tensor(ours, dtype=torch.float32),
                               torch.as_tensor(trls, dtype=torch.float32), atol=TOLERANCE, rtol=0)


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def trainer_stand_in(**attributes: Any) -> types.SimpleNamespace:
    """A single-process, evaluation-mode `self` for a TRL trainer method: gathers are identities, metrics a dict."""
    accelerator = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction="sum": x, num_processes=1, sync_gradients=True,
                                        device=torch.device("cpu"))
    return types.SimpleNamespace(accelerator=accelerator, _metrics=defaultdict(lambda: defaultdict(list)),
                                 model=types.SimpleNamespace(training=False), _total_train_tokens=0, _tp_size=1,
                                 **attributes)


# --- reward model ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center_rewards_coefficient", [None, 0.01])
def test_reward_loss_matches_trl(with_margin: bool, center_rewards_coefficient: float | None) -> None:
    chosen, rejected, margin = random(6, seed=1), random(6, seed=2), random(6, seed=3).abs()
    trainer = trainer_stand_in(args=types.SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient))
    inputs: dict[str, torch.Tensor] = {"attention_mask": torch.ones(12, 4)}
    if with_margin:
        inputs["margin"] = margin

    def reward_model(**_: Any) -> types.SimpleNamespace:  # TRL batches the chosen rows first, then the rejected
        return types.SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    trls = RewardTrainer.compute_loss(trainer, reward_model, inputs)
    ours = reward_pairwise_loss(chosen, rejected, margin if with_margin else None, center_rewards_coefficient)
    assert_equal_within_tolerance(ours, trls)
    metrics = trainer._metrics["eval"]
    assert_equal_within_tolerance(pairwise_accuracy(chosen, rejected), metrics["accuracy"][0])
    assert_equal_within_tolerance(mean_margin(chosen, rejected), metrics["margin"][0])


# --- DPO ---------------------------------------------------------------------------------------------------------

PAIRS, LENGTH = 3, 7
# Response spans [start, end) of the chosen rows, then of the rejected rows: different lengths, so IPO's
# normalisation matters.
RESPONSE_SPANS = [(2, 7), (3, 5), (1, 7), (4, 7), (2, 3), (3, 6)]


def dpo_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completion mask (2B, T), per-token policy log-probs on the shifted grid (2B, T-1), reference sums (2B,)."""
    completion_mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for row, (start, end) in enumerate(RESPONSE_SPANS):
        completion_mask[row, start:end] = 1
    per_token = -random(2 * PAIRS, LENGTH - 1, seed=4).abs() * 2 * completion_mask[:, 1:]
    reference = per_token.sum(1) + random(2 * PAIRS, seed=5)
    return completion_mask, per_token, reference


def trl_dpo(loss_type: str, beta: float, label_smoothing: float) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """TRL's DPO loss and logged metrics, its reference log-probs given as precomputed (the `precompute_ref_logps`
    path), its policy returning the per-token log-probs of `dpo_case`."""
    completion_mask, per_token, reference = dpo_case()
    trainer = trainer_stand_in(aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
                               f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                               label_smoothing=label_smoothing, use_weighting=False)
    zeros = torch.zeros_like(per_token)

    def policy(**_: Any) -> types.SimpleNamespace:  # the fused-LM-head output DPOTrainer reads
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {"input_ids": torch.ones_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": reference[:PAIRS],
              "ref_rejected_logps": reference[PAIRS:]}
    return DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False), trainer._metrics["eval"]


@pytest.mark.parametrize("loss_type, label_smoothing", [
    ("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.1), ("robust", 0.3),
])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(loss_type: str, label_smoothing: float, beta: float) -> None:
    trls, metrics = trl_dpo(loss_type, beta, label_smoothing)
    completion_mask, per_token, reference = dpo_case()
    policy, lengths = per_token.sum(1), completion_mask.sum(1)
    ours = dpo_loss(policy[:PAIRS], policy[PAIRS:], reference[:PAIRS], reference[PAIRS:], beta=beta,
                    loss_type=loss_type, label_smoothing=label_smoothing, chosen_lengths=lengths[:PAIRS],
                    rejected_lengths=lengths[PAIRS:])
    assert_equal_within_tolerance(ours.losses.mean(), trls)
    assert_equal_within_tolerance(ours.chosen_rewards.mean(), metrics["rewards/chosen"][0])
    assert_equal_within_tolerance(ours.rejected_rewards.mean(), metrics["rewards/rejected"][0])
    assert_equal_within_tolerance(mean_margin(ours.chosen_rewards, ours.rejected_rewards),
                                  metrics["rewards/margins"][0])
    assert_equal_within_tolerance(pairwise_accuracy(ours.chosen_rewards, ours.rejected_rewards),
                                  metrics["rewards/accuracies"][0])


def test_response_log_probs_match_trl_on_a_tiny_llama() -> None:
    """sequence_logprobs over a real model's logits == the sum of TRL's fused-LM-head log-probs (what its DPO
    sums) and of selective_log_softmax, with the prompt and the padding labelled -100."""
    model = seeded(tiny_llama).eval()
    input_ids = torch.randint(1, 30000, (3, 9), generator=torch.Generator().manual_seed(6))
    labels = input_ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[1, 7:] = -100  # a shorter response, then padding
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        per_token, mask = token_logprobs(logits, labels)
        selected = trl_utils.selective_log_softmax(logits[:, :-1], labels[:, 1:].clamp(min=0)) * mask
        assert_equal_within_tolerance(per_token, selected)
        trl_utils.add_fused_lm_head(model)  # patches this throwaway model's forward, as DPOTrainer does
        fused = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
    # sums of 4-6 tokens of about −10 each: compare relative to their size
    torch.testing.assert_close(sequence_logprobs(logits, labels), fused.sum(1), atol=TOLERANCE, rtol=TOLERANCE)
    assert response_lengths(labels).tolist() == [6, 4, 6]


def test_entropy_matches_trl() -> None:
    logits = random(2, 5, 40, seed=7) * 3
    assert_equal_within_tolerance(entropy_from_logits(logits), trl_utils.entropy_from_logits(logits))


# --- PPO ---------------------------------------------------------------------------------------------------------

ROLLOUTS, STEPS = 4, 6


def ppo_case() -> dict[str, torch.Tensor]:
    logprobs = -random(ROLLOUTS, STEPS, seed=8).abs()
    mask = torch.ones(ROLLOUTS, STEPS, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    return {"logprobs": logprobs, "old_logprobs": logprobs + 0.3 * random(ROLLOUTS, STEPS, seed=9),
            "reference_logprobs": logprobs + 0.5 * random(ROLLOUTS, STEPS, seed=10),
            "advantages": random(ROLLOUTS, STEPS, seed=11), "mask": mask}


def trl_grpo_bnpo(case: dict[str, torch.Tensor], cliprange: float,
                  kl_coef: float) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """GRPOTrainer's loss with loss_type "bnpo" (mean over all completion tokens), token-level ratios, symmetric
    clipping, and kl_coef · k3 added per token; the per-token log-probs are those of `case`."""
    entropies = torch.zeros_like(case["logprobs"])
    trainer = trainer_stand_in(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (case["logprobs"], entropies, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=kl_coef,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type="bnpo",
        epsilon_low=cliprange, epsilon_high=cliprange, use_vllm=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False)
    prompt = torch.ones(ROLLOUTS, 2, dtype=torch.long)
    inputs = {"prompt_ids": prompt, "prompt_mask": prompt, "completion_ids": torch.ones_like(case["mask"]),
              "completion_mask": case["mask"], "advantages": case["advantages"],
              "old_per_token_logps": case["old_logprobs"], "ref_per_token_logps": case["reference_logprobs"]}
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["eval"]


@pytest.mark.parametrize("cliprange", [0.1, 0.2])
def test_clipped_policy_loss_and_clip_fraction_match_trl(cliprange: float) -> None:
    case = ppo_case()
    trls, metrics = trl_grpo_bnpo(case, cliprange, kl_coef=0.0)
    ours = clipped_policy_loss(case["logprobs"], case["old_logprobs"], case["advantages"], case["mask"].bool(),
                               cliprange)
    assert_equal_within_tolerance(ours.loss, trls)
    assert_equal_within_tolerance(ours.clip_fraction, metrics["clip_ratio/region_mean"][0])
    assert 0 < float(ours.clip_fraction) < 1  # the case exercises both clipped and unclipped tokens


def test_k3_kl_matches_trl() -> None:
    case = ppo_case()
    kl_coef = 0.05
    trls, metrics = trl_grpo_bnpo(case, 0.2, kl_coef)
    mask = case["mask"].bool()
    k3 = kl_per_token(case["logprobs"], case["reference_logprobs"], "k3")
    assert_equal_within_tolerance(masked_mean(k3, mask), metrics["kl"][0])
    policy_loss = clipped_policy_loss(case["logprobs"], case["old_logprobs"], case["advantages"], mask, 0.2).loss
    assert_equal_within_tolerance(policy_loss + kl_coef * masked_mean(k3, mask), trls)
