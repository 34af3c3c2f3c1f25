"""Checkpoint files, schedules and loop pieces, tested on toy modules."""

import json
import math

import pytest
import torch
from torch import nn

from deltatune.config.schema import TrainConfig
from deltatune.methods.selective.full import FullConfig, FullFineTuning
from deltatune.training.checkpoint import (
    optimizer_from_tensors,
    optimizer_to_tensors,
    prune_checkpoints,
    read_checkpoint_dir,
    step_checkpoints,
    write_checkpoint_dir,
)
from deltatune.training.loop import Batches, make_optimizer, plan_steps, set_train_mode
from deltatune.training.schedule import lr_multiplier, make_scheduler
from deltatune.training.state import LoopState, load_training_checkpoint, save_training_checkpoint


def test_checkpoint_dir_round_trip_and_no_pickle(tmp_path):
    tensors = {"model": {"w": torch.randn(3, 4)}, "rng": {"cpu": torch.get_rng_state()}}
    write_checkpoint_dir(tmp_path / "step-00000001", tensors, {"step": 1})
    loaded, state = read_checkpoint_dir(tmp_path / "step-00000001")
    assert torch.equal(loaded["model"]["w"], tensors["model"]["w"])
    assert state == {"step": 1}
    files = sorted(p.name for p in (tmp_path / "step-00000001").iterdir())
    assert files == ["model.safetensors", "rng.safetensors", "state.json"]


def test_overwriting_a_checkpoint_keeps_a_complete_copy(tmp_path, monkeypatch):
    target = tmp_path / "best"
    write_checkpoint_dir(target, {"model": {"w": torch.zeros(2)}}, {"v": 1})

    # Simulate a kill right after the old copy was moved aside: the reader must still find a whole checkpoint.
    import deltatune.training.checkpoint as checkpoint

    real_replace = checkpoint.os.replace
    calls = []

    def crash_on_second_rename(src, dst):
        calls.append((src, dst))
        if str(src).endswith(".best.tmp"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint_dir(target, {"model": {"w": torch.ones(2)}}, {"v": 2})
    monkeypatch.undo()
    tensors, state = read_checkpoint_dir(target)
    assert state == {"v": 1} and torch.equal(tensors["model"]["w"], torch.zeros(2))


def test_temporary_directories_are_not_checkpoints(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint_dir(tmp_path / f"step-{step:08d}", {"m": {"x": torch.zeros(1)}}, {"s": step})
    (tmp_path / ".step-00000004.tmp").mkdir()
    assert [s for s, _ in step_checkpoints(tmp_path)] == [1, 2, 3]
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [2, 3]


def test_optimizer_state_survives_safetensors_round_trip():
    model = nn.Linear(3, 2)
    optimizer = make_optimizer(model, TrainConfig(lr=0.1))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, rest = optimizer_to_tensors(optimizer)
    json.dumps(rest)  # everything outside the tensors must be JSON
    fresh = make_optimizer(nn.Linear(3, 2), TrainConfig(lr=0.1))
    fresh.load_state_dict(optimizer_from_tensors(tensors, rest))
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(fresh.state_dict()["state"][0][key]))


def test_training_checkpoint_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5), nn.Linear(3, 1))
    method = FullFineTuning(FullConfig())
    method.apply(model, None)
    optimizer = make_optimizer(model, TrainConfig(lr=0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.randn(8, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    save_training_checkpoint(tmp_path / "ck", model, method, optimizer, scheduler, LoopState(step=1, epoch=0, group=1))
    expected_next_random = torch.rand(3)

    torch.manual_seed(123)
    other = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5), nn.Linear(3, 1))
    method.apply(other, None)
    other_optimizer = make_optimizer(other, TrainConfig(lr=0.1))
    other_scheduler = torch.optim.lr_scheduler.LambdaLR(other_optimizer, lambda step: 1.0 / (step + 1))
    state = load_training_checkpoint(tmp_path / "ck", other, method, other_optimizer, other_scheduler)
    assert state.step == 1 and state.group == 1
    assert torch.equal(torch.rand(3), expected_next_random)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)  # running mean/var of the BatchNorm included
    assert other_scheduler.get_last_lr() == scheduler.get_last_lr()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    values = [lr_multiplier(step, 100, 10, schedule) for step in range(100)]
    assert values[0] < values[5] < values[9] <= 1.0
    assert max(values) <= 1.0
    if schedule == "constant":
        assert values[-1] == 1.0
    else:
        assert values[-1] < 0.05
    if schedule == "cosine":
        assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_schedule_with_warm_restarts_starts_again_every_cycle():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, total_steps=30, warmup_steps=2, schedule="cosine", cycle_steps=10)
    rates = []
    for _ in range(30):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    once = [lr_multiplier(step, 10, 2, "cosine") for step in range(10)]
    assert rates == pytest.approx(once * 3)  # three identical cycles, each warming up and decaying to ~0
    assert rates[9] < 0.05 and rates[10] == rates[0]


def test_epoch_order_is_seeded_and_covers_every_example():
    data = Batches(list(range(10)), collate=lambda xs: xs)
    first = data.epoch(batch_size=3, seed=1, epoch=0)
    assert first == data.epoch(batch_size=3, seed=1, epoch=0)
    assert first != data.epoch(batch_size=3, seed=1, epoch=1)
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert [len(b) for b in first] == [3, 3, 3, 1]


def test_plan_steps_counts_accumulation_and_fractional_epochs():
    assert plan_steps(100, TrainConfig(batch_size=10, gradient_accumulation=3, epochs=2)) == (4, 8)
    assert plan_steps(100, TrainConfig(batch_size=10, epochs=0.5)) == (10, 5)
    assert plan_steps(100, TrainConfig(batch_size=10, max_steps=7)) == (10, 7)


def test_frozen_batchnorm_stays_in_eval_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Linear(1, 1), nn.BatchNorm1d(1))
    for p in model[1].parameters():
        p.requires_grad_(False)
    set_train_mode(model)
    assert model[1].training is False and model[3].training is True and model[0].training is True


def test_length_grouping_reduces_padding_and_keeps_every_example():
    import random

    random.seed(0)
    examples = [{"input_ids": [1] * random.randint(3, 60)} for _ in range(400)]
    grouped, plain = Batches(examples, collate=lambda xs: xs), Batches(examples, lambda xs: xs, group_by_length=False)

    def padded_tokens(batches):
        return sum(len(b) * max(len(examples[i]["input_ids"]) for i in b) for b in batches)

    first = grouped.epoch(batch_size=8, seed=0, epoch=0)
    assert first == grouped.epoch(batch_size=8, seed=0, epoch=0)
    assert sorted(i for batch in first for i in batch) == list(range(400))
    assert padded_tokens(first) < 0.7 * padded_tokens(plain.epoch(batch_size=8, seed=0, epoch=0))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(x)


def _toy_loop(tmp_path, **train):
    from deltatune.objectives.classification import Classification
    from deltatune.training.loop import TrainingLoop
    from deltatune.training.run_dir import RunDir

    torch.manual_seed(1)
    examples = [{"x": torch.randn(4), "labels": torch.tensor(i % 3)} for i in range(16)]
    collate = lambda items: {key: torch.stack([item[key] for item in items]) for key in items[0]}  # noqa: E731
    model = _Toy()
    method = FullFineTuning(FullConfig())
    method.apply(model, None)
    cfg = TrainConfig(progress=False, group_by_length=False, max_grad_norm=None, warmup_steps=0, **train)
    run_dir = RunDir(tmp_path / f"run{len(list(tmp_path.iterdir()))}")
    run_dir.create()
    loop = TrainingLoop(model, method, Classification(), Batches(examples, collate), Batches(examples, collate),
                        cfg, run_dir, torch.device("cpu"))
    return model, loop


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big, loop = _toy_loop(tmp_path, batch_size=8, gradient_accumulation=1, max_steps=1, lr=0.1)
    loop.run()
    small, loop = _toy_loop(tmp_path, batch_size=4, gradient_accumulation=2, max_steps=1, lr=0.1)
    loop.run()
    assert torch.allclose(big.layer.weight, small.layer.weight, atol=1e-6)
    assert not torch.allclose(big.layer.weight, _Toy().layer.weight)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_accumulated_micro_batches_of_unequal_size_count_by_their_rows(tmp_path):
    """16 rows in micro-batches of 6, 6 and 4: each weighs by its rows, so the step is the one batch of 16 makes
    (a plain 1/3 each would give the 4 rows half again their share)."""
    gradients = []
    for batch_size, accumulation in ((16, 1), (6, 3)):
        model, loop = _toy_loop(tmp_path, batch_size=batch_size, gradient_accumulation=accumulation, max_steps=1)
        loop.optimizer.step = lambda: gradients.append(model.layer.weight.grad.clone())  # AdamW's first step is
        loop.run()  # about lr·sign(gradient) whatever its size, so compare the gradients themselves
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


def test_early_stopping_stops_after_patience_evaluations(tmp_path):
    model, loop = _toy_loop(tmp_path, batch_size=4, max_steps=50, lr=0.0, eval_every=1, early_stopping_patience=2)
    state = loop.run()
    assert state.stopped_early and state.step == 3 and state.best_step == 1


def _strict(text):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} is not JSON"))


def test_non_finite_numbers_are_written_as_null(tmp_path):
    from deltatune.training.checkpoint import write_json_atomic
    from deltatune.training.run_dir import RunDir

    run_dir = RunDir(tmp_path)
    run_dir.log({"step": 1, "loss": float("nan"), "perplexity": float("inf"), "values": [1.0, float("-inf")]})
    assert _strict(run_dir.metrics_file.read_text()) == {"step": 1, "loss": None, "perplexity": None,
                                                         "values": [1.0, None]}
    write_json_atomic(tmp_path / "summary.json", {"after": {"validation": {"loss": float("nan"), "accuracy": 0.5}}})
    assert _strict((tmp_path / "summary.json").read_text()) == {"after": {"validation": {"loss": None,
                                                                                         "accuracy": 0.5}}}


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    import deltatune.training.checkpoint as checkpoint
    from deltatune.errors import UserError

    target = tmp_path / "best"
    write_checkpoint_dir(target, {"model": {"w": torch.zeros(2)}}, {"v": 1})

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_durably", disk_full)  # the JSON write after the tensors
    with pytest.raises(UserError, match=r"^cannot write .*\.best\.tmp/state\.json \(No space left on device\); free "
                                        r"space on that disk, then run again$"):
        write_checkpoint_dir(target, {"model": {"w": torch.ones(2)}}, {"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"], "the partial copy must be removed"
    tensors, state = read_checkpoint_dir(target)
    assert state == {"v": 1} and torch.equal(tensors["model"]["w"], torch.zeros(2))


def test_safetensors_io_errors_count_as_disk_errors(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import deltatune.training.checkpoint as checkpoint
    from deltatune.errors import UserError

    def quota_exceeded(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: Disk quota exceeded (os error 122) at path "x"')

    monkeypatch.setattr(checkpoint, "save_file", quota_exceeded)
    with pytest.raises(UserError, match=r"\(Disk quota exceeded\); free space within your disk quota"):
        write_checkpoint_dir(tmp_path / "step-00000001", {"model": {"w": torch.zeros(2)}}, {})

    def other_failure(*args, **kwargs):
        raise SafetensorError("Error while serializing: tensor is not contiguous")

    monkeypatch.setattr(checkpoint, "save_file", other_failure)
    with pytest.raises(SafetensorError):  # not a disk problem: a bug, which keeps its traceback
        write_checkpoint_dir(tmp_path / "step-00000001", {"model": {"w": torch.zeros(2)}}, {})


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe"])
def test_damaged_checkpoint_files_name_themselves(tmp_path, damage):
    from deltatune.errors import UserError
    from deltatune.training.state import latest_loop_state

    write_checkpoint_dir(tmp_path / "step-00000001", {"model": {"w": torch.zeros(2)}}, {"loop": {"step": 1}})
    assert latest_loop_state(tmp_path).step == 1
    (tmp_path / "step-00000001" / "state.json").write_bytes(damage)
    with pytest.raises(UserError, match=r"step-00000001/state\.json is damaged"):
        read_checkpoint_dir(tmp_path / "step-00000001")
    with pytest.raises(UserError, match=r"step-00000001/state\.json is damaged.*delete .*step-00000001 to resume"):
        latest_loop_state(tmp_path)


def test_resolve_device_refuses_devices_this_machine_lacks(monkeypatch):
    from deltatune.errors import UserError
    from deltatune.training.loop import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match=r"train\.device=cuda:0 but torch finds no CUDA GPU"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match=r"has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_objectives_declare_the_metrics_they_report(tmp_path):
    from deltatune.objectives import available_objectives

    model, loop = _toy_loop(tmp_path, batch_size=4, max_steps=1)
    from deltatune.training.loop import evaluate

    metrics = evaluate(model, loop.objective, loop.validation_data, loop.cfg, torch.device("cpu"))
    assert tuple(metrics) == type(loop.objective).metrics
    for objective in available_objectives().values():
        assert objective.main_metric in objective.metrics


@pytest.mark.parametrize("max_grad_norm, fix", [(None, r"lower train\.lr \(now 1e\+30\) or set train\.max_grad_norm"),
                                                (1.0, r"lower train\.lr \(now 1e\+30\) and run again$")])
def test_divergence_stops_before_a_non_finite_step(tmp_path, max_grad_norm, fix):
    from deltatune.errors import UserError

    model, loop = _toy_loop(tmp_path, batch_size=4, max_steps=20, lr=1e30, save_every=1)
    loop.cfg.max_grad_norm = max_grad_norm
    with pytest.raises(UserError, match=r"^training diverged: .* at step \d+; " + fix) as refused:
        loop.run()
    saved = step_checkpoints(loop.run_dir.checkpoints)
    assert saved, "the steps before the divergence were checkpointed"
    for _, path in saved:
        tensors, _ = read_checkpoint_dir(path)
        assert all(torch.isfinite(t).all() for t in tensors["model"].values())


def test_preference_pairs_group_by_their_longer_half_and_count_both_halves_tokens():
    from deltatune.objectives.base import Objective
    from deltatune.training.loop import example_length, to_device

    pairs = [{"chosen": {"input_ids": [1] * chosen}, "rejected": {"input_ids": [1] * rejected}, "margin": 0.5}
             for chosen, rejected in [(3, 7), (9, 2), (4, 4)]]
    assert Batches(pairs, collate=list).lengths() == [7, 9, 4]
    assert example_length({"pixel_values": [0.0]}) is None
    assert Batches([{"pixel_values": [0.0]}], list).lengths() is None
    batch = {"chosen": {"input_ids": torch.ones(2, 5, dtype=torch.long),
                        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])},
             "rejected": {"input_ids": torch.ones(2, 5, dtype=torch.long),
                          "attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])},
             "margin": torch.zeros(2)}
    assert Objective().tokens_in(batch) == 8 + 6
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["rejected"]["attention_mask"], batch["rejected"]["attention_mask"])


def test_a_best_checkpoint_from_beyond_the_resumed_step_is_dropped(tmp_path):
    """best/ written after the checkpoint a resume starts from (here step 5, resuming at 0) is not kept as the run's
    best: the loop tracks the best afresh, so the final weights never come from steps it did not keep."""
    from deltatune.training.checkpoint import read_json, write_checkpoint_dir

    model, loop = _toy_loop(tmp_path, batch_size=4, max_steps=2, lr=0.0, eval_every=1)
    write_checkpoint_dir(loop.run_dir.best, {"model": {"layer.weight": torch.zeros(3, 4)}}, {"step": 5})
    unbeatable = 2.0 if loop.objective.higher_is_better(loop.metric) else -1.0
    loop.state.best_metric, loop.state.best_step = unbeatable, 5  # what the checkpoint's state said
    state = loop.run()
    assert state.best_step in (1, 2) and read_json(loop.run_dir.best / "state.json", "")["step"] == state.best_step


def test_a_nan_validation_score_is_never_the_best(tmp_path, monkeypatch):
    import deltatune.training.loop as loop_module

    model, loop = _toy_loop(tmp_path, batch_size=4, max_steps=3, lr=0.0, eval_every=1)
    scores = iter([float("nan"), 0.5, 0.7] if loop.objective.higher_is_better(loop.metric) else [float("nan"), 0.7,
                                                                                                     0.5])
    monkeypatch.setattr(loop_module, "evaluate", lambda *_: {loop.metric: next(scores)})
    assert loop.run().best_step == 3


def test_batch_norm_without_affine_parameters_trains_and_saves_its_statistics_where_its_parent_trains():
    from deltatune.training.loop import set_train_mode
    from deltatune.training.state import weights_to_save

    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False)),  # a block that trains
                          nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False)),  # a frozen block
                          nn.BatchNorm1d(2))
    for frozen in (model[1], model[2]):
        frozen.requires_grad_(False)
    set_train_mode(model)
    assert model[0][1].training and not model[1][1].training and not model[2].training
    method = FullFineTuning(FullConfig())
    saved = weights_to_save(model, method)
    assert "0.1.running_mean" in saved and "1.1.running_mean" not in saved and "2.running_mean" not in saved


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    """A linear decay gives every step another rate; the record of step s holds the one step s used."""
    model, loop = _toy_loop(tmp_path, batch_size=4, max_steps=3, lr=0.4, schedule="linear",
                            log_every=1)
    used = []
    real_step = loop.optimizer.step

    def recording_step():
        used.append(loop.optimizer.param_groups[0]["lr"])
        real_step()

    loop.optimizer.step = recording_step
    loop.run()
    logged = [record["lr"] for record in map(json.loads, loop.run_dir.metrics_file.read_text().splitlines())
              if record["type"] == "train"]
    assert logged == pytest.approx(used) and len(used) == 3 and len(set(used)) == 3


def test_fp16_scales_the_loss_skips_an_overflowing_step_and_checkpoints_its_scale(tmp_path):
    """Gradients too large for the loss scale (1e35 · 65536 overflows) skip the step and halve the scale instead of
    stopping the run as diverged; the scale is in the checkpoint, so a resume scales as the run would have."""
    from deltatune.training.checkpoint import read_checkpoint_dir

    model, loop = _toy_loop(tmp_path, batch_size=4, max_steps=2, lr=0.1, dtype="fp16", save_every=2)
    real_loss = loop.objective.loss
    loop.objective.loss = lambda model, batch: (lambda loss, stats: (loss * 1e35, stats))(*real_loss(model, batch))
    start = model.layer.weight.detach().clone()
    loop.run()
    assert loop.scaler.is_enabled() and loop.scaler.get_scale() == 65536.0 / 4  # two skipped steps, halved twice
    assert torch.equal(model.layer.weight, start)
    tensors, _ = read_checkpoint_dir(loop.run_dir.checkpoints / "step-00000002")
    assert float(tensors["grad_scaler"]["scale"]) == 65536.0 / 4
