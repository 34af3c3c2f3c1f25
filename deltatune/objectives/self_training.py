"""Semi-supervised fine-tuning by self-training (pseudo-labels; Scudder 1965, Yarowsky 1995, Lee 2013 "Pseudo-Label",
Xie et al. 2020 "Noisy Student"), with FixMatch's consistency term as an option (Sohn et al. 2020).

Training runs in rounds, one epoch of the loop each (`rounds`, `batches_per_round`):

    round 0      train on the labelled rows only;
    round r ≥ 1  predict every unlabelled row with the current model; keep a pseudo-label ŷ = argmax p(y|x) where
                 max p ≥ `confidence` (optionally only the `per_class` most confident of each class, which keeps a
                 majority class from swamping the rest); train on labelled + pseudo-labelled rows, minimising

                     L = Σ_i w_i · CE(y_i, f(x_i)) / Σ_i w_i,   w = 1 on labels, `pseudo_weight` on pseudo-labels.

With `restart`, every round starts again from the weights training started with (Noisy Student, Xie et al.
2020; Curriculum Labeling, Cascante-Bonilla et al. 2021), so a round's own mistakes are not learned twice; the
optimizer's moments carry over. The validation score is measured after every round and training stops when it stops improving (`patience`
rounds); the best round's weights are the run's. Each round is logged (`"type": "round"` in metrics.jsonl): how
many pseudo-labels were kept, their share, and, when the true labels are known (data.labelled_fraction hides
them), how many are right.

Input noise (`input_noise` > 0, Noisy Student): the training pass sees corrupted inputs (tokens hidden from
attention, or a Cutout square on images) while the pseudo-labels come from clean ones.

Consistency (`consistency_weight` > 0): every unlabelled row of a batch is also predicted by one more forward
pass on the clean input with dropout (no gradient); where that pass is confident (max p ≥ `p_cutoff`) its argmax
supervises the training pass, which sees another dropout mask and the input noise: FixMatch's weak/strong views,

    L_u = Σ_{i unlabelled} 1[max p̃_i ≥ τ] · CE(argmax p̃_i, f(x_i)) / #unlabelled.

Works for any labelled task (text or images) and any method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config.constraints import above, at_least, between
from deltatune.config.schema import ObjectiveConfig
from deltatune.data.noise import noised_inputs
from deltatune.data.unlabelled import HIDDEN_LABEL, UNLABELLED, check_some_unlabelled
from deltatune.errors import UserError
from deltatune.objectives import register_objective
from deltatune.objectives.base import Objective, model_logits
from deltatune.objectives.classification import classification_metrics
from deltatune.training.sharding import like

EXAMPLE_INDEX = "example_index"  # a training example's position, to look its pseudo-label up


@dataclass
class SelfTrainingConfig(ObjectiveConfig):
    rounds: int = field(default=4, metadata=at_least(1))  # round 0 on the labels, then rounds - 1 with pseudo-labels
    # Micro-batches per round; None: one pass over the whole train split (labelled and unlabelled rows).
    batches_per_round: int | None = field(default=None, metadata=at_least(1))
    confidence: float = field(default=0.9, metadata=between(0, 1, low_open=True))
    per_class: int | None = field(default=None, metadata=at_least(1))  # at most this many pseudo-labels a class
    pseudo_weight: float = field(default=1.0, metadata=above(0))
    patience: int = field(default=1, metadata=at_least(1))  # rounds without validation improvement before stopping
    # Start every round from the weights training started with (Noisy Student, Curriculum Labeling): the errors a
    # round's model learned from its own pseudo-labels are not carried into the next round's.
    restart: bool = False
    # Noisy Student's input noise on the training pass: this fraction of each text's tokens hidden from attention, or
    # a Cutout square of this fraction of each image (deltatune/data/noise.py); pseudo-labels come from clean inputs.
    input_noise: float = field(default=0.0, metadata=between(0, 1, high_open=True))
    consistency_weight: float = field(default=0.0, metadata=at_least(0))
    p_cutoff: float = field(default=0.95, metadata=between(0, 1, low_open=True))


@register_objective("self_training")
class SelfTraining(Objective):
    description = "semi-supervised self-training: confident pseudo-labels on unlabelled rows, round by round"
    config_class = SelfTrainingConfig
    reads_unlabelled = True
    example_keys = (EXAMPLE_INDEX,)
    main_metric = "accuracy"
    greater_is_better = True
    metrics = ("loss", "accuracy")

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        super().__init__(config)
        self.early_stopping_patience = self.config.patience
        self.pseudo_labels = torch.zeros(0, dtype=torch.long)  # per training example; UNLABELLED where none
        self.labelled: list[int] = []
        self.unlabelled: list[int] = []
        self.hidden: torch.Tensor | None = None  # true labels of unlabelled rows where an experiment hid them
        self.start: dict[str, torch.Tensor] = {}  # the weights every round starts from, with `restart`

    def setup(self, models: dict[str, nn.Module], policy_model: nn.Module, method: Any) -> None:
        """With `restart`, keep the weights training starts from (the trainable parameters and the buffers); setup
        runs before a resumed run loads its checkpoint, so this is the start in every case."""
        if self.config.restart:
            self.start = {name: tensor.detach().clone() for name, tensor in _restartable(policy_model)}

    def attach_task(self, task: Any) -> None:
        if not task.labelled:
            raise UserError(f"objective 'self_training' pseudo-labels classes, and task {task.name!r} has none; use "
                            "it with classification or image-classification")

    def precompute(self, splits: dict[str, list[dict]], batches_of: Any, batch_size: int) -> dict[str, torch.Tensor]:
        """Number the training examples and sort them into labelled and unlabelled; no pseudo-labels yet."""
        train = splits.get("train", [])
        check_some_unlabelled(train, self.name)
        for index, example in enumerate(train):
            example[EXAMPLE_INDEX] = index
        self.labelled = [i for i, example in enumerate(train) if example["labels"] != UNLABELLED]
        self.unlabelled = [i for i, example in enumerate(train) if example["labels"] == UNLABELLED]
        if not self.labelled:
            raise UserError("objective 'self_training' needs some labelled training rows to start from; every label "
                            "is empty")
        self.pseudo_labels = torch.full((len(train),), UNLABELLED, dtype=torch.long)
        if any(HIDDEN_LABEL in train[i] for i in self.unlabelled):
            self.hidden = torch.tensor([train[i].get(HIDDEN_LABEL, UNLABELLED) for i in self.unlabelled])
        return {}

    # ---- rounds ------------------------------------------------------------------------------------------------
    def epoch_plan(self, num_examples: int, batch_size: int) -> tuple[int, float]:
        return self.config.batches_per_round or math.ceil(num_examples / batch_size), float(self.config.rounds)

    def epoch_examples(self) -> list[int]:
        """Labelled rows and the pseudo-labelled ones; with the consistency term, every unlabelled row too."""
        if self.config.consistency_weight:
            return self.labelled + self.unlabelled
        return self.labelled + [i for i in self.unlabelled if int(self.pseudo_labels[i]) != UNLABELLED]

    @torch.no_grad()
    def start_epoch(self, epoch: int, model: nn.Module, batches_of: Callable[[list[int]], dict[str, Any]],
                    batch_size: int) -> dict[str, float]:
        """Round `epoch`: from round 1 on, pseudo-label the unlabelled rows with the model as it is now."""
        stats: dict[str, float] = {"round": epoch, "labelled": len(self.labelled)}
        if epoch == 0:
            return {**stats, "pseudo_labels": 0}
        confidences, predictions = [], []
        for start in range(0, len(self.unlabelled), batch_size):
            batch = batches_of(self.unlabelled[start:start + batch_size])
            probabilities = F.softmax(model_logits(model, _model_inputs(batch)).float(), dim=-1)
            confidence, prediction = probabilities.max(dim=-1)
            confidences.append(confidence.cpu())
            predictions.append(prediction.cpu())
        confidence, prediction = torch.cat(confidences), torch.cat(predictions)
        kept = self._kept(confidence, prediction)
        unlabelled = torch.tensor(self.unlabelled, dtype=torch.long)
        self.pseudo_labels.fill_(UNLABELLED)
        self.pseudo_labels[unlabelled[kept]] = prediction[kept]
        stats.update(pseudo_labels=int(kept.sum()), pseudo_share=float(kept.float().mean()),
                     mean_confidence=float(confidence.mean()))
        if self.config.restart:
            for name, tensor in _restartable(model):
                # Under train.distributed=fsdp the model's tensors are shards (DTensors) by now, the start whole:
                # cut it as they are cut, once, and keep only this rank's shard.
                self.start[name] = like(self.start[name], tensor)
                tensor.copy_(self.start[name])
        known = kept & (self.hidden != UNLABELLED) if self.hidden is not None else None
        if known is not None and bool(known.any()):  # rows truly without a label have no accuracy to report
            stats["pseudo_accuracy"] = float((prediction[known] == self.hidden[known]).float().mean())
        return stats

    def _kept(self, confidence: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """Which predictions become pseudo-labels: confident enough, and among the `per_class` most confident of
        their class when that is set."""
        kept = confidence >= self.config.confidence
        if self.config.per_class is not None:
            for label in prediction[kept].unique().tolist():
                members = torch.nonzero(kept & (prediction == label)).flatten()
                if len(members) > self.config.per_class:
                    order = confidence[members].argsort(descending=True)
                    kept[members[order[self.config.per_class:]]] = False
        return kept

    # ---- training and evaluation -------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        unlabelled = labels == UNLABELLED
        pseudo = self.pseudo_labels[batch[EXAMPLE_INDEX].cpu()].to(labels.device)  # the batch's rows only
        targets = torch.where(unlabelled, pseudo, labels)
        weights = torch.where(unlabelled, self.config.pseudo_weight, 1.0) * (targets != UNLABELLED)
        logits = model_logits(model, _model_inputs(noised_inputs(batch, self.config.input_noise))).float()
        per_row = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
        loss = (per_row * weights).sum() / weights.sum().clamp(min=1e-12)
        stats = {"pseudo_rows": float((unlabelled & (pseudo != UNLABELLED)).float().sum())}
        if self.config.consistency_weight and bool(unlabelled.any()):
            with torch.no_grad():  # the "weak" view: one more pass with its own dropout mask
                guess = F.softmax(model_logits(model, _model_inputs(batch)).float(), dim=-1)
            confidence, guessed = guess.max(dim=-1)
            used = unlabelled & (confidence >= self.config.p_cutoff)
            consistency = (F.cross_entropy(logits, guessed, reduction="none") * used).sum() / unlabelled.sum()
            loss = loss + self.config.consistency_weight * consistency
            stats.update(consistency=consistency.item(), consistency_rows=float(used.sum()))
        return loss, stats

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Cross-entropy and accuracy on the split's labelled rows (validation and test keep all their labels)."""
        return classification_metrics(model, (_labelled_only(batch) for batch in batches))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"pseudo_labels": self.pseudo_labels.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "pseudo_labels" in tensors:
            self.pseudo_labels = tensors["pseudo_labels"].clone()


def _restartable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What training changes: the trainable parameters, and the buffers (BatchNorm statistics)."""
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad] + list(
        model.named_buffers())


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without the example numbers (`model_logits` drops the labels)."""
    return {key: value for key, value in batch.items() if key != EXAMPLE_INDEX}


def _labelled_only(batch: dict[str, Any]) -> dict[str, Any]:
    keep = batch["labels"] != UNLABELLED
    return {key: value[keep] for key, value in _model_inputs(batch).items()}
