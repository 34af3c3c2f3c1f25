"""`deltatune advise CONFIG [--memory 8GB] [--time 1h]`: which method fits this machine, measured rather than guessed.

Each candidate method runs in its own process (so each one's peak memory is its own) on the config's model and data:
it builds the run as `deltatune train` would, takes WARMUP optimizer steps, then times TIMED steps spread over the
epoch's batch order (so long and short batches are both represented) and a few validation batches. From those it
predicts the full run: train time = mean step time × the run's optimizer steps; evaluation time = time per
validation example × the examples every evaluation, the before/after measurements and the test split read; peak
memory = the probe's peak RSS (on CUDA, the peak allocated) with the run's longest batch among its steps, plus what a
checkpoint serialises (the trainable weights and AdamW's two moments). Quality relative to full fine-tuning comes from the
MiniLM-L6 / Rotten Tomatoes table measured for the README (shipped here, labelled as such); it is a prior from
one task, not a promise for this one. The table is ranked: methods within the budget first, then by that expected
quality, then by predicted time.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from deltatune.errors import UserError

WARMUP, TIMED, EVAL_BATCHES = 2, 4, 3
# Candidate -> overrides of the config's method section. Replacing the section whole keeps a config's own
# method options (r=, placement=) from being refused by another method's strict parser.
CANDIDATES: dict[str, str] = {
    "full": "method={name: full}",
    "freeze-last-2": "method={name: freeze, last_n_blocks: 2}",
    "bitfit": "method={name: bitfit}",
    "lora": "method={name: lora, r: 8, lora_alpha: 16}",
    "qlora": "method={name: qlora, r: 8, lora_alpha: 16}",
    "adapter": "method={name: adapter, placement: houlsby}",
    "prefix": "method={name: prefix}",
    "prompt": "method={name: prompt}",
}
# Test accuracy minus full fine-tuning's (0.8290), MiniLM-L6 on Rotten Tomatoes, docs/benchmarks.md's methods table.
MEASURED_ON_MINILM_RT: dict[str, float] = {
    "full": 0.0, "freeze-last-2": -3.4, "bitfit": -6.4, "lora": +0.5, "qlora": +1.3, "adapter": -0.7,
    "prefix": -5.1, "prompt": -10.6,
}
UNITS = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40, "s": 1, "m": 60, "min": 60, "h": 3600}


def parse_amount(text: str | None, kind: str) -> float | None:
    """'8GB' -> bytes, '1h' / '90m' / '30s' -> seconds; a UserError for anything else."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    allowed = ("b", "kb", "mb", "gb", "tb") if kind == "memory" else ("s", "m", "min", "h")
    if not match or match.group(2).lower() not in allowed or float(match.group(1)) <= 0:
        example = "8GB or 512MB" if kind == "memory" else "1h, 90m or 600s"
        raise UserError(f"--{kind} {text!r} is not a positive amount; write it like {example}")
    return float(match.group(1)) * UNITS[match.group(2).lower()]


def advise(config_path: str, overrides: list[str], memory: str | None = None, time_budget: str | None = None,
           candidates: dict[str, str] | None = None, echo=print) -> list[dict[str, Any]]:
    """Probe every candidate, print the ranked table, return its rows."""
    memory_bytes, seconds = parse_amount(memory, "memory"), parse_amount(time_budget, "time")
    from deltatune.config.loader import load_config

    load_config(config_path, overrides)  # a broken config fails here, once, not in every probe
    rows = []
    for name, method in (candidates or CANDIDATES).items():
        started = time.perf_counter()
        row = _probe_in_subprocess(config_path, [*overrides, method])
        row.update(candidate=name, probe_seconds=round(time.perf_counter() - started, 1),
                   expected_vs_full=MEASURED_ON_MINILM_RT.get(name))
        if "error" not in row:
            row["fits"] = ((memory_bytes is None or row["peak_memory_bytes"] <= memory_bytes)
                           and (seconds is None or row["predicted_seconds"] <= seconds))
        rows.append(row)
    ranked = sorted(rows, key=_rank)
    echo(table(ranked, memory, time_budget))
    if (memory_bytes or seconds) and not any(row.get("fits") for row in rows):
        raise UserError(f"no method fits {' and '.join(b for b in (memory, time_budget) if b)} for this config; "
                        "the table above shows what each needs (raise the budget, or shorten the run)")
    return ranked


def _rank(row: dict[str, Any]) -> tuple:
    if "error" in row:
        return (2, 0.0, 0.0)
    quality = row["expected_vs_full"]
    return (0 if row["fits"] else 1, -(quality if quality is not None else -99.0), row["predicted_seconds"])


def _probe_in_subprocess(config_path: str, overrides: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "deltatune.advise", config_path, *overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode < 0:  # killed by a signal: SIGKILL is what the kernel's out-of-memory killer sends
        return {"error": f"the probe was killed by signal {-done.returncode}"
                         + (" (out of memory?)" if -done.returncode == 9 else "")}
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["the probe printed nothing"])[-1]
        return {"error": last.removeprefix("error: ")}
    return json.loads(lines[-1])


def table(rows: list[dict[str, Any]], memory: str | None, time_budget: str | None) -> str:
    lines = ["| rank | method | trainable parameters | s/step (measured) | predicted total | peak memory | "
             "expected vs full (MiniLM/RT table) | fits budget |", "|---|---|---|---|---|---|---|---|"]
    for rank, row in enumerate(rows, 1):
        if "error" in row:
            lines.append(f"| {rank} | {row['candidate']} | – | – | – | – | – | not possible: {row['error']} |")
            continue
        quality = row["expected_vs_full"]
        lines.append(
            f"| {rank} | {row['candidate']} | {row['trainable_parameters']:,} | {row['step_seconds']:.3f} | "
            f"{_duration(row['predicted_seconds'])} | {row['peak_memory_bytes'] / 2**20:,.0f} MiB | "
            f"{'n/a' if quality is None else f'{quality:+.1f} points'} | "
            f"{'yes' if row['fits'] else 'no'}{'' if memory or time_budget else ' (no budget given)'} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


# ---- the probe (runs in the subprocess) ------------------------------------------------------------------------
def probe(config_path: str, overrides: list[str]) -> dict[str, Any]:
    """Measure one method on the config's model and data (see the module docstring)."""
    import tempfile

    import torch

    from deltatune.config.loader import load_config
    from deltatune.runner import calibrate, count_parameters, prepare
    from deltatune.runs import setup_objective
    from deltatune.training.loop import Batches, TrainingLoop, evaluate, set_train_mode
    from deltatune.training.run_dir import RunDir

    config = load_config(config_path, overrides)
    prepared = prepare(config)
    setup_objective(prepared.config, prepared.objective, prepared.model, prepared.method, prepared.device,
                    prepared.num_labels, prepared.processor, prepared.data.label_names)
    calibrate(prepared)
    data, train_config = prepared.data, prepared.config.train
    training = Batches(data.train, data.collate, train_config.group_by_length)
    with tempfile.TemporaryDirectory() as scratch:  # the loop wants a run directory; steps write nothing
        loop = TrainingLoop(prepared.model, prepared.method, prepared.objective, training, None, train_config,
                            RunDir(scratch), prepared.device)
    set_train_mode(prepared.model)
    groups = loop.epoch_groups()
    spread = sorted({round(i * (len(groups) - 1) / max(1, TIMED - 1)) for i in range(TIMED)})
    # The longest batch goes first among the warm-up steps: the run's activation peak is then part of the probe's.
    longest = max(range(len(groups)), key=lambda index: _padded_tokens(groups[index], training))
    for group in [groups[longest], *groups[:WARMUP - 1]]:
        loop.optimizer_step(group)
    step_times = []
    _synchronize(prepared.device)
    for index in spread:
        started = time.perf_counter()
        loop.optimizer_step(groups[index])
        _synchronize(prepared.device)  # CUDA runs asynchronously: the step is done when its kernels are
        step_times.append(time.perf_counter() - started)
    validation = data.validation or data.test
    sample = validation[: EVAL_BATCHES * train_config.eval_batch_size]
    split = "validation" if data.validation else "test"  # what an objective drawing its own rows evaluates on
    warm_up = sample[: train_config.eval_batch_size]  # untimed: first-call costs are not paid by every evaluation
    evaluate(prepared.model, prepared.objective, Batches(warm_up, data.collate, split=split), train_config,
             prepared.device)
    started = time.perf_counter()
    evaluate(prepared.model, prepared.objective, Batches(sample, data.collate, split=split), train_config,
             prepared.device)
    per_example = (time.perf_counter() - started) / max(1, len(sample))
    evaluations = max(1, math.ceil(loop.total_steps / loop.eval_every))  # the loop also evaluates at its last step
    read = evaluations * len(data.validation) + 2 * (len(data.validation) + len(data.test))
    step_seconds = statistics.mean(step_times)
    trainable, total = count_parameters(prepared.model)
    # A checkpoint serialises the trainable weights and AdamW's two moments beside the live ones (fp32).
    checkpoint_bytes = 3 * 4 * trainable
    return {"trainable_parameters": trainable, "total_parameters": total, "step_seconds": step_seconds,
            "total_steps": loop.total_steps,
            "predicted_seconds": step_seconds * loop.total_steps + per_example * read,
            "peak_memory_bytes": _peak_memory(prepared.device) + checkpoint_bytes}


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _padded_tokens(group: list[Any], data: Any) -> int:
    """Tokens a step's micro-batches pad to (0 for inputs without token ids, e.g. images)."""
    from deltatune.training.batches import example_length

    total = 0
    for indices in group:
        lengths = [example_length(data.examples[i]) or 0 for i in indices] if isinstance(indices, list) else [0]
        total += max(lengths, default=0) * len(lengths)
    return total


def _peak_memory(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def main(argv: list[str]) -> int:
    """The probe's entry point: `python -m deltatune.advise CONFIG OVERRIDES...` prints one JSON line."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        print(json.dumps(probe(argv[0], argv[1:])))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
