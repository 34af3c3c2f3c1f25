"""What the benchmark scripts share: one training run through the CLI, kept when finished, and reading a summary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNS = Path("runs")


def run_training(config: str, run_name: str, overrides: list[str]) -> None:
    """`deltatune train CONFIG run_name=RUN_NAME OVERRIDES...` in runs/RUN_NAME; a finished run (summary.json) is
    kept, not redone. The whole command's wall time and peak RSS (GNU time, where installed) go to
    runs/RUN_NAME/resources.json."""
    if (RUNS / run_name / "summary.json").exists():
        print(f"runs/{run_name} is finished; skipping")
        return
    command = [sys.executable, "-m", "deltatune.cli", "train", config, f"run_name={run_name}", "train.progress=false",
               *overrides]
    print(" ".join(command), flush=True)
    measured = RUNS / f".{run_name}.resources"
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    started = time.perf_counter()
    subprocess.run([timer, "-f", "%e %M", "-o", str(measured), *command] if timer else command, check=True)
    wall = time.perf_counter() - started
    resources = {"wall_seconds": round(wall, 1)}
    if measured.exists():
        resources["peak_rss_mib"] = round(int(measured.read_text().split()[-1]) / 1024, 1)
        measured.unlink()
    (RUNS / run_name / "resources.json").write_text(json.dumps(resources))
    print(f"runs/{run_name}: {wall:.0f} s", flush=True)


def read_json(path: Path) -> dict:
    """A JSON file's contents, {} when it does not exist (a run not made yet)."""
    return json.loads(path.read_text()) if path.exists() else {}
