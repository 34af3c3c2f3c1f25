"""Kill a real training process mid-run, resume it, and end with exactly the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import tiny_classification_run

REPO = Path(__file__).resolve().parents[1]



def start(workdir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "deltatune", "train", "config.yaml", *extra], cwd=workdir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "weights" / "model.safetensors")


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    tiny_classification_run(tmp_path)

    reference = start(tmp_path, "run_name=reference")
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err

    victim = start(tmp_path, "run_name=victim")
    checkpoints = tmp_path / "runs" / "victim" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints.exists() and any(checkpoints.glob("step-*"))):
        time.sleep(0.01)
    time.sleep(0.3)  # let it run on past the first checkpoint, so the kill lands mid-training
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "runs" / "victim" / "weights" / "model.safetensors").exists(), "killed too late"
    steps_done = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert steps_done and steps_done[-1] < 240

    resumed = start(tmp_path, "run_name=victim", "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed from step {steps_done[-1]}" in out

    expected, got = final_weights(tmp_path / "runs" / "reference"), final_weights(tmp_path / "runs" / "victim")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    logged = [json.loads(line)["step"] for line in (tmp_path / "runs" / "victim" / "metrics.jsonl").open()
              if json.loads(line)["type"] == "train"]
    assert logged == sorted(set(logged)), "metrics of the killed run must not be duplicated after resume"


# In-process runs on a schedule that does not depend on the step budget, so a run extended from 3 to 6 steps must
# match one that took 6 steps at once, bit for bit.
SHORT = """
model: {name: 'tests.tiny_models:tiny_bert', task: classification}
data: {name: data.jsonl, max_length: 16, split: {validation: 0.2, test: 0.2, seed: 3}}
train: {max_steps: 3, batch_size: 4, lr: 1.0e-3, schedule: constant, warmup_steps: 0, save_every: 2, log_every: 1,
        num_threads: 1, progress: false, seed: 5}
output_dir: runs
"""


def short_workspace(root: Path) -> None:
    rows = [{"text": f"word{i % 7} film{i % 3} plot", "label": i % 2} for i in range(40)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "config.yaml").write_text(SHORT)


def last_checkpoint_weights(run: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    return load_file(newest / "model.safetensors")


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resume_extends_a_finished_run_from_its_last_step(tmp_path, monkeypatch, capsys):
    from deltatune.cli import main

    monkeypatch.chdir(tmp_path)
    short_workspace(tmp_path)
    assert main(["train", "config.yaml", "run_name=straight", "train.max_steps=6"]) == 0
    assert main(["train", "config.yaml", "run_name=extended"]) == 0
    capsys.readouterr()
    # No run_name: --resume finds the run by its config, the step budget aside; flags may come before overrides.
    assert main(["train", "config.yaml", "--resume", "train.max_steps=6"]) == 0
    assert "resumed from step 3 of 6" in capsys.readouterr().out
    run = tmp_path / "runs" / "extended"
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open() if '"train"' in line]
    assert logged == [1, 2, 3, 4, 5, 6]
    assert "max_steps: 6" in (run / "config.yaml").read_text()  # a later --resume continues to the new budget
    assert_same_weights(last_checkpoint_weights(tmp_path / "runs" / "straight"), last_checkpoint_weights(run))


def ctrl_c_after_step(monkeypatch, step: int):
    """Make the training loop receive Ctrl-C (a real SIGINT) right after optimizer step `step`; returns the loop's
    own `_after_step`, to put back for the resumed run."""
    from deltatune.training.loop import TrainingLoop

    real_after_step = TrainingLoop._after_step

    def interrupted(self, loss, stats):
        real_after_step(self, loss, stats)
        if self.state.step == step:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(TrainingLoop, "_after_step", interrupted)
    return real_after_step


def test_ctrl_c_exits_130_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    from deltatune.cli import main
    from deltatune.training.loop import TrainingLoop

    monkeypatch.chdir(tmp_path)
    short_workspace(tmp_path)
    assert main(["train", "config.yaml", "run_name=reference", "train.max_steps=6"]) == 0
    real_after_step = ctrl_c_after_step(monkeypatch, 5)
    capsys.readouterr()
    assert main(["train", "config.yaml", "run_name=victim", "train.max_steps=6"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted; continue with --resume"]
    run = tmp_path / "runs" / "victim"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    monkeypatch.setattr(TrainingLoop, "_after_step", real_after_step)
    assert main(["train", "config.yaml", "run_name=victim", "train.max_steps=6", "--resume"]) == 0
    assert "resumed from step 4 of 6" in capsys.readouterr().out
    assert_same_weights(final_weights(tmp_path / "runs" / "reference"), final_weights(run))


def test_resume_after_ctrl_c_before_the_first_checkpoint_logs_each_step_once(tmp_path, monkeypatch, capsys):
    from deltatune.cli import main
    from deltatune.training.loop import TrainingLoop

    monkeypatch.chdir(tmp_path)
    short_workspace(tmp_path)
    real_after_step = ctrl_c_after_step(monkeypatch, 1)
    assert main(["train", "config.yaml", "run_name=early", "train.max_steps=4"]) == 130
    run = tmp_path / "runs" / "early"
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    monkeypatch.setattr(TrainingLoop, "_after_step", real_after_step)
    assert main(["train", "config.yaml", "run_name=early", "train.max_steps=4", "--resume"]) == 0
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open() if '"train"' in line]
    assert logged == sorted(set(logged)) and logged[-1] == 4  # the killed attempt's step 1 is not logged twice
