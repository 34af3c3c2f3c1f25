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

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
model: {name: 'tests.tiny_models:tiny_bert', task: classification}
data: {name: data.jsonl, max_length: 16, split: {validation: 0.2, test: 0.2, seed: 3}}
method: {name: full}
train:
  max_steps: 240
  batch_size: 4
  gradient_accumulation: 2
  lr: 1.0e-3
  eval_every: 20
  save_every: 10
  log_every: 5
  num_threads: 1
  progress: false
  seed: 5
output_dir: runs
"""


def start(workdir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "deltatune", "train", "config.yaml", *extra], cwd=workdir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "weights" / "model.safetensors")


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    words = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "actor", "scene"]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(80):
        picks = torch.randint(0, len(words), (6,), generator=generator).tolist()
        text = " ".join(words[j] for j in picks)
        rows.append({"text": text, "label": int(sum(j < 3 for j in picks) > sum(3 <= j < 6 for j in picks))})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.yaml").write_text(CONFIG)

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
