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
BASE (that view when the method allows it, otherwise a frozen copy of `model.name` loaded again).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from deltatune.config.schema import ObjectiveConfig

POLICY_DISABLED = "policy-disabled"  # the policy with its adapters disabled (deltatune.adapters.disabled)
BASE = "base"  # POLICY_DISABLED when the method can disable itself, else a frozen copy of model.name
LOWER_IS_BETTER = ("loss", "perplexity")  # metrics (besides an objective's main one) where smaller is better


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
    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    models: ClassVar[dict[str, ModelRole]] = {}
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

    def setup(self, models: dict[str, nn.Module], policy_model: nn.Module, method: Any) -> None:
        """Called once before training (and before evaluating a saved run) with the declared extra models by role,
        frozen and in eval mode on the run's device, the policy (the model being trained) and its method. Keeps the
        models by default; override to precompute what the objective needs from them."""
        self.extra_models = models

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar to minimise for one micro-batch, and cheap statistics to log with it."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Metrics over a whole split (the model is already in eval mode and on the right device)."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate()")

    def higher_is_better(self, metric: str) -> bool:
        """Whether a larger `metric` is a better model: `greater_is_better` for the main metric, and for the others
        every metric but a loss or perplexity (override when an objective reports other lower-is-better ones)."""
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


def model_logits(model: nn.Module, batch: dict[str, Any], **options: Any) -> torch.Tensor:
    """Logits from a transformers model (an output object) or a plain module returning a tensor."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    output = model(**inputs, **options)
    return output if isinstance(output, torch.Tensor) else output.logits
