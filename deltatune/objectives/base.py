"""What an objective gives the training loop: a loss for a batch and metrics for a dataset; what it needs from the
run: its options (the `objective:` config section, parsed into its `config_class`) and extra models by role.

Extra models (a DPO reference, a PPO reward model, a distillation teacher) are declared, never loaded, here:

    @register_objective("dpo")
    class DPO(Objective):
        config_class = DPOConfig            # has a field `reference_model: str | None = None`
        models = {"reference": ModelRole(default=BASE)}

        def setup(self, models, policy_model, method):
            self.reference = models["reference"]   # frozen, eval mode, on the run's device

The runner resolves each role's source (the field `<role>_model`, else the role's `default`), loads it and calls
`setup` before training; the training loop never sees roles. A source is what `model.name` accepts (an alias, a
transformers directory, a `.gguf` file, `package.module:function`), a finished run directory, or one of two names
for the policy's own base: POLICY_DISABLED (the policy run with its adapters switched off, no second copy in
memory; a method that trains weights outside adapter layers cannot do that and is refused before training) and
BASE (that view when the method allows it, otherwise a frozen copy of `model.name` loaded again). A policy that
starts from `model.init_from` has that run's model as its BASE (a frozen copy: its start, not the model before it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from deltatune.config.schema import ObjectiveConfig

POLICY_DISABLED = "policy-disabled"  # the policy with its adapters disabled (deltatune.adapters.disabled)
BASE = "base"  # POLICY_DISABLED when the method can disable itself, else a frozen copy of model.name
LOWER_IS_BETTER = ("loss", "perplexity", "divergence", "kl")  # metrics (besides the main one) where smaller is better


@dataclass(frozen=True)
class ModelRole:
    """One extra model an objective needs.

    `default` is the source used when the config leaves `objective.<role>_model` unset; None makes the role required
    (a one-line error before training names the key to set). `task` is the registered task a source other than a run
    directory is loaded for ("auto": the run's own task), with `num_labels` outputs for a labelled task (a reward
    model: task "classification", num_labels 1).
    """

    default: str | None = None
    task: str = "auto"
    num_labels: int | None = None
    # A reward: the role is handed over as a scorer, `scorer(prompts, responses) -> (B,) scores` (see
    # `deltatune.objectives.scorers`), built from a reward-model run, a one-output sequence-classifier directory, or
    # `package.module:function` naming a Python reward function with that signature.
    scores_text: bool = False

    @staticmethod
    def config_key(role: str) -> str:
        """The objective config field naming the role's source, e.g. `reward_model`."""
        return f"{role}_model"


class Objective:
    """Subclass, implement `loss` and `evaluate`, and register with `@register_objective(name)`.

    Options live in `config_class` (a dataclass subclassing ObjectiveConfig, strictly parsed from `objective:`);
    `models` declares extra models by role, each with a `<role>_model: str | None` field in `config_class`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line for `deltatune objectives`
    # The registered task whose data this objective reads ("preference" for DPO): with model.task "auto", naming the
    # objective is enough to train on that task's rows. None: whatever task the model was built for.
    task: ClassVar[str | None] = None
    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    models: ClassVar[dict[str, ModelRole]] = {}
    processor: Any = None  # the policy's tokenizer (or image processor), set by the runner before `setup`
    label_names: list[str] | None = None  # the data's class names (when it has them), set with `processor`
    # The split `evaluate` is scoring ("validation", "test"; None for other data), set by the loop's evaluate() just
    # before it calls: an objective that draws its own evaluation rows (episodes) needs to know whose.
    evaluating: str | None = None
    # Loads another finished run's model, frozen, in eval mode, on the run's device (distillation's fold teachers);
    # set with `processor`, so objectives never import the runner that sits above them.
    load_run_model: Callable[[str], nn.Module] | None = None
    # Where the objective may keep what it computes once and later runs can reuse (a distillation teacher's
    # logits): `<output_dir>/cache/`, set by the runner before `precompute`; None outside training.
    cache_dir: Path | None = None
    # The dataset rows each split's examples were encoded from, in example order (the run's saved splits), set with
    # `cache_dir`; lets `precompute` match examples with what another run trained on (cross-fitted teachers).
    split_rows: dict[str, list[int]] | None = None
    # Keys of per-example values `precompute` stores in the examples, which batches must then carry (the runner
    # wraps the collator so each becomes a tensor with one row per example).
    example_keys: ClassVar[tuple[str, ...]] = ()
    main_metric: ClassVar[str] = "loss"
    greater_is_better: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ("loss",)  # the keys `evaluate` reports; train.metric must be one of them

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A role without its config field could never be pointed anywhere: refuse the class where it is written.
        super().__init_subclass__(**kwargs)
        fields = {item.name for item in dataclasses.fields(cls.config_class)}
        missing = [ModelRole.config_key(role) for role in cls.models if ModelRole.config_key(role) not in fields]
        if missing:
            raise TypeError(f"{cls.__name__} declares model roles whose fields {missing} its config_class "
                            f"{cls.config_class.__name__} lacks; add them as `str | None = None`")

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()

    def attach_task(self, task: Any) -> None:
        """Called once when the objective is built, with the run's task (`deltatune.tasks.Task`): an objective that
        serves several kinds of task (distillation of a classifier or of a language model) picks its headline
        metric here from what the task is (`task.labelled`), never from its name. Nothing by default."""

    def setup(self, models: dict[str, nn.Module], policy_model: nn.Module, method: Any) -> None:
        """Called once before training (and before evaluating a saved run) with the declared extra models by role,
        frozen and in eval mode on the run's device, the policy (the model being trained) and its method. Keeps the
        models by default; override to precompute what the objective needs from them."""
        self.extra_models = models

    # ---- an objective with a rollout phase (PPO) --------------------------------------------------------------
    # With `rollout_size` set, the loop draws that many training examples at a time and hands them to `rollout`
    # instead of to `loss` directly: the objective generates, scores and returns the optimizer steps to take on what
    # it collected (each a list of micro-batches for `loss`). The loop takes them one by one, logging, evaluating and
    # checkpointing between them as usual; a checkpoint saves the steps not yet taken, so a resumed run continues
    # inside a rollout exactly where it stopped.
    rollout_size: int | None = None

    def rollout(self, model: nn.Module, batch: dict[str, Any], batch_size: int,
                accumulation: int) -> list[list[dict[str, torch.Tensor]]]:
        """The optimizer steps to take on a rollout generated from `batch` (the model is in eval mode, on device):
        micro-batches of `batch_size` rows, `accumulation` of them per step."""
        raise NotImplementedError(f"{type(self).__name__} sets rollout_size, so it must implement rollout()")

    def steps_per_rollout(self, examples: int, batch_size: int, accumulation: int) -> int:
        """How many optimizer steps `rollout` returns for a draw of `examples` examples (to plan the schedule)."""
        raise NotImplementedError(f"{type(self).__name__} sets rollout_size, so it must implement steps_per_rollout()")

    # ---- an objective that chooses each epoch's training examples (self-training's rounds) ----------------------
    # Before the first step of every epoch the loop calls `start_epoch` (never again when a run resumes inside the
    # epoch: what it decided must be in `state_tensors`), then draws the epoch's micro-batches from the examples
    # `epoch_examples` names, cycling them to fill `epoch_plan`'s count.
    reads_unlabelled: ClassVar[bool] = False  # training rows without a label (label -100) are welcome
    early_stopping_patience: int | None = None  # used when train.early_stopping_patience is unset

    def epoch_plan(self, num_examples: int, batch_size: int) -> tuple[int, float] | None:
        """(micro-batches per epoch, epochs) when the objective sets them rather than one pass over the training
        examples per epoch for train.epochs epochs; None by default."""
        return None

    def start_epoch(self, epoch: int, model: nn.Module, batches_of: Callable[[list[int]], dict[str, Any]],
                    batch_size: int) -> dict[str, float]:
        """Called before the epoch's first step, the model in eval mode without gradients; `batches_of(indices)`
        collates training examples onto the run's device. Returns statistics to log as a "round" record ({}:
        nothing to log). Nothing by default."""
        return {}

    def epoch_examples(self) -> list[int] | None:
        """Indices of the training examples the current epoch draws from; None: all of them."""
        return None

    # ---- trainable state of the objective's own (a PPO value head) ---------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the objective trains beside the model's (a value head): optimised, clipped and checkpointed
        with them, but not part of the run's saved model. None by default."""
        return []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint must hold to continue this objective exactly (its trainable parameters, an
        adaptive KL coefficient); restored by `load_state_tensors`. Nothing by default."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `state_tensors`."""

    def precompute(self, splits: dict[str, list[dict]], batches_of: Callable[[list[dict]], dict[str, Any]],
                   batch_size: int) -> dict[str, torch.Tensor]:
        """Called once after `setup`, before training, with every split's examples (by split name) and a function that
        turns a list of examples into a batch on the run's device. An objective may store per-example values it wants
        computed only once into the examples (the collator batches them) and release models it no longer needs;
        what it returns (tensors by split) is saved with the run. Nothing by default."""
        return {}

    def attach_examples(self, splits: dict[str, list[dict]], batches_of: Callable[[list[dict]], dict[str, Any]]) -> None:
        """Called before a finished run is evaluated (`deltatune eval`), with its examples by split and the collating
        function, for an objective whose evaluation draws its own batches from them (meta-learning's episodes);
        training hands them to `precompute` instead. Nothing by default."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar to minimise for one micro-batch, and cheap statistics to log with it."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Metrics over a whole split (the model is already in eval mode and on the right device)."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate()")

    def higher_is_better(self, metric: str) -> bool:
        """Whether a larger `metric` is a better model: `greater_is_better` for the main metric, and for the others
        every metric but a loss, a perplexity or a divergence from a teacher or reference (LOWER_IS_BETTER)."""
        if metric == self.main_metric:
            return self.greater_is_better
        return metric not in LOWER_IS_BETTER

    def tokens_in(self, batch: dict[str, Any]) -> int:
        """How many input tokens (or examples, for images) a batch carries, for throughput figures; a nested batch
        (a preference pair's chosen and rejected halves) counts the tokens of every half."""
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
        halves = [value for value in batch.values() if isinstance(value, dict)]
        if halves:
            return sum(self.tokens_in(half) for half in halves)
        return len(next(iter(batch.values())))

    def loss_units(self, batch: dict[str, Any]) -> int:
        """How many units the loss of `batch` is a mean over: its rows by default; an objective whose loss is a mean
        over tokens counts those. Ranks weight their shares of a micro-batch by it, so their weighted mean is the
        whole micro-batch's loss, as one process computes it."""
        halves = [value for value in batch.values() if isinstance(value, dict)]
        first = halves[0] if halves else batch
        return len(next(value for value in first.values() if hasattr(value, "__len__")))


def model_logits(model: nn.Module, batch: dict[str, Any], **options: Any) -> torch.Tensor:
    """Logits from a transformers model (an output object) or a plain module returning a tensor."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    output = model(**inputs, **options)
    return output if isinstance(output, torch.Tensor) else output.logits


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in `model` to 0. Objectives that compare the policy's log-probabilities with a
    reference's or with its own earlier ones (DPO, PPO) need both computed by the same function: with dropout on, a
    policy equal to its reference would still show a random log-ratio, so TRL disables it by default too."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        elif callable(getattr(type(module), "disable_dropout", None)):  # functional dropout: LoRA's on its input
            module.disable_dropout()
