"""Knowledge distillation: train a (usually smaller) student to match a frozen, already fine-tuned teacher.

Classifiers (text or images) learn from the teacher's soft labels at temperature T (Hinton et al. 2015):

    L = α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))  +  (1 − α) · CE(y, z_s)  [+ α_cos · (1 − cos(h_s, h_t))]

Causal LMs are distilled token by token on the response tokens only (prompt and padding positions never count),
with the forward KL, the reverse KL or GKD's generalised JSD (`divergence`, `beta`; Agarwal et al. 2024); the hard
term is then the SFT cross-entropy. With `lmbda` > 0 a step is on-policy with that probability: the student answers
the batch's prompts itself and is distilled on its own responses (GKD), which removes the train/generate mismatch
of learning only from fixed responses. The optional cosine term aligns hidden states of mapped layers (DistilBERT,
Sanh et al. 2019): `layer_map` pairs student blocks with teacher blocks, by default the last with the last.

The teacher is `objective.teacher_model`: a run directory, an alias, a transformers directory or a `.gguf`; it must
share the student's outputs (the same vocabulary, or the same label count). `precompute_teacher: true` computes its
logits once and keeps them on disk (`deltatune.objectives.teacher_cache`), reused by later runs on the same data.
A student cut from the teacher's own blocks is `model.student` (`deltatune.models.student`).
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config.constraints import above, at_least, between, one_of
from deltatune.config.schema import ObjectiveConfig
from deltatune.data.noise import noised_inputs
from deltatune.errors import UserError
from deltatune.objectives import register_objective
from deltatune.objectives.base import ModelRole, Objective
from deltatune.objectives.causal_lm import next_token_loss, response_positions
from deltatune.objectives.losses import (
    DIVERGENCES,
    classification_distillation_loss,
    hidden_cosine_loss,
    token_divergence,
)
from deltatune.objectives.rollouts import generate_responses, prompts_of
from deltatune.objectives import cross_fit
from deltatune.objectives.teacher_cache import CacheChain, TeacherLogitCache, fingerprint

TEACHER_INDEX = "teacher_index"  # an example's row in the teacher-logit cache, when precomputed


@dataclass
class DistillConfig(ObjectiveConfig):
    """Names follow GKD/TRL where they exist (`temperature`, `beta`, `lmbda`) and DistilBERT's (`alpha_cos`)."""

    teacher_model: str | None = None
    temperature: float = field(default=2.0, metadata=above(0))
    alpha: float = field(default=0.5, metadata=between(0, 1))  # weight of the soft term; 1 - alpha on the labels
    divergence: str = field(default="forward_kl", metadata=one_of(*DIVERGENCES))
    beta: float = field(default=0.5, metadata=between(0, 1))  # generalised JSD's interpolation (divergence: jsd)
    lmbda: float = field(default=0.0, metadata=between(0, 1))  # share of on-policy steps (causal LMs)
    max_new_tokens: int = field(default=64, metadata=at_least(1))  # length of on-policy responses
    alpha_cos: float = field(default=0.0, metadata=at_least(0))  # weight of the hidden-state cosine term
    layer_map: dict[int, int] | None = None  # student block -> teacher block for the cosine term
    precompute_teacher: bool = False
    # Cross-fitted teachers (deltatune.objectives.cross_fit): run directories of the teacher's recipe, each trained
    # with one fold of the train split held out; a training row learns from the run that did not train on it
    teacher_folds: list[str] = field(default_factory=list)
    # Noisy Student: the student sees corrupted inputs (tokens hidden from attention, or a Cutout square on images,
    # deltatune/data/noise.py) and learns the teacher's outputs on the clean ones, a transfer set drawn afresh
    # every step
    input_noise: float = field(default=0.0, metadata=between(0, 1, high_open=True))


@dataclass(frozen=True)
class _OnPolicySampling:
    """What `generate_responses` reads: plain sampling from the student's own distribution."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@register_objective("distill")
class Distillation(Objective):
    description = ("knowledge distillation from a frozen teacher (soft labels with temperature; token-level KL/JSD); "
                   "judged by accuracy for classifiers")
    config_class = DistillConfig
    models = {"teacher": ModelRole()}
    example_keys = (TEACHER_INDEX,)
    reads_unlabelled = True  # a row without a label learns from the soft term alone
    metrics = ("loss", "accuracy", "perplexity", "divergence")
    main_metric = "loss"
    greater_is_better = False

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        super().__init__(config)
        self.labelled = False
        self.teacher: nn.Module | None = None
        self.cache: TeacherLogitCache | CacheChain | None = None
        self.layer_pairs: list[tuple[int, int]] = []
        self.coin_draws = 0  # on-policy coins drawn: the same sequence on every rank, continued on resume
        if self.config.precompute_teacher and (self.config.lmbda or self.config.alpha_cos):
            raise UserError("objective.precompute_teacher stores the teacher's logits only, but on-policy steps "
                            "(lmbda) and the cosine term (alpha_cos) need the live teacher; set one of them to 0")
        if self.config.teacher_folds and not self.config.precompute_teacher:
            raise UserError("objective.teacher_folds gives each training row the logits of the fold teacher that did "
                            "not train on it, which are computed once before training; set "
                            "objective.precompute_teacher=true")

    def attach_task(self, task: Any) -> None:
        """Classifiers are judged by accuracy; language models by their loss (perplexity) on the responses."""
        self.labelled = bool(task.labelled)
        if self.labelled:
            self.main_metric, self.greater_is_better = "accuracy", True
            if self.config.lmbda:
                raise UserError("objective.lmbda (on-policy distillation) has the student generate, which only a "
                                "causal language model does; set objective.lmbda=0 for a classifier")

    def setup(self, models: dict[str, nn.Module], policy_model: nn.Module, method: Any) -> None:
        self.teacher = models["teacher"]
        check_same_outputs(self.teacher, policy_model, f"objective.teacher_model={self.config.teacher_model}")
        self.layer_pairs = self._layer_pairs(policy_model)

    def _layer_pairs(self, student: nn.Module) -> list[tuple[int, int]]:
        """(student block, teacher block) pairs of the cosine term, checked against both models' block counts."""
        if not self.config.alpha_cos:
            return []
        counts = [getattr(getattr(model, "config", None), "num_hidden_layers", None)
                  for model in (student, self.teacher)]
        if None in counts:
            raise UserError("objective.alpha_cos needs transformers models that report their hidden states; set "
                            "objective.alpha_cos=0 for this model")
        widths = [getattr(model.config, "hidden_size", None) for model in (student, self.teacher)]
        if widths[0] != widths[1]:  # DistilBERT's cosine compares hidden states of one width
            raise UserError(f"objective.alpha_cos compares hidden states, but the student's are {widths[0]} wide and "
                            f"the teacher's {widths[1]}; set objective.alpha_cos=0 (or distil into a student of the "
                            "teacher's width)")
        pairs = sorted((self.config.layer_map or {counts[0] - 1: counts[1] - 1}).items())
        for student_block, teacher_block in pairs:
            if not (0 <= student_block < counts[0] and 0 <= teacher_block < counts[1]):
                raise UserError(f"objective.layer_map pairs student block {student_block} with teacher block "
                                f"{teacher_block}, but the student has {counts[0]} blocks and the teacher "
                                f"{counts[1]}; map blocks 0..{counts[0] - 1} to 0..{counts[1] - 1}")
        return pairs

    # ---- the teacher's logits, once --------------------------------------------------------------------------
    def precompute(self, splits: dict[str, list[dict]], batches_of: Any, batch_size: int) -> dict[str, torch.Tensor]:
        """With `precompute_teacher`, the teacher's logits of every example of every split, written once to a disk
        cache (reused when a complete one for the same teacher and examples exists); each example learns its row
        (`teacher_index`) and the teacher is released. The cache lives outside the run, so nothing is returned.
        With `teacher_folds` the training examples' rows come from the fold teachers (cross-fitting)."""
        if not self.config.precompute_teacher or self.teacher is None:
            return {}
        root = self.cache_dir or Path(tempfile.mkdtemp(prefix="deltatune-"))
        folds = self._fold_parts(splits.get("train", [])) if self.config.teacher_folds else []
        rest = [example for name, examples in splits.items() if not (folds and name == "train") for example in examples]
        # one fold run in memory at a time: each is loaded for its own part and released when that part is cached
        caches = [self._cached(self._fold_teacher(source), examples, root, batches_of, batch_size)
                  for source, examples in folds]
        caches.append(self._cached(self.teacher, rest, root, batches_of, batch_size))
        parts = [examples for _, examples in folds] + [rest]
        self.cache = CacheChain(caches, [len(examples) for examples in parts]) if folds else caches[0]
        for index, example in enumerate(example for examples in parts for example in examples):
            example[TEACHER_INDEX] = index
        self.teacher = None
        gc.collect()
        return {}

    def _cached(self, teacher: nn.Module, examples: list[dict], root: Path, batches_of: Any,
                batch_size: int) -> TeacherLogitCache:
        """`teacher`'s logits of `examples` in a disk cache named by both, computed unless a complete one exists."""
        cache = TeacherLogitCache(root / f"teacher-logits-{fingerprint(teacher, examples, batches_of)}")
        if not cache.complete:
            cache.write(self._teacher_rows(teacher, examples, batches_of, batch_size))
        return cache

    def _fold_teacher(self, source: str) -> nn.Module:
        teacher = self.load_run_model(source)
        check_same_outputs(teacher, self.teacher, f"{source} (objective.teacher_folds)", "teacher_model")
        return teacher

    def _fold_parts(self, training: list[dict]) -> list[tuple[str, list[dict]]]:
        """(fold run, the training examples it did not train on) for each of `teacher_folds`."""
        sources = self.config.teacher_folds
        rows = (self.split_rows or {}).get("train")
        if rows is None or len(rows) != len(training):
            raise UserError("objective.teacher_folds matches training examples with dataset rows, which this data "
                            "does not keep one for one (packing?); set data.packing=false or drop teacher_folds")
        owners = cross_fit.fold_owners(rows, [cross_fit.trained_rows(source) for source in sources], sources)
        return [(source, [example for example, owner in zip(training, owners) if owner == k])
                for k, source in enumerate(sources)]

    def _teacher_rows(self, teacher: nn.Module, examples: list[dict], batches_of: Any,
                      batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(examples), batch_size):
            batch = batches_of(examples[start:start + batch_size])
            logits, _ = self._outputs(teacher, batch)
            if self.labelled:
                yield from logits
            else:
                mask = response_positions(batch["labels"])
                yield from (logits[row, :-1][mask[row]] for row in range(len(logits)))

    # ---- forward passes --------------------------------------------------------------------------------------
    def _outputs(self, model: nn.Module, batch: dict[str, Any],
                 hidden: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(logits, hidden states or None) of `model`; a language model's cut to one position per input token (a
        method that prepends virtual tokens adds leading positions)."""
        inputs = {key: value for key, value in batch.items() if key not in ("labels", TEACHER_INDEX)}
        options = {"output_hidden_states": True} if hidden else {}
        if not self.labelled:
            options["use_cache"] = False  # packed batches need it (see objectives.causal_lm.lm_logits)
        output = model(**inputs, **options)
        logits = output if isinstance(output, torch.Tensor) else output.logits
        states = getattr(output, "hidden_states", None) if hidden else None
        if hidden and states is None:
            raise UserError("objective.alpha_cos needs models that return hidden states; set objective.alpha_cos=0")
        if not self.labelled:
            length = batch["input_ids"].shape[1]
            logits = logits[:, -length:]
            states = tuple(state[:, -length:] for state in states) if states is not None else None
        return logits, states

    def _teacher_outputs(self, batch: dict[str, Any], hidden: bool = False):
        """The teacher's logits (from the cache when precomputed: rows already at the compared positions)."""
        if self.cache is not None and TEACHER_INDEX in batch:
            rows = self.cache.rows(batch[TEACHER_INDEX].tolist())
            device = batch["labels"].device
            return (torch.stack(rows) if self.labelled else torch.cat(rows)).to(device), None
        if self.teacher is None:
            return None, None
        with torch.no_grad():
            return self._outputs(self.teacher, batch, hidden)

    def _compared(self, student: torch.Tensor, teacher: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher logits at the positions distillation compares: every row of a classifier, the
        positions predicting a response token of a language model (the teacher's already cut when cached)."""
        if not self.labelled:
            mask = response_positions(labels)
            student = student[:, :-1][mask]
            teacher = teacher if teacher.dim() == 2 else teacher[:, :-1][mask]
        if student.shape != teacher.shape:
            raise UserError(f"the teacher ({self.config.teacher_model}) gives {teacher.shape[-1]} outputs where the "
                            f"student gives {student.shape[-1]}; a teacher must share the student's vocabulary "
                            f"(tokenizer) or label count")
        return student, teacher

    def loss_units(self, batch: dict[str, Any]) -> int:
        """Rows for a classifier; for a language model its terms are means over the response positions."""
        return super().loss_units(batch) if self.labelled else int(response_positions(batch["labels"]).sum())

    # ---- training and evaluation -----------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        on_policy = bool(self.config.lmbda) and self._coin() < self.config.lmbda
        if on_policy:
            batch = self._on_policy(model, batch)
        hidden = bool(self.layer_pairs)
        student, student_states = self._outputs(model, noised_inputs(batch, self.config.input_noise), hidden)
        teacher, teacher_states = self._teacher_outputs(batch, hidden)  # on the clean inputs
        config, labels = self.config, batch["labels"]
        compared_student, compared_teacher = self._compared(student, teacher, labels)
        if self.labelled:
            loss = classification_distillation_loss(compared_student, compared_teacher, labels, config.temperature,
                                                     config.alpha, config.divergence, config.beta)
            labelled = labels >= 0  # a batch of only unlabelled rows has no accuracy to report
            stats = {"accuracy": float((student.argmax(-1) == labels)[labelled].float().mean())} \
                if labelled.any() else {}
        else:
            soft = config.temperature ** 2 * token_divergence(
                compared_student, compared_teacher, torch.ones_like(compared_student[:, 0], dtype=torch.bool),
                config.divergence, config.beta, config.temperature)
            if on_policy:  # the student's own samples are no labels: GKD learns only the teacher's view of them
                loss, stats = soft, {"soft": soft.item()}
            else:
                hard = next_token_loss(student, labels) if config.alpha < 1 else soft.new_zeros(())
                loss = config.alpha * soft + (1 - config.alpha) * hard
                stats = {"soft": soft.item(), "hard": hard.item()}
        if hidden:
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            cosine = sum(hidden_cosine_loss(student_states[s + 1], teacher_states[t + 1], mask)
                         for s, t in self.layer_pairs) / len(self.layer_pairs)
            loss, stats["cosine"] = loss + config.alpha_cos * cosine, cosine.item()
        return loss, stats

    def _coin(self) -> float:
        """The next on-policy coin in [0, 1): from its own seeded stream, not torch's (each rank reseeds that for its
        dropout), so every rank takes an on-policy step together, as FSDP's shared generation needs."""
        self.coin_draws += 1
        return float(np.random.default_rng([1_000_003, self.coin_draws]).random())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"coin_draws": torch.tensor(self.coin_draws)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.coin_draws = int(tensors.get("coin_draws", 0))

    def _on_policy(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's prompts with responses the student samples now (GKD's on-policy data)."""
        if "position_ids" in batch:
            raise UserError("objective.lmbda (on-policy distillation) needs one example per row; set "
                            "data.packing=false")
        from deltatune.data.text import pad_token_id

        was_training = model.training
        model.eval()
        try:
            prompts = prompts_of(batch, pad_token_id(self.processor))
            rollout = generate_responses(model, prompts, self.processor,
                                         _OnPolicySampling(self.config.max_new_tokens))
        finally:
            if was_training:
                from deltatune.training.loop import set_train_mode  # frozen BatchNorms stay in eval mode

                set_train_mode(model)
        return rollout.inputs

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """The student's own metrics (accuracy, or loss and perplexity on the responses) and, while the teacher
        or its cache is at hand, the mean divergence to the teacher at temperature 1 (per row or per token)."""
        cross_entropy, correct, count, divergence, compared_items = 0.0, 0, 0, 0.0, 0
        for batch in batches:
            student, _ = self._outputs(model, batch)
            labels = batch["labels"]
            teacher, _ = self._teacher_outputs(batch)
            if self.labelled:
                labelled = labels >= 0
                cross_entropy += float(F.cross_entropy(student[labelled].float(), labels[labelled], reduction="sum"))
                correct += int((student.argmax(-1) == labels)[labelled].sum())
                items = int(labelled.sum())
            else:
                cross_entropy += float(next_token_loss(student, labels, reduction="sum"))
                items = int(response_positions(labels).sum())
            if teacher is not None:
                compared = self._compared(student, teacher, labels)
                every = torch.ones_like(compared[0][:, 0], dtype=torch.bool)
                divergence += float(token_divergence(*compared, every, self.config.divergence, self.config.beta)
                                    ) * len(compared[0])
                compared_items += len(compared[0])  # unlabelled rows too: the divergence needs no label
            count += items
        if count == 0:
            return {}
        metrics = {"loss": cross_entropy / count}
        if self.labelled:
            metrics["accuracy"] = correct / count
        else:
            metrics["perplexity"] = float(torch.exp(torch.tensor(min(metrics["loss"], 50.0))))
        if self.teacher is not None or self.cache is not None:
            metrics["divergence"] = divergence / max(1, compared_items)
        return metrics


def output_size(model: nn.Module) -> int | None:
    """How many outputs a model's logits have, as its config says: a language model's vocabulary (its output
    embedding's rows), a classifier's label count; None when it does not say."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "weight"):
        return int(embeddings.weight.shape[0])
    return getattr(getattr(model, "config", None), "num_labels", None)


def check_same_outputs(teacher: nn.Module, student: nn.Module, source: str | None,
                       other: str = "the student") -> None:
    """A one-line error when teacher and student (or `other`) say they have different vocabularies or label
    counts."""
    sizes = output_size(teacher), output_size(student)
    if None not in sizes and sizes[0] != sizes[1]:
        raise UserError(f"the teacher {source} has {sizes[0]} outputs but {other} has {sizes[1]}; a teacher must "
                        f"share the student's vocabulary (tokenizer) or label count")
