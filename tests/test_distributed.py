"""Data-parallel training (`deltatune.distributed`, `--nproc`): ranks stay identical, N ranks make the steps of one
process with the same global batch, and a killed rank stops the job with one line and a resumable checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune import distributed
from tests.helpers import tiny_classification_run

REPO = Path(__file__).resolve().parents[1]


def test_shares_weighted_by_size_average_to_the_whole_batch_mean(monkeypatch):
    values = torch.randn(50)
    for ranks in (2, 3, 4):
        for size in range(1, 12):
            batch = list(range(size))
            averaged = 0.0
            taken = []
            for index in range(ranks):
                monkeypatch.setattr(distributed, "world_size", lambda: ranks)
                monkeypatch.setattr(distributed, "rank", lambda: index)
                share, weight = distributed.share(batch)
                averaged += weight * float(values[share].mean()) / ranks
                taken += share if weight else []
            assert taken == batch, (ranks, size)  # every example once, in order, none twice
            assert averaged == pytest.approx(float(values[:size].mean()), abs=1e-6), (ranks, size)


class _DropoutToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.dropout = nn.Linear(4, 3), nn.Dropout(0.5)

    def forward(self, x, labels=None):
        return self.layer(self.dropout(x))


def _rank_worker(index: int, port: int, out: str, steps: int) -> None:
    """One rank of a 2-rank gloo group training a model with dropout (each rank draws its own masks) for `steps`
    steps, then comparing its parameters with the other rank's."""
    from deltatune.config.schema import TrainConfig
    from deltatune.methods.selective.full import FullConfig, FullFineTuning
    from deltatune.objectives.classification import Classification
    from deltatune.training.loop import Batches, TrainingLoop
    from deltatune.training.run_dir import RunDir

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.start("cpu")
    torch.manual_seed(1)
    examples = [{"x": torch.randn(4), "labels": torch.tensor(i % 3)} for i in range(21)]
    collate = lambda items: {key: torch.stack([item[key] for item in items]) for key in items[0]}  # noqa: E731
    torch.manual_seed(100 + index)  # ranks start apart: the loop must give them rank 0's weights
    model = _DropoutToy()
    method = FullFineTuning(FullConfig())
    method.apply(model, None)
    cfg = TrainConfig(progress=False, group_by_length=False, max_steps=steps, batch_size=5, lr=0.05,
                      warmup_steps=0, save_every=1000, eval_every=1000)
    run_dir = RunDir(Path(out) / "run")
    if distributed.is_main():
        run_dir.create()
    distributed.barrier()
    loop = TrainingLoop(model, method, Classification(), Batches(examples, collate), None, cfg, run_dir,
                        torch.device("cpu"))
    loop.run()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = distributed.gather_objects(flat)
    if distributed.is_main():
        (Path(out) / "result.json").write_text(json.dumps({
            "identical": bool(torch.equal(gathered[0], gathered[1])),
            "moved": float((gathered[0] - torch.cat([p.reshape(-1) for p in _start_weights()])).abs().max())}))
    distributed.stop()


def _start_weights() -> list[torch.Tensor]:
    torch.manual_seed(100)
    return [p.detach() for p in _DropoutToy().parameters()]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_rank_holds_the_same_parameters_after_training_steps(tmp_path):
    torch.multiprocessing.spawn(_rank_worker, args=(_free_port(), str(tmp_path), 7), nprocs=2, join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["identical"], "ranks drifted apart"
    assert result["moved"] > 1e-3, "the training steps did not change the weights"


def _workspace(root: Path, rows: int = 40) -> None:
    # 24 training rows of 40; no dropout, so runs that draw different random numbers compute the same function.
    tiny_classification_run(root, rows, "tests.tiny_models:tiny_bert_without_dropout", max_steps=12, batch_size=5,
                            eval_every=4, save_every=4, log_every=1)


def _deltatune(workdir: Path, *arguments: str, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "deltatune", "train", "config.yaml", *arguments]
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    if not wait:
        return process
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "weights" / "model.safetensors")


def test_two_ranks_take_the_steps_of_one_process_with_the_same_global_batch(tmp_path):
    # 24 training rows in global micro-batches of 5: the last one (4 rows) splits 2 / 2, the others 2 / 3.
    _workspace(tmp_path)
    code, out, err = _deltatune(tmp_path, "run_name=one")
    assert code == 0, err
    code, out, err = _deltatune(tmp_path, "run_name=two", "--nproc", "2")
    assert code == 0, err
    assert "2 ranks" in out and out.count("run saved in") == 1  # rank 0 alone prints
    one, two = _weights(tmp_path / "runs" / "one"), _weights(tmp_path / "runs" / "two")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    summary = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 12
    logged = [json.loads(line) for line in (tmp_path / "runs" / "two" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if r["type"] == "train"] == list(range(1, 13))  # once, not once per rank
    reference = [r["loss"] for r in map(json.loads, (tmp_path / "runs" / "one" / "metrics.jsonl").open())
                 if r["type"] == "train"]
    assert [r["loss"] for r in logged if r["type"] == "train"] == pytest.approx(reference, abs=1e-5)


def _rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the processes the launcher started (read from /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        rank = next((item.split(b"=")[1] for item in environ if item.startswith(b"RANK=")), None)
        if parent == launcher and rank is not None:
            ranks[int(rank)] = int(entry.name)
    return ranks


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' processes through /proc")
def test_a_killed_rank_stops_the_job_with_one_line_and_resume_finishes(tmp_path):
    _workspace(tmp_path, rows=200)
    steps = ["train.max_steps=300", "train.save_every=10", "train.eval_every=100", "train.log_every=10"]
    victim = _deltatune(tmp_path, "run_name=victim", "--nproc", "2", *steps, wait=False)
    checkpoints = tmp_path / "runs" / "victim" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints.exists() and any(checkpoints.glob("step-*"))):
        time.sleep(0.05)
    os.kill(_rank_pids(victim.pid)[1], signal.SIGKILL)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 of 2 was killed by SIGKILL") and "--resume" in last, err
    assert not (tmp_path / "runs" / "victim" / "weights").exists(), "killed too late"
    done = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert f"step {done[-1]}" in last
    # The last complete checkpoint loads: resumed on one process (another number of ranks), the run finishes.
    code, out, err = _deltatune(tmp_path, "run_name=victim", "--resume", *steps)
    assert code == 0, err
    assert f"resumed from step {done[-1]}" in out
    assert json.loads((tmp_path / "runs" / "victim" / "summary.json").read_text())["steps"] == 300


def test_fsdp_shards_the_parameters_and_trains_as_ddp_does(tmp_path):
    _workspace(tmp_path)
    code, out, err = _deltatune(tmp_path, "run_name=ddp", "--nproc", "2")
    assert code == 0, err
    code, out, err = _deltatune(tmp_path, "run_name=fsdp", "--nproc", "2", "train.distributed=fsdp")
    assert code == 0, err
    ddp, fsdp = _weights(tmp_path / "runs" / "ddp"), _weights(tmp_path / "runs" / "fsdp")
    assert ddp.keys() == fsdp.keys()  # saved whole: a one-process run or ddp can load them
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-5, rtol=0, msg=name)
    summaries = {name: json.loads((tmp_path / "runs" / name / "summary.json").read_text()) for name in ("ddp", "fsdp")}
    assert summaries["fsdp"]["distributed"] == "fsdp" and summaries["ddp"]["distributed"] == "ddp"
    halved = summaries["fsdp"]["parameter_bytes_per_rank"] / summaries["ddp"]["parameter_bytes_per_rank"]
    assert 0.45 < halved < 0.55, halved
    for split in ("validation", "test"):
        assert summaries["fsdp"]["after"][split] == pytest.approx(summaries["ddp"]["after"][split], abs=1e-4)


def test_an_fsdp_run_resumes_exactly_and_on_one_process(tmp_path):
    # Checkpoints of a sharded run hold whole tensors: resumed under fsdp they are cut into shards again (weights
    # and AdamW moments), resumed in one process they load as they are.
    _workspace(tmp_path)
    fsdp = ["--nproc", "2", "train.distributed=fsdp", "train.schedule=constant", "train.warmup_steps=0"]
    assert _deltatune(tmp_path, "run_name=straight", *fsdp)[0] == 0
    for name, again in (("sharded", fsdp), ("alone", fsdp[3:])):
        code, out, err = _deltatune(tmp_path, f"run_name={name}", *fsdp, "train.max_steps=8")
        assert code == 0, err
        code, out, err = _deltatune(tmp_path, f"run_name={name}", "--resume", "train.max_steps=12", *again)
        assert code == 0, err
        assert "resumed from step 8 of 12" in out
    straight = _weights(tmp_path / "runs" / "straight")
    for name in ("sharded", "alone"):
        resumed = _weights(tmp_path / "runs" / name)
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")


def test_an_in_process_launch_gives_the_signal_handlers_back(tmp_path, monkeypatch):
    """torchrun's agent takes over SIGINT and SIGTERM in the launching process; `--nproc` puts the caller's back, so
    Ctrl-C in a long-lived process that launched a run (a notebook, a test session) is a KeyboardInterrupt again."""
    import signal

    from deltatune.cli import main

    _workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    assert main(["train", "config.yaml", "run_name=in-process", "train.max_steps=2", "--nproc", "2"]) == 0
    assert {number: signal.getsignal(number) for number in before} == before


def _collectives_worker(index: int, port: int, out: str) -> None:
    """Gradients only some ranks have, and each rank's rest of a rollout through a checkpoint's tensors."""
    from deltatune.training.state import every_rank_steps, this_rank_steps

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.start("cpu")
    nowhere, rank_one_only = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    if index == 1:
        rank_one_only.grad = torch.full((2,), 4.0)
    loss, tokens = distributed.average_gradients([nowhere, rank_one_only], [float(index), 10.0])
    steps = [[{"input_ids": torch.full((1, 3), 10 * index + step)}] for step in range(2 + index)]
    restored = this_rank_steps(every_rank_steps(steps))
    result = {"nowhere": nowhere.grad is None, "averaged": rank_one_only.grad.tolist(), "extra": [loss, tokens],
              "restored": all(torch.equal(a[0]["input_ids"], b[0]["input_ids"]) for a, b in zip(restored, steps))
              and len(restored) == len(steps)}
    (Path(out) / f"rank{index}.json").write_text(json.dumps(result))
    distributed.stop()


def test_a_gradient_no_rank_has_stays_none_and_each_rank_gets_its_own_rollout_back(tmp_path):
    """As in one process, a parameter that no rank computed a gradient for keeps none (AdamW leaves it alone); one
    that some ranks have is averaged over all (zeros elsewhere). A checkpoint taken mid-rollout holds each rank's
    remaining steps, and each rank reads back its own; one process cannot continue a 2-rank rollout."""
    from deltatune.errors import UserError
    from deltatune.training.state import this_rank_steps

    torch.multiprocessing.spawn(_collectives_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for index in range(2):
        result = json.loads((tmp_path / f"rank{index}.json").read_text())
        assert result == {"nowhere": True, "averaged": [2.0, 2.0], "extra": [0.5, 10.0], "restored": True}
    two_ranks = {"0.0.input_ids": torch.zeros(1), "rank1.0.0.input_ids": torch.ones(1)}
    with pytest.raises(UserError, match=r"written in the middle of a rollout by 2 rank\(s\); resume it with --nproc 2"):
        this_rank_steps(two_ranks)


def test_the_last_rollout_draw_splits_evenly_over_the_ranks(monkeypatch):
    """37 prompts in rollouts of 16 on 2 ranks: the last draw of 5 keeps 4 (2 a rank), in the plan as in training."""
    from deltatune.config.schema import TrainConfig
    from deltatune.training.loop import plan_steps

    class Rollouts:
        rollout_size = 16

        def epoch_plan(self, num_examples, batch_size):
            return None

        def steps_per_rollout(self, rows, batch_size, accumulation):
            return -(-rows // batch_size)

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert plan_steps(37, TrainConfig(batch_size=4, epochs=1), Rollouts())[0] == 4 + 4 + 1  # 16, 16, 4 rows
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    assert plan_steps(37, TrainConfig(batch_size=4, epochs=1), Rollouts())[0] == 4 + 4 + 2  # 16, 16, 5 rows


def test_two_ranks_of_sft_take_the_steps_of_one_process_though_their_shares_hold_different_token_counts(tmp_path):
    """SFT's loss is a mean over response tokens, and two halves of a micro-batch hold different numbers of them:
    each rank's share is weighted by its tokens (not its rows), so the ranks' step is one process's step."""
    import yaml

    pairs = [{"prompt": f"what is {a} plus {b}", "response": f"{a + b}" + " so" * (a % 3)}
             for a in range(6) for b in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    config = {"model": {"name": "tests.tiny_models:tiny_chat_llama", "task": "causal-lm"},
              "data": {"name": "pairs.jsonl", "max_length": 32, "packing": False,
                       "split": {"validation": 0.1, "test": 0.1, "seed": 3}},
              "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
              "train": {"max_steps": 4, "batch_size": 6, "lr": 1.0e-2, "eval_every": 4, "save_every": 4,
                        "num_threads": 1, "progress": False, "seed": 5, "group_by_length": False},
              "output_dir": "runs"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        code, out, err = _deltatune(tmp_path, f"run_name={name}", *extra)
        assert code == 0, err
    one, two = _weights(tmp_path / "runs" / "one"), _weights(tmp_path / "runs" / "two")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("number, code, line", [(signal.SIGINT, 130, "interrupted; continue with --resume"),
                                                (signal.SIGTERM, 2, "error: this launcher received SIGTERM, which "
                                                                    "stopped every rank, which stopped the run before")])
def test_a_signal_to_the_launcher_ends_in_one_line(tmp_path, monkeypatch, capsys, number, code, line):
    """torchrun's agent turns Ctrl-C (and SIGTERM) of the launching process into its SignalException: Ctrl-C exits
    130 and is resumable as in one process, other signals are one line with where to continue."""
    import torch.distributed.launcher.api as launcher
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from deltatune.cli import main

    def signalled(*_, **__):
        def run(*_):
            raise SignalException(f"Process {os.getpid()} got signal: {number}", sigval=number)
        return run

    _workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launcher, "elastic_launch", signalled)
    assert main(["train", "config.yaml", "run_name=signalled", "--nproc", "2"]) == code
    assert capsys.readouterr().err.strip().startswith(line)
