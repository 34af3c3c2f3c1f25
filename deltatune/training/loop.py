"""The one training loop. Every objective (classification, SFT, reward, DPO, PPO, distillation, self-training) runs
through `TrainingLoop`; the loop knows nothing about tasks or methods beyond the `Objective` and `Method` interfaces.
How examples become each epoch's micro-batches is `deltatune.training.batches.Batches`.

Determinism: the order of examples in epoch e is a permutation seeded by (seed, e), and checkpoints carry the
RNG state, so a run killed and resumed from a checkpoint takes exactly the steps an uninterrupted run takes.

Divergence: a non-finite loss or gradient norm stops training before the optimizer applies it, and the trainable
weights are checked to be finite before every evaluation and checkpoint, so no saved file ever holds nan weights.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import nn

from deltatune import distributed
from deltatune.config.schema import TrainConfig
from deltatune.errors import TrainingDiverged, UserError
from deltatune.methods.base import Method
from deltatune.objectives.base import Objective
from deltatune.training.batches import Batches, example_length  # noqa: F401 - re-exported: callers import them here
from deltatune.training.device import autocast_context, resolve_device, to_device  # noqa: F401 - re-exported
from deltatune.training.checkpoint import prune_checkpoints, step_checkpoints, write_checkpoint_dir
from deltatune.training.run_dir import RunDir, drop_best_after
from deltatune.training import sharding
from deltatune.training.optimizer import layer_lr_scales, make_optimizer, restore_scaler, scaler_tensors  # noqa: F401
from deltatune.training.schedule import make_scheduler
from deltatune.training.state import (
    LoopState,
    every_rank_steps,
    load_training_checkpoint,
    modules_updating_statistics,
    rng_states,
    save_training_checkpoint,
    this_rank_steps,
    weights_to_save,
)

KEEP_CHECKPOINTS = 2


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except BatchNorm layers whose statistics must not move (`modules_updating_statistics`): frozen
    ones, or a head-only CNN run would silently change the backbone."""
    model.train()
    updating = modules_updating_statistics(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and name not in updating:
            module.eval()


def evaluate(
    model: nn.Module, objective: Objective, data: Batches, cfg: TrainConfig, device: torch.device
) -> dict[str, float]:
    """The objective's metrics over one split, in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    objective.evaluating = data.split
    with torch.no_grad(), autocast_context(device, cfg.dtype):
        metrics = objective.evaluate(model, (to_device(b, device) for b in data.in_order(cfg.eval_batch_size)))
    if was_training:
        set_train_mode(model)
    return metrics


def plan_steps(num_examples: int, cfg: TrainConfig, objective: Objective | None = None) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps). An objective with a rollout phase draws `rollout_size`
    examples at a time and says how many steps each draw becomes."""
    size = objective.rollout_size if objective is not None else None
    plan = objective.epoch_plan(num_examples, cfg.batch_size) if objective is not None else None
    if size:
        remainder = num_examples % size
        remainder -= remainder % distributed.world_size()  # as epoch_groups deals it to the ranks
        draws = [size] * (num_examples // size) + ([remainder] if remainder else [])
        per_epoch = sum(objective.steps_per_rollout(n, cfg.batch_size, cfg.gradient_accumulation) for n in draws)
    else:
        batches = plan[0] if plan else math.ceil(num_examples / cfg.batch_size)
        per_epoch = math.ceil(batches / cfg.gradient_accumulation)
    epochs = plan[1] if plan else cfg.epochs
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil(epochs * per_epoch)
    return per_epoch, max(1, total)


class TrainingLoop:
    """Runs the optimizer steps of one run, evaluating, checkpointing and stopping early as configured."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        objective: Objective,
        train_data: Batches,
        validation_data: Batches | None,
        cfg: TrainConfig,
        run_dir: RunDir,
        device: torch.device,
    ) -> None:
        self.model, self.method, self.objective, self.cfg = model, method, objective, cfg
        self.train_data, self.validation_data, self.run_dir, self.device = train_data, validation_data, run_dir, device
        self.steps_per_epoch, self.total_steps = plan_steps(len(train_data.examples), cfg, objective)
        cycle = self.steps_per_epoch if cfg.restart_schedule_each_epoch else self.total_steps
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * cycle)
        self.optimizer = make_optimizer(model, cfg, objective.trainable_parameters())
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, warmup, cfg.schedule, cycle)
        # fp16 keeps small gradients from flushing to zero by scaling the loss; a step whose gradients overflow is
        # skipped and the scale lowered (torch.amp's recipe). bf16 has fp32's exponent range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.save_every = cfg.save_every or self.eval_every
        self.metric = objective.main_metric if cfg.metric == "auto" else cfg.metric
        self.state = LoopState()
        # The optimizer steps of the current draw not all taken yet: one step for most objectives, a rollout's
        # epochs of mini-batches for PPO. state.update counts those already taken.
        self.pending: list[list[Any]] | None = None
        # Called with (step, validation metrics) after every evaluation, once the best checkpoint is written.
        self.on_evaluation: Callable[[int, int, dict[str, float]], None] | None = None  # (step, of steps, metrics)
        ranks = distributed.world_size()
        if ranks > 1 and objective.rollout_size and (objective.rollout_size % ranks or cfg.batch_size % ranks):
            raise UserError(f"objective {objective.name!r} generates its own batches: with {ranks} ranks "
                            f"rollout_size ({objective.rollout_size}) and train.batch_size ({cfg.batch_size}) must "
                            f"both be multiples of {ranks}")

    def resume(self) -> bool:
        """Load the newest complete checkpoint (model, optimizer, schedule, RNG, loop state); False when there is
        none. It only reads: the caller drops the metrics logged after that step (`RunDir.truncate_metrics_after`)
        once it has checked everything else, so a refused resume changes no file."""
        found = step_checkpoints(self.run_dir.checkpoints)
        if not found:
            return False
        extra: dict[str, dict[str, torch.Tensor]] = {}
        self.state = load_training_checkpoint(found[-1][1], self.model, self.method, self.optimizer, self.scheduler,
                                              extra)
        self.objective.load_state_tensors(extra.get("objective", {}))
        restore_scaler(self.scaler, extra)
        self.pending = this_rank_steps(extra["rollout"]) if "rollout" in extra else None
        return True

    def run(self) -> LoopState:
        from tqdm.auto import tqdm

        set_train_mode(self.model)
        self._same_start_on_every_rank()
        if distributed.broadcast_object(distributed.is_main() and drop_best_after(self.run_dir, self.state.step)):
            self.state.best_metric = self.state.best_step = None
            self.state.evaluations_without_improvement = 0
        progress = tqdm(total=self.total_steps, initial=self.state.step,
                        disable=not self.cfg.progress or not distributed.is_main(),
                        desc="train", unit="step", dynamic_ncols=True)
        while self.state.step < self.total_steps and not self.state.stopped_early:
            if self.state.group == 0 and self.pending is None:
                self._start_epoch()
            groups = self.epoch_groups()
            while self.state.group < len(groups) and self.state.step < self.total_steps:
                if self.pending is None:
                    self.pending, self.state.update = self._updates(groups[self.state.group]), 0
                loss, stats = self.optimizer_step(self.pending[self.state.update])
                self.state.update += 1
                if self.state.update >= len(self.pending):  # the draw is used up: the next step starts a new one
                    self.pending, self.state.update = None, 0
                    self.state.group += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{stats['lr']:.2e}")
                self._after_step(loss, stats)
                if self.state.stopped_early:
                    break
            if self.state.group >= len(groups):
                self.state.epoch, self.state.group = self.state.epoch + 1, 0
        progress.close()
        return self.state

    def _same_start_on_every_rank(self) -> None:
        """In a distributed run: every rank trains the same parameters from rank 0's values, and (on a fresh start)
        ranks other than 0 draw their own dropout masks; rank 0 keeps the stream a single process would use."""
        if distributed.world_size() == 1:
            return
        trainable = [name for name, param in self.model.named_parameters() if param.requires_grad]
        distributed.check_same_on_all_ranks(trainable, "which parameters train")
        # Frozen weights come from the same files on every rank; what trains (and running statistics) is sent.
        buffers = [b for b in self.model.buffers() if b.is_floating_point() and b.is_contiguous()]
        # Sharded (FSDP) parameters were cut from identical copies; the rest is sent.
        distributed.broadcast_from_main([t for t in [*self._trainable(), *buffers] if not sharding.is_sharded(t)])
        if self.state.step == 0 and not distributed.is_main():
            torch.manual_seed(self.cfg.seed * 1_000_003 + distributed.rank())

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + self.objective.trainable_parameters()

    def epoch_groups(self) -> list[list[list[int]]]:
        """The current epoch's draws: for most objectives each is one optimizer step's group of micro-batches (lists
        of example indices); for an objective with a rollout phase, one rollout's examples (a group of one list)."""
        if self.objective.rollout_size:
            draws = self.train_data.epoch(self.objective.rollout_size, self.cfg.seed, self.state.epoch)
            # Every rank rolls out an equal share: the epoch's last, smaller draw loses its remainder of N ranks
            # (fewer than N rows), or the ranks would take different numbers of steps (plan_steps counts the same).
            ranks = distributed.world_size()
            return [[draw[: len(draw) - len(draw) % ranks]] for draw in draws if len(draw) >= ranks]
        plan = self.objective.epoch_plan(len(self.train_data.examples), self.cfg.batch_size)
        micro = self.train_data.epoch(self.cfg.batch_size, self.cfg.seed, self.state.epoch,
                                      self.objective.epoch_examples(), plan[0] if plan else None)
        k = self.cfg.gradient_accumulation
        return [micro[i : i + k] for i in range(0, len(micro), k)]

    def _start_epoch(self) -> None:
        """Let the objective prepare the epoch (self-training labels its unlabelled rows); what it reports is
        logged as a "round" record under the step it precedes, so a resume that repeats it logs it once."""
        data = self.train_data

        def batches_of(indices: list[int]) -> dict[str, Any]:
            return to_device(data.collate([data.examples[i] for i in indices]), self.device)

        self.model.eval()
        try:
            with torch.no_grad(), autocast_context(self.device, self.cfg.dtype):
                stats = self.objective.start_epoch(self.state.epoch, self.model, batches_of, self.cfg.eval_batch_size)
        finally:
            set_train_mode(self.model)
        if stats and distributed.is_main():
            self.run_dir.log({"type": "round", "step": self.state.step + 1, "epoch": self.state.epoch, **stats})

    def _updates(self, group: list[list[int]]) -> list[list[Any]]:
        """The optimizer steps a draw becomes: itself, or the steps the objective's rollout on it returns (generated
        in eval mode under the run's autocast; training mode comes back afterwards)."""
        if not self.objective.rollout_size:
            return [group]
        indices, _ = distributed.share(group[0])  # each rank rolls out on its share, in batches of its share
        batch = to_device(self.train_data.collate([self.train_data.examples[i] for i in indices]), self.device)
        self.model.eval()
        try:
            with autocast_context(self.device, self.cfg.dtype):
                return self.objective.rollout(self.model, batch, self.cfg.batch_size // distributed.world_size(),
                                              self.cfg.gradient_accumulation)
        finally:
            set_train_mode(self.model)

    def optimizer_step(self, group: list[Any]) -> tuple[float, dict[str, float]]:
        """One step of `run`: forward/backward over the group's micro-batches (lists of example indices, or batches
        a rollout made; gradients accumulate), clip, step the optimizer and schedule. Public so that benchmarks time
        exactly the step training takes (state.seconds and state.tokens count it); it neither evaluates nor
        checkpoints."""
        started = time.perf_counter()
        total_loss, stats, weights, tokens = 0.0, {}, {}, 0
        batches, shares = [], []
        for item in group:
            if isinstance(item, dict):
                batches.append(item)
                shares.append(1.0)
            else:  # a global micro-batch of example indices: this rank computes its share (all of it alone)
                indices, share = distributed.share(item)
                batches.append(self.train_data.collate([self.train_data.examples[i] for i in indices]))
                shares.append(share)
        for batch, weight in zip(batches, self._unit_weights(batches, shares)):
            batch = to_device(batch, self.device)
            with autocast_context(self.device, self.cfg.dtype):
                loss, batch_stats = self.objective.loss(self.model, batch)
            self.scaler.scale(loss * (weight / len(group))).backward()
            total_loss += loss.item() * weight / len(group)
            for key, value in batch_stats.items():  # weighted like the loss, over the micro-batches reporting it
                stats[key], weights[key] = stats.get(key, 0.0) + value * weight, weights.get(key, 0.0) + weight
            tokens += self.objective.tokens_in(batch) if weight else 0
        stats = {key: value / weights[key] for key, value in stats.items() if weights[key]}  # this rank's mean
        params = self._trainable()
        # FSDP already averaged its shards' gradients in backward (reduce-scatter); the rest are averaged here.
        total_loss, tokens = distributed.average_gradients([p for p in params if not sharding.is_sharded(p)],
                                                           [total_loss, tokens])
        tokens = round(tokens * distributed.world_size())  # every rank's tokens, summed
        if not math.isfinite(total_loss):
            raise self._diverged(f"the loss is {total_loss}", self.state.step + 1)
        self.scaler.unscale_(self.optimizer)  # true gradients before clipping (a no-op without fp16)
        if self.cfg.max_grad_norm:
            stats["grad_norm"] = sharding.clip_gradient_norm(params, self.cfg.max_grad_norm)
            if not math.isfinite(stats["grad_norm"]) and not self.scaler.is_enabled():  # fp16: the step is skipped
                raise self._diverged(f"the gradient norm is {stats['grad_norm']}", self.state.step + 1)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < 1.0:  # every step for a while skipped as overflowing
            raise self._diverged("the gradients overflow fp16 even unscaled", self.state.step + 1)
        stats["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step used (after scheduler.step: the next's)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.seconds += time.perf_counter() - started
        self.state.tokens += tokens
        stats["tokens_per_s"] = tokens / max(1e-9, time.perf_counter() - started)
        return total_loss, stats

    def _unit_weights(self, batches: list[dict[str, Any]], shares: list[float]) -> list[float]:
        """Each micro-batch's weight, units_i · M·N / Σ units over the step's M micro-batches on N ranks (its rows,
        or the tokens a token-mean loss averages over): the mean of the weighted losses is then the loss of the
        whole step's batch, so accumulation and ranks make the step one big batch makes, however the units fall
        (micro-batches of 5 and 500 response tokens count by their tokens, as in Trainer since 4.46)."""
        if len(batches) == 1 and distributed.world_size() == 1:
            return shares  # one micro-batch alone is the whole step: no units to count (the usual step)
        units = [self.objective.loss_units(batch) if share else 0 for batch, share in zip(batches, shares)]
        total = distributed.sum_across_ranks(sum(units))
        count = len(batches) * distributed.world_size()
        return [unit * count / total for unit in units] if total else shares

    def _diverged(self, problem: str, step: int) -> TrainingDiverged:
        """The error that stops training before a non-finite loss or gradient turns every weight into nan."""
        fix = f"lower train.lr (now {self.cfg.lr:g})"
        if not self.cfg.max_grad_norm:
            fix += " or set train.max_grad_norm (e.g. 1.0)"
        return TrainingDiverged(f"training diverged: {problem} at step {step}; {fix} and run again")

    def _check_weights_finite(self) -> None:
        # The objective's own parameters (PPO's value head) reach checkpoints too.
        owned = ((f"{self.objective.name} parameter", param) for param in self.objective.trainable_parameters())
        for name, param in [*self.model.named_parameters(), *owned]:
            if param.requires_grad and not bool(torch.isfinite(param).all()):
                raise self._diverged(f"weight {name} is not finite", self.state.step)

    def _after_step(self, loss: float, stats: dict[str, float]) -> None:
        step = self.state.step
        last = step == self.total_steps
        if last or step % self.save_every == 0 or (self.validation_data is not None and step % self.eval_every == 0):
            self._check_weights_finite()  # nothing non-finite may reach best/ or a checkpoint
        main = distributed.is_main()  # the one rank that writes; all of them evaluate, so all decide alike
        if (step % self.cfg.log_every == 0 or last) and main:
            self.run_dir.log({"type": "train", "step": step, "epoch": self._epoch_progress(), "loss": loss, **stats})
        if self.validation_data is not None and (step % self.eval_every == 0 or step == self.total_steps):
            self._evaluate_and_track()
        if step % self.save_every == 0 or step == self.total_steps or self.state.stopped_early:
            extra = {"objective": self.objective.state_tensors(), **scaler_tensors(self.scaler)}
            if self.pending is not None:
                extra["rollout"] = every_rank_steps(self.pending)
            # Every rank takes part (RNG states and sharded weights are gathered); rank 0 alone writes.
            save_training_checkpoint(self.run_dir.checkpoints / f"step-{step:08d}", self.model, self.method,
                                     self.optimizer, self.scheduler, self.state,
                                     {name: group for name, group in extra.items() if group}, rng_states())
            if main:
                prune_checkpoints(self.run_dir.checkpoints, KEEP_CHECKPOINTS)

    def _epoch_progress(self) -> float:
        return round(self.state.step / self.steps_per_epoch, 4)

    def _evaluate_and_track(self) -> None:
        # Every rank adopts rank 0's numbers: the best-checkpoint and early-stopping decisions below must agree
        # (one rank alone gathering sharded weights, or stopping, would hang the others), and on a GPU two ranks'
        # evaluations of the same rows may differ in the last bits.
        metrics = distributed.gather_objects(evaluate(self.model, self.objective, self.validation_data, self.cfg,
                                                      self.device))[0]
        main = distributed.is_main()
        if main:
            self.run_dir.log({"type": "eval", "split": "validation", "step": self.state.step,
                              "epoch": self._epoch_progress(), **metrics})
        if self.metric not in metrics:
            raise UserError(f"train.metric {self.metric!r} is not reported by this objective; choose from "
                            f"{', '.join(metrics)}")
        value = metrics[self.metric]
        greater = self.objective.higher_is_better(self.metric)  # the objective knows its metrics' direction
        best = self.state.best_metric
        # A non-finite score is never best: nan would compare as no improvement forever after (and is saved as null).
        if math.isfinite(value) and (best is None or (value > best if greater else value < best)):
            self.state.best_metric, self.state.best_step = value, self.state.step
            self.state.evaluations_without_improvement = 0
            weights = weights_to_save(self.model, self.method)  # on every rank: sharded weights are gathered
            if main:
                write_checkpoint_dir(self.run_dir.best, {"model": weights}, {"step": self.state.step, self.metric: value})
        else:
            self.state.evaluations_without_improvement += 1
            patience = self.cfg.early_stopping_patience or self.objective.early_stopping_patience
            if patience is not None and self.state.evaluations_without_improvement >= patience:
                self.state.stopped_early = True
        if self.on_evaluation is not None:
            # e.g. a hyperparameter search's pruner, which may stop the run here
            self.on_evaluation(self.state.step, self.total_steps, metrics)
