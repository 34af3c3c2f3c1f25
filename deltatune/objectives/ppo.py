"""Proximal Policy Optimisation against a reward, with a KL leash to a reference: the third stage of RLHF as in
InstructGPT (Ouyang et al. 2022) and Ziegler et al. 2019, on the one training loop.

Each rollout draws `rollout_size` prompts and, with the policy in eval mode:
1. samples a response per prompt (the KV cache on; temperature, top-k, top-p);
2. scores prompt+response with the reward (a reward model of any tokenizer, or a Python function);
3. computes the policy's log-probabilities, a value per token from a linear value head on the policy's last hidden
   state (shared trunk, as TRL's `AutoModelForCausalLMWithValueHead`), and the reference's log-probabilities;
4. turns them into per-token rewards r_t = −β·KL_t + [t last]·score (k1 or k3 estimator; β fixed or adapted towards
   `target_kl`), then GAE advantages (γ, λ; whitened over the rollout) and value targets.
The loop then takes `ppo_epochs` passes over the rollout in shuffled mini-batches of train.batch_size (one optimizer
step per train.gradient_accumulation of them), minimising PPO's clipped surrogate plus vf_coef times the clipped
value loss. Formulas and references: `deltatune.objectives.losses.ppo`.

Validation generates for the held-out prompts (seeded, so every evaluation samples alike) and reports the mean and
spread of their rewards, the KL to the reference per response (nats, summed over its tokens) and response length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from deltatune import distributed
from deltatune.config.constraints import above, at_least, between, one_of
from deltatune.config.schema import ObjectiveConfig
from deltatune.objectives import register_objective
from deltatune.objectives.base import BASE, ModelRole, Objective, disable_dropout
from deltatune.objectives.causal_lm import response_positions
from deltatune.objectives.losses import (
    KL_ESTIMATORS,
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages_and_returns,
    kl_penalised_rewards,
    masked_mean,
    masked_whiten,
    token_logprobs,
)
from deltatune.objectives.rollouts import Rollout, generate_responses, kl_per_response, policy_outputs

EVALUATION_SEED = 0  # validation samples with its own seed: the same draws at every evaluation, training untouched


@dataclass
class PPOConfig(ObjectiveConfig):
    """PPO's options, named as in TRL's PPOConfig where it has them. `reward_model` is required; `reference_model`
    unset is the base (the adapter-disabled policy when the method allows it). `target_kl` set makes the KL
    coefficient adaptive (Ziegler et al.: it moves towards the target over `kl_horizon` responses)."""

    reward_model: str | None = None
    reference_model: str | None = None
    rollout_size: int = field(default=16, metadata=at_least(1))  # prompts generated for per rollout
    ppo_epochs: int = field(default=4, metadata=at_least(1))
    max_new_tokens: int = field(default=32, metadata=at_least(1))
    temperature: float = field(default=1.0, metadata=above(0))
    top_k: int = field(default=0, metadata=at_least(0))  # 0: off
    top_p: float = field(default=1.0, metadata=between(0, 1))  # 1: off
    kl_coef: float = field(default=0.05, metadata=at_least(0))
    kl_estimator: str = field(default="k1", metadata=one_of(*KL_ESTIMATORS))
    target_kl: float | None = field(default=None, metadata=above(0))
    kl_horizon: float = field(default=10000.0, metadata=above(0))
    gamma: float = field(default=1.0, metadata=between(0, 1))
    lam: float = field(default=0.95, metadata=between(0, 1))
    cliprange: float = field(default=0.2, metadata=above(0))
    cliprange_value: float = field(default=0.2, metadata=above(0))
    vf_coef: float = field(default=0.1, metadata=at_least(0))
    whiten_rewards: bool = False
    disable_dropout: bool = True


@register_objective("ppo")
class ProximalPolicyOptimisation(Objective):
    description = "PPO against a reward model or function, with a KL leash to the reference (InstructGPT recipe)"
    config_class = PPOConfig
    task = "prompts"
    models = {"reward": ModelRole(scores_text=True), "reference": ModelRole(default=BASE)}
    main_metric = "reward"
    greater_is_better = True
    metrics = ("reward", "reward_std", "kl", "length")

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        super().__init__(config)
        self.rollout_size = self.config.rollout_size
        self.kl = KLController(self.config.kl_coef, self.config.target_kl, self.config.kl_horizon)
        self.value_head: nn.Linear | None = None
        self.rollout_statistics: dict[str, float] = {}

    def setup(self, models: dict[str, nn.Module], policy_model: nn.Module, method: Any) -> None:
        self.reward, self.reference = models["reward"], models["reference"]
        if self.config.disable_dropout:
            disable_dropout(policy_model)
        hidden = policy_model.get_input_embeddings().weight.shape[1]
        device = next(policy_model.parameters()).device
        self.value_head = nn.Linear(hidden, 1).to(device)
        with torch.no_grad():  # V = 0 everywhere at the start: the first advantages are the rewards themselves
            self.value_head.weight.zero_()
            self.value_head.bias.zero_()

    def higher_is_better(self, metric: str) -> bool:
        return metric not in ("kl", "reward_std") and super().higher_is_better(metric)

    # ---- the rollout phase ------------------------------------------------------------------------------------
    def steps_per_rollout(self, examples: int, batch_size: int, accumulation: int) -> int:
        return self.config.ppo_epochs * math.ceil(math.ceil(examples / batch_size) / accumulation)

    @torch.no_grad()
    def rollout(self, model: nn.Module, batch: dict[str, Any], batch_size: int,
                accumulation: int) -> list[list[dict[str, torch.Tensor]]]:
        experience = self._experience(model, batch)
        steps: list[list[dict[str, torch.Tensor]]] = []
        rows = experience["input_ids"].shape[0]
        for _ in range(self.config.ppo_epochs):
            order = torch.randperm(rows).to(experience["input_ids"].device)
            micro = [{key: value[order[start:start + batch_size]] for key, value in experience.items()}
                     for start in range(0, rows, batch_size)]
            steps.extend(micro[i:i + accumulation] for i in range(0, len(micro), accumulation))
        return steps

    def _experience(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        rollout = generate_responses(model, batch, self.processor, self.config)
        scores = self.reward(batch["prompt"], rollout.texts).to(rollout.inputs["input_ids"].device).float()
        logits, hidden = policy_outputs(model, rollout.inputs, hidden=True)
        logits = logits / self.config.temperature
        logprobs, mask = token_logprobs(logits, rollout.inputs["labels"])
        values = self._values(hidden)
        reference_logits = policy_outputs(self.reference, rollout.inputs)[0] / self.config.temperature
        reference_logprobs, _ = token_logprobs(reference_logits, rollout.inputs["labels"])
        rewards, kl = kl_penalised_rewards(scores, logprobs, reference_logprobs, mask, self.kl.coefficient,
                                           self.config.kl_estimator)
        if self.config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages_and_returns(rewards, values, mask, self.config.gamma, self.config.lam)
        advantages = masked_whiten(advantages, mask)
        self._record(rollout, scores, kl, logits, mask)
        return {**rollout.inputs, "old_logprobs": logprobs, "old_values": values, "advantages": advantages,
                "returns": returns}

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s_t) per position, in fp32 whatever the loop's autocast: advantages and returns are built from them
        (and whitened), where bf16's 8 bits would round a score of 3.14 by 0.01."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden[:, :-1].float()).squeeze(-1)

    def _record(self, rollout: Rollout, scores: torch.Tensor, kl: torch.Tensor, logits: torch.Tensor,
                mask: torch.Tensor) -> None:
        """The rollout's statistics, logged with every step taken on it; then the KL coefficient adapts."""
        kl_per_response = kl.sum(dim=1)
        self.rollout_statistics = {
            "reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": float(kl_per_response.mean()), "entropy": float(masked_mean(entropy_from_logits(logits[:, :-1]),
                                                                             mask)),
            "response_length": float(mask.sum(dim=1).float().mean()), "kl_coef": self.kl.coefficient}
        # Every rank adapts the coefficient from every rank's responses, so the ranks keep one coefficient (only rank
        # 0's is checkpointed) and the horizon counts the whole rollout, as one process would.
        total = distributed.sum_across_ranks(float(kl_per_response.sum()))
        count = distributed.sum_across_ranks(len(scores))
        self.kl.update(total / max(count, 1.0), int(count))

    # ---- the optimisation phase -------------------------------------------------------------------------------
    def loss_units(self, batch: dict[str, Any]) -> int:
        """The clipped losses are masked means over the response tokens."""
        return int(response_positions(batch["labels"]).sum())

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logits, hidden = policy_outputs(model, batch, hidden=True)
        logprobs, mask = token_logprobs(logits / self.config.temperature, batch["labels"])
        values = self._values(hidden)
        policy = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, self.config.cliprange)
        value = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, self.config.cliprange_value)
        loss = policy.loss + self.config.vf_coef * value.loss
        return loss, {**self.rollout_statistics, "policy_loss": float(policy.loss.detach()),
                      "value_loss": float(value.loss.detach()), "clip_fraction": float(policy.clip_fraction),
                      "value_clip_fraction": float(value.clip_fraction), "approx_kl": float(policy.approx_kl)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        scores, kls, lengths = [], [], []
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(EVALUATION_SEED)
            for batch in batches:
                rollout = generate_responses(model, batch, self.processor, self.config)
                scores.append(self.reward(batch["prompt"], rollout.texts).float().cpu())
                kl, length = kl_per_response(model, self.reference, rollout.inputs, self.config.temperature)
                kls.append(kl.cpu())
                lengths.append(length.cpu())
        if not scores:
            return {}
        score = torch.cat(scores)
        return {"reward": float(score.mean()), "reward_std": float(score.std()) if len(score) > 1 else 0.0,
                "kl": float(torch.cat(kls).mean()), "length": float(torch.cat(lengths).mean())}

    # ---- checkpointed state -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.value_head.parameters()) if self.value_head is not None else []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"value_head.{name}": tensor for name, tensor in self.value_head.state_dict().items()}
        state["kl_coef"] = torch.tensor([self.kl.coefficient], dtype=torch.float64)
        state.update({f"statistics.{name}": torch.tensor([value], dtype=torch.float64)
                      for name, value in self.rollout_statistics.items()})
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        with torch.no_grad():
            for name, tensor in self.value_head.state_dict().items():
                tensor.copy_(tensors[f"value_head.{name}"])
        self.kl.coefficient = float(tensors["kl_coef"][0])
        self.rollout_statistics = {name.split(".", 1)[1]: float(value[0]) for name, value in tensors.items()
                                   if name.startswith("statistics.")}
