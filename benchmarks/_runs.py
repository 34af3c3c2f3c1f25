"""What the benchmark scripts share: one training run through the CLI, kept when finished, and reading a summary."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = Path("runs")


def run_training(config: str, run_name: str, overrides: list[str]) -> None:
    """`deltatune train CONFIG run_name=RUN_NAME OVERRIDES...` in runs/RUN_NAME; a finished run (summary.json) is
    kept, not redone."""
    if (RUNS / run_name / "summary.json").exists():
        print(f"runs/{run_name} is finished; skipping")
        return
    command = [sys.executable, "-m", "deltatune.cli", "train", config, f"run_name={run_name}", "train.progress=false",
               *overrides]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"runs/{run_name}: {time.perf_counter() - started:.0f} s", flush=True)


def read_json(path: Path) -> dict:
    """A JSON file's contents, {} when it does not exist (a run not made yet)."""
    return json.loads(path.read_text()) if path.exists() else {}
