"""Meta-learning a starting point for fast adaptation: Reptile or first-order MAML over N-way K-shot episodes, on the
trainable parameters of whatever method the run applies (a head, LoRA, prompts, adapters, or every weight).

The classes of the training data are split into a meta-train pool and a meta-test pool that never meet
(`deltatune.data.episodes`); the split is saved with the run (`precomputed/`). Every optimizer step of the one
training loop is one episode drawn by this objective from the meta-train pool's training rows: the trainable
parameters θ are adapted by `inner_steps` plain SGD steps on the support set, and the loop's optimizer then moves θ
along Reptile's direction θ − φ or first-order MAML's query gradient ∇L_Q(φ) (`objectives/losses/meta_learning.py`:
the loss handed back is a surrogate whose gradient is that direction). Under torchrun every rank draws its own
episode, so the all-reduced gradient is the mean direction of a meta-batch of one episode per rank. The loop's own
micro-batch only paces the steps; its rows are not used. Episode label i is read from output unit i of the model's
head, whatever class it stands for in that episode.

Evaluation is episode accuracy on `validation_episodes` fixed episodes drawn from the rows of the split evaluated
(validation: for choosing the best step; test: the same measure on rows no step was chosen by), of the meta-train
classes with enough rows for an episode: unseen examples of seen classes. How well the start adapts to new classes is
`deltatune meta-eval`'s question, asked on the meta-test pool only.

With SGD (`train.optimizer: sgd`, momentum 0) the loop's outer step is exactly Reptile's θ + ε (φ − θ) only when
nothing else touches the gradient or the step: `train.max_grad_norm` (1.0 by default) clips the direction θ − φ to
that norm, `train.weight_decay` (0.01 by default) adds λθ to it, and warm-up or a schedule other than constant vary
ε. Set `max_grad_norm: null`, `weight_decay: 0`, `schedule: constant` and `warmup_steps: 0` for the paper's update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from deltatune import distributed
from deltatune.config.constraints import above, at_least, one_of
from deltatune.config.schema import ObjectiveConfig
from deltatune.data.episodes import (
    Episode,
    check_episode_shape,
    examples_by_class,
    pools_by_task,
    sample_episode,
    split_classes,
)
from deltatune.errors import UserError
from deltatune.objectives import register_objective
from deltatune.objectives.base import Objective
from deltatune.objectives.losses.meta_learning import (
    adapt,
    as_surrogate_loss,
    first_order_maml_direction,
    reptile_direction,
)

EVALUATED_SPLITS = {"validation": 1, "test": 3}  # split -> its episode stream (0 trains, 2 is meta-eval's)
Pools = dict[int, dict[int, list[int]]]  # task -> class -> row indices


@dataclass
class MetaLearningConfig(ObjectiveConfig):
    algorithm: str = field(default="reptile", metadata=one_of("reptile", "fomaml"))
    ways: int = field(default=5, metadata=at_least(2))
    shots: int = field(default=5, metadata=at_least(1))
    queries: int = field(default=5, metadata=at_least(1))  # per class; fomaml's outer gradient is taken on them
    inner_steps: int = field(default=5, metadata=at_least(1))
    inner_lr: float = field(default=1e-2, metadata=above(0))
    # The meta-test pool: these classes (class ids, or the data's class names), or, when empty, `meta_test_count` of
    # them drawn with `seed`.
    meta_test_classes: list[int | str] = field(default_factory=list)
    meta_test_count: int = field(default=5, metadata=at_least(1))
    # With a task column (data.columns.task) an episode is N classes of one task and the pools are tasks: these
    # meta-test tasks (the column's values), or, when empty, `meta_test_count` of them.
    meta_test_tasks: list[int | str] = field(default_factory=list)
    validation_episodes: int = field(default=20, metadata=at_least(1))
    seed: int = 0


def episode_pool(labels: list[int], meta_train: list[int], config: MetaLearningConfig) -> dict[int, list[int]]:
    """The meta-train classes with enough of these rows for an episode's support and query sets; evaluation only
    measures, so a class with too few rows is left out of it rather than refused."""
    return {label: rows for label, rows in examples_by_class(labels, meta_train).items()
            if len(rows) >= config.shots + config.queries}


def validation_pool(labels: list[int], meta_train: list[int], config: MetaLearningConfig) -> dict[int, list[int]]:
    """`episode_pool` of the validation rows. Empty without a validation split; a UserError when rows exist but
    fewer than `ways` classes can fill an episode (the run could not choose its best step)."""
    if not labels:
        return {}
    pool = episode_pool(labels, meta_train, config)
    if len(pool) < config.ways:
        raise UserError(f"only {len(pool)} meta-train classes have {config.shots} + {config.queries} validation rows "
                        f"for {config.ways}-way episodes; raise data.split.validation or lower objective.shots or "
                        "objective.queries")
    return pool


@register_objective("meta_learning")
class MetaLearning(Objective):
    description = "Reptile / first-order MAML: a start that adapts to new classes from a few examples"
    config_class = MetaLearningConfig
    main_metric = "episode_accuracy"
    greater_is_better = True
    metrics = ("episode_accuracy", "loss")  # loss: the query cross-entropy after adaptation

    def __init__(self, config: MetaLearningConfig | None = None) -> None:
        super().__init__(config)
        self.episodes_drawn = 0
        self.train_examples: list[dict] = []
        # Episode pools: task -> class -> row indices; one task (key 0) when episodes come from the classes alone.
        self.train_pools: Pools = {}
        self.task_names: list[str] | None = None  # the tasks (sorted `task` values) when rows carry a task column
        self.validation_examples: list[dict] = []
        self.validation_pools: Pools = {}
        # The test rows' episode pools; empty when they cannot fill an episode (no test metrics then).
        self.test_examples: list[dict] = []
        self.test_pools: Pools = {}
        self.batches_of: Callable[[list[dict]], dict[str, Any]] | None = None
        self.pools: dict[str, list[int]] = {}

    def attach_task(self, task: Any) -> None:
        if not task.labelled or "label" not in task.roles:  # reward-pairs is labelled (its scalar head), not classes
            raise UserError(f"objective 'meta_learning' draws episodes of classes, and task {task.name!r} has none; "
                            "use it with classification or image-classification")

    def precompute(self, splits: dict[str, list[dict]], batches_of: Any, batch_size: int) -> dict[str, torch.Tensor]:
        """The pools, saved with the run (`precomputed/meta_{train,test}_classes.safetensors`). Meta-eval draws from
        the meta-test pool's rows in every split: a pool it would refuse is refused here, when training starts, not
        after a whole meta-training run (nor when a finished run is evaluated)."""
        self.attach_examples(splits, batches_of)
        meta_test = self.pools["meta_test_tasks" if self.task_names is not None else "meta_test_classes"]
        self.meta_test_pools([example for examples in splits.values() for example in examples], meta_test)
        return {name: torch.tensor(classes) for name, classes in self.pools.items()}

    def attach_examples(self, splits: dict[str, list[dict]], batches_of: Any) -> None:
        """Split the classes (or, when rows carry a task, the tasks) into the two pools, check that episodes fit
        them, and keep the rows to draw from."""
        self.train_examples = splits.get("train", [])
        self.validation_examples = splits.get("validation", [])
        self.test_examples = splits.get("test", [])
        self.batches_of = batches_of
        if any("task" in example for examples in splits.values() for example in examples[:1]):
            self._pools_of_tasks(splits)
        else:
            self._pools_of_classes()

    def _pools_of_classes(self) -> None:
        """Classes as the unit of meta-training: the meta-test pool is `meta_test_classes` or `meta_test_count` of
        them."""
        config = self.config
        if config.meta_test_tasks:
            raise UserError("objective.meta_test_tasks needs rows with a task: set data.columns.task to the column "
                            "naming each row's task, or list meta-test classes in objective.meta_test_classes")
        labels = [int(example["labels"]) for example in self.train_examples]
        meta_test = [self.class_id(value) for value in config.meta_test_classes] or config.meta_test_count
        meta_train, meta_test_classes = split_classes(labels, meta_test, config.seed)
        self.train_pools = {0: examples_by_class(labels, meta_train)}
        check_episode_shape(self.train_pools[0], config.ways, config.shots, config.queries, "meta-train")
        validation_labels = [int(example["labels"]) for example in self.validation_examples]
        pool = validation_pool(validation_labels, meta_train, config)
        self.validation_pools = {0: pool} if pool else {}
        test_pool = episode_pool([int(example["labels"]) for example in self.test_examples], meta_train, config)
        self.test_pools = {0: test_pool} if len(test_pool) >= config.ways else {}
        self.pools = {"meta_train_classes": meta_train, "meta_test_classes": meta_test_classes}

    def _pools_of_tasks(self, splits: dict[str, list[dict]]) -> None:
        """Tasks as the unit of meta-training: an episode is N classes of one task (its rows' labels), the meta-test
        pool is whole tasks meta-training never draws from (`meta_test_tasks` or `meta_test_count` of them)."""
        config = self.config
        if config.meta_test_classes:
            raise UserError("rows carry a task (data.columns.task), so the meta-test pool is tasks: list them in "
                            "objective.meta_test_tasks instead of objective.meta_test_classes")
        self.task_names = sorted({str(example["task"]) for examples in splits.values() for example in examples})
        meta_test = [self.task_id(value) for value in config.meta_test_tasks] or config.meta_test_count
        meta_train, meta_test_tasks = split_classes(self.task_ids(self.train_examples), meta_test, config.seed, "task")
        self.train_pools = self.task_pools(self.train_examples, meta_train)
        if not self.train_pools:
            raise UserError(f"no meta-train task has {config.ways} classes with {config.shots} + {config.queries} "
                            "training rows each; lower objective.ways, shots or queries")
        self.validation_pools = self.task_pools(self.validation_examples, meta_train)
        if self.validation_examples and not self.validation_pools:
            raise UserError(f"no meta-train task has {config.ways} classes with {config.shots} + {config.queries} "
                            "validation rows each for validation episodes; raise data.split.validation or lower "
                            "objective.shots or objective.queries")
        self.test_pools = self.task_pools(self.test_examples, meta_train)
        self.pools = {"meta_train_tasks": meta_train, "meta_test_tasks": meta_test_tasks}

    def task_ids(self, examples: list[dict]) -> list[int]:
        assert self.task_names is not None
        index = {name: number for number, name in enumerate(self.task_names)}
        return [index[str(example["task"])] for example in examples]

    def task_pools(self, examples: list[dict], tasks: list[int]) -> dict[int, dict[int, list[int]]]:
        """The listed tasks' rows of `examples` by class, for tasks that can fill an episode."""
        labels = [int(example["labels"]) for example in examples]
        config = self.config
        return pools_by_task(self.task_ids(examples), labels, tasks, config.ways, config.shots, config.queries)

    def task_id(self, name: int | str) -> int:
        assert self.task_names is not None
        if str(name) not in self.task_names:
            raise UserError(f"objective.meta_test_tasks names task {name!r}, which the data does not have; its tasks "
                            f"are {', '.join(self.task_names)}")
        return self.task_names.index(str(name))

    def meta_test_pools(self, examples: list[dict], meta_test: list[int]) -> dict[int, dict[int, list[int]]]:
        """Episode pools of the meta-test classes (or tasks) over `examples` (meta-eval draws from every split)."""
        config = self.config
        if self.task_names is None:
            pool = examples_by_class([int(example["labels"]) for example in examples], meta_test)
            check_episode_shape(pool, config.ways, config.shots, config.queries, "meta-test")
            return {0: pool}
        pools = self.task_pools(examples, meta_test)
        if not pools:
            raise UserError(f"no meta-test task has {config.ways} classes with {config.shots} + {config.queries} rows "
                            "each; lower objective.ways, shots or queries")
        return pools

    def class_id(self, value: int | str) -> int:
        """A meta-test class as its id: ids pass through, names are looked up in the data's class names."""
        if isinstance(value, int):
            return value
        names = list(self.label_names or [])
        if value not in names:
            listed = ", ".join(names) if names else "none (the labels are integers; give class ids)"
            raise UserError(f"objective.meta_test_classes names class {value!r}, which the data does not have; its "
                            f"classes are {listed}")
        return names.index(value)

    # ---- one episode ------------------------------------------------------------------------------------------
    def episode_batches(self, examples: list[dict], episode: Episode) -> tuple[dict[str, Any], dict[str, Any]]:
        """The support and query sets as batches on the run's device, labelled with episode labels."""
        assert self.batches_of is not None, "precompute() runs before the first step"
        support = self.batches_of([examples[i] for i in episode.support])
        query = self.batches_of([examples[i] for i in episode.query])
        support["labels"] = torch.tensor(episode.support_labels, device=support["labels"].device)
        query["labels"] = torch.tensor(episode.query_labels, device=query["labels"].device)
        return support, query

    def loss_of(self, model: nn.Module) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]:
        """loss(parameters, batch): cross-entropy of the model run with `parameters`, over the first `ways` outputs."""
        ways = self.config.ways

        def loss(parameters: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
            return F.cross_entropy(self._logits(model, parameters, batch)[:, :ways].float(), batch["labels"])

        return loss

    @staticmethod
    def _logits(model: nn.Module, parameters: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        output = functional_call(model, parameters, args=(), kwargs=inputs)
        return output if isinstance(output, torch.Tensor) else output.logits

    def adapted(self, model: nn.Module, support: dict[str, Any]) -> tuple[dict, dict]:
        """(θ, φ): the trainable parameters and their adaptation to the support set."""
        start = {name: param for name, param in model.named_parameters() if param.requires_grad}
        return start, adapt(start, self.loss_of(model), [support] * self.config.inner_steps, self.config.inner_lr)

    def query_scores(self, model: nn.Module, adapted: dict, query: dict[str, Any]) -> tuple[float, float]:
        """(loss, accuracy) of the adapted parameters on the query set."""
        with torch.no_grad():
            logits = self._logits(model, adapted, query)[:, : self.config.ways].float()
            loss = F.cross_entropy(logits, query["labels"])
            return float(loss), float((logits.argmax(-1) == query["labels"]).float().mean())

    def next_episode(self, pools: dict[int, dict[int, list[int]]], stream: int, number: int,
                     queries: int | None = None) -> Episode:
        """Episode `number` of a seeded stream (0: training, a rank's own; 1: validation and 3: test, the same every
        time; 2: meta-eval): with tasks, one task drawn first, then N of its classes; `queries` per class (at most) in
        place of the run's `objective.queries`."""
        generator = np.random.default_rng([self.config.seed, stream, number])
        if self.task_names is not None:
            pool = pools[sorted(pools)[int(generator.integers(len(pools)))]]
        else:
            (pool,) = pools.values()
        per_class = self.config.queries if queries is None else queries
        return sample_episode(pool, self.config.ways, self.config.shots, per_class, generator)

    # ---- the loop's hooks -------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        # number the episodes across ranks so every rank draws a different one and a resumed run draws the same
        number = self.episodes_drawn * distributed.world_size() + distributed.rank()
        self.episodes_drawn += 1
        episode = self.next_episode(self.train_pools, 0, number)
        support, query = self.episode_batches(self.train_examples, episode)
        start, adapted = self.adapted(model, support)
        if self.config.algorithm == "reptile":
            direction = reptile_direction(start, adapted)
        else:
            direction = first_order_maml_direction(adapted, self.loss_of(model), query)
        query_loss, query_accuracy = self.query_scores(model, adapted, query)
        return as_surrogate_loss(start, direction), {"query_loss": query_loss, "query_accuracy": query_accuracy}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Mean query accuracy and loss after adaptation over `validation_episodes` fixed episodes of the split the
        batches come from (`self.evaluating`); {} when its rows cannot fill an episode."""
        split = self.evaluating  # set by the loop's evaluate(): the batches are not read, the episodes are drawn
        if split not in EVALUATED_SPLITS:
            return {}
        pools = self.validation_pools if split == "validation" else self.test_pools
        examples = self.validation_examples if split == "validation" else self.test_examples
        if not pools:
            return {}
        losses, accuracies = [], []
        with torch.enable_grad():
            for number in range(self.config.validation_episodes):
                episode = self.next_episode(pools, EVALUATED_SPLITS[split], number)
                support, query = self.episode_batches(examples, episode)
                _, adapted = self.adapted(model, support)
                loss, accuracy = self.query_scores(model, adapted, query)
                losses.append(loss)
                accuracies.append(accuracy)
        return {"episode_accuracy": float(np.mean(accuracies)), "loss": float(np.mean(losses))}

    def loss_units(self, batch: dict[str, Any]) -> int:
        """One episode per micro-batch, whatever rows pace it: episodes count equally in a meta-batch."""
        return 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"episodes_drawn": torch.tensor(self.episodes_drawn)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.episodes_drawn = int(tensors["episodes_drawn"])
