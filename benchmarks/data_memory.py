"""Data larger than memory (issue 15): peak RSS of the same run over a 2,000,000-row and a 20,000-row jsonl.

    python benchmarks/data_memory.py [--rows 2000000] [--small 20000] [--skip-in-memory]

The rows are Rotten Tomatoes snippets (the embedded alias) cycled, each with its row number appended so no two rows
are the same. The run: MiniLM-L6 LoRA (examples/minilm_rotten_tomatoes_lora.yaml), 30 optimizer steps, validation
and test 0.1% of the rows each (2,000 rows at 2M, so evaluation stays short). Each run is its own process; its peak
RSS is the kernel's ru_maxrss for that process (os.wait4). Per size: the first run with the on-disk example cache
(it reads the file in chunks and writes the store), a second one (it reuses the store), and, for contrast, the
in-memory path (`data.cache=false`, every row and example a Python object) unless --skip-in-memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "data-memory"
CONFIG = "examples/minilm_rotten_tomatoes_lora.yaml"


def write_rows(rows: int) -> Path:
    """The jsonl of `rows` rows (kept between runs of this script)."""
    from deltatune.data.aliases import ALIASES

    path = WORK / f"reviews-{rows}.jsonl"
    if path.is_file():
        return path
    source = ALIASES["rotten-tomatoes"].loader()
    WORK.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("w") as file:
        for index in range(rows):
            row = source[index % len(source)]
            file.write(json.dumps({"text": f"{row['text']} ({index})", "label": row["label"]}) + "\n")
    partial.rename(path)
    return path


def run(path: Path, rows: int, cache: bool, attempt: str) -> dict:
    name = f"data-memory-{rows}-{'cache' if cache else 'memory'}-{attempt}"
    command = [sys.executable, "-m", "deltatune.cli", "train", CONFIG, f"data.name={path}",
               "data.split.validation=0.001", "data.split.test=0.001", f"data.cache={str(cache).lower()}",
               "train.max_steps=30", "train.eval_every=1000", "train.progress=false", f"run_name={name}",
               f"output_dir={WORK / 'runs'}"]
    env = {**os.environ, "DELTATUNE_CACHE": str(WORK / "cache")}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    error = process.stderr.read().decode()[-2000:] if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{error}")
    summary = json.loads((WORK / "runs" / name / "summary.json").read_text())
    accuracy = summary["after"]["test"].get("accuracy")
    return {"rows": rows, "cache": cache, "attempt": attempt, "seconds": round(seconds, 1),
            "peak_mib": round(usage.ru_maxrss / 1024, 1), "test_accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--skip-in-memory", action="store_true")
    args = parser.parse_args()
    import shutil

    shutil.rmtree(WORK / "cache", ignore_errors=True)
    shutil.rmtree(WORK / "runs", ignore_errors=True)
    results = []
    for rows in (args.small, args.rows):
        path = write_rows(rows)
        for cache, attempt in ((True, "first"), (True, "second"), (False, "first")):
            if cache or not args.skip_in_memory:
                results.append(run(path, rows, cache, attempt))
                print(json.dumps(results[-1]), flush=True)
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    peak = {(r["rows"], r["cache"], r["attempt"]): r["peak_mib"] for r in results}
    print(f"\n| rows | data path | run | wall s | peak RSS MiB |\n|---|---|---|---|---|")
    for r in results:
        path = "on-disk cache" if r["cache"] else "in memory"
        print(f"| {r['rows']:,} | {path} | {r['attempt']} | {r['seconds']} | {r['peak_mib']} |")
    for attempt in ("first", "second"):
        ratio = peak[(args.rows, True, attempt)] / peak[(args.small, True, attempt)]
        print(f"peak RSS {args.rows:,} / {args.small:,} rows, cached, {attempt} run: {ratio:.2f}x (goal ≤ 1.5x)")


if __name__ == "__main__":
    main()
