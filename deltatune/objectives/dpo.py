"""Direct Preference Optimisation (Rafailov et al. 2023): fine-tune a causal LM on preference pairs directly, with
no reward model, by raising the log-probability of the chosen response relative to a frozen reference more than
that of the rejected one:

    L = −log σ(β · [(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])

and the IPO, hinge and robust variants (`loss_type`; formulas in `deltatune.objectives.losses.dpo_loss`).
Log-probabilities are summed over the response tokens only (labels mask the prompt and chat template).

The reference, cheapest first: the policy itself with its adapters switched off (LoRA and the other adapter
methods: no second copy in memory), a frozen copy of the base (methods that change the base's own weights), or
`precompute_reference: true`: the reference's log-probabilities of every pair computed once before training and
saved with the run (`precomputed/` in the run directory), after which the reference model is dropped from memory.
Logged: the implicit rewards β·(log π − log π_ref) of chosen and rejected responses, their margin, and preference
accuracy (the share of pairs whose chosen implicit reward is the larger).
"""

from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from deltatune.config.constraints import above, between, one_of
from deltatune.config.schema import ObjectiveConfig
from deltatune.objectives import register_objective
from deltatune.objectives.base import BASE, ModelRole, Objective, disable_dropout
from deltatune.objectives.causal_lm import lm_logits
from deltatune.objectives.losses import DPO_LOSSES, check_dpo_options, dpo_loss, response_lengths, sequence_logprobs
from deltatune.objectives.pairs import concatenated, split_halves

REFERENCE_KEY = "reference_logprobs"  # per-pair (chosen, rejected) reference log-probabilities, when precomputed


@dataclass
class DPOConfig(ObjectiveConfig):
    """TRL's option names. `reference_model` unset means "base": the adapter-disabled policy when the method allows
    it, else a frozen copy of model.name; any model source or run directory works too."""

    beta: float = field(default=0.1, metadata=above(0))
    loss_type: str = field(default="sigmoid", metadata=one_of(*DPO_LOSSES))
    label_smoothing: float = field(default=0.0, metadata=between(0, 0.5, high_open=True))
    reference_model: str | None = None
    precompute_reference: bool = False
    disable_dropout: bool = True


@register_objective("dpo")
class DirectPreferenceOptimisation(Objective):
    description = "direct preference optimisation against a frozen reference (sigmoid, ipo, hinge, robust losses)"
    config_class = DPOConfig
    task = "preference"
    models = {"reference": ModelRole(default=BASE)}
    main_metric = "loss"
    greater_is_better = False
    metrics = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        super().__init__(config)
        check_dpo_options(self.config.beta, self.config.loss_type, self.config.label_smoothing)
        self.reference: nn.Module | None = None
        self._evaluation_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, models: dict[str, nn.Module], policy_model: nn.Module, method: Any) -> None:
        self.reference = models["reference"]
        if self.config.disable_dropout:
            disable_dropout(policy_model)

    def precompute(self, splits: dict[str, list[dict]], batches_of: Callable[[list[dict]], dict[str, Any]],
                   batch_size: int) -> dict[str, torch.Tensor]:
        """With `precompute_reference`, every pair's reference log-probabilities, stored in its example (the
        collator batches them as `reference_logprobs`) and returned per split to be saved with the run; then the
        reference model is released. Without it, nothing."""
        if not self.config.precompute_reference or self.reference is None:
            return {}
        stored = {}
        for split, examples in splits.items():
            values = []
            for start in range(0, len(examples), batch_size):
                batch = batches_of(examples[start:start + batch_size])
                values.append(torch.stack(self._reference_logprobs(concatenated(batch)), dim=1).cpu())
            stored[split] = torch.cat(values) if values else torch.zeros(0, 2)
            for example, pair in zip(examples, stored[split].tolist()):
                example[REFERENCE_KEY] = pair
        self.reference = None  # the only reference left: a frozen copy is freed here
        gc.collect()
        return stored

    def _reference_logprobs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return split_halves(sequence_logprobs(lm_logits(self.reference, inputs), inputs["labels"]))

    def _cached_reference_logprobs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probabilities of an evaluation batch, computed once per distinct batch: the reference never
        changes and validation batches recur at every evaluation, so later evaluations cost one forward, not two."""
        key = hashlib.sha1(inputs["input_ids"].cpu().numpy().tobytes() + inputs["labels"].cpu().numpy().tobytes())
        found = self._evaluation_cache.get(key.hexdigest())
        if found is None:
            found = self._evaluation_cache[key.hexdigest()] = self._reference_logprobs(inputs)
        return found

    def _pair_losses(self, model: nn.Module, batch: dict[str, Any], evaluating: bool = False):
        inputs = concatenated(batch)
        policy_chosen, policy_rejected = split_halves(sequence_logprobs(lm_logits(model, inputs), inputs["labels"]))
        if REFERENCE_KEY in batch:
            reference_chosen, reference_rejected = batch[REFERENCE_KEY][:, 0], batch[REFERENCE_KEY][:, 1]
        elif evaluating:
            reference_chosen, reference_rejected = self._cached_reference_logprobs(inputs)
        else:
            reference_chosen, reference_rejected = self._reference_logprobs(inputs)
        chosen_lengths, rejected_lengths = split_halves(response_lengths(inputs["labels"]))
        return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.config.beta,
                        self.config.loss_type, self.config.label_smoothing, chosen_lengths, rejected_lengths)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        output = self._pair_losses(model, batch)
        return output.losses.mean(), _reward_statistics(output.chosen_rewards, output.rejected_rewards)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        losses, chosen, rejected = [], [], []
        for batch in batches:
            output = self._pair_losses(model, batch, evaluating=True)
            losses.append(output.losses)
            chosen.append(output.chosen_rewards)
            rejected.append(output.rejected_rewards)
        if not losses:
            return {}
        return {"loss": float(torch.cat(losses).mean()),
                **_reward_statistics(torch.cat(chosen), torch.cat(rejected))}

    def higher_is_better(self, metric: str) -> bool:
        return metric != "rewards/rejected" and super().higher_is_better(metric)


def _reward_statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Means of the implicit rewards, their margin, and the share of pairs whose chosen reward is larger."""
    return {"accuracy": float((chosen > rejected).float().mean()), "margin": float((chosen - rejected).mean()),
            "rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean())}

