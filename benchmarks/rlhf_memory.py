"""Peak memory of preference training on SmolLM2-135M (issue 12's memory goals), each case in its own process.

    python benchmarks/rlhf_memory.py            # prints a markdown table; about 4 minutes on 2 cores

Cases, all on the same 200 training pairs of rotten-tomatoes-pairs, 6 optimizer steps, no evaluation:
- sft-lora:  LoRA SFT on both halves of each pair as ordinary rows, 16 rows a batch (the 8 pairs of a DPO batch);
- dpo-lora:  LoRA DPO, 8 pairs a batch, the reference = the policy with its adapters switched off;
- dpo-full:  full fine-tuning DPO: the reference is a frozen copy of the base, held in memory while training;
- dpo-full-precomputed: the same with `objective.precompute_reference: true`: the copy computes the reference
  log-probabilities once, is released, and training runs without it.
The figure is the peak resident set size during the training steps (Linux: the high-water mark is reset by
/proc/self/clear_refs just before the first step), so loading and precomputing do not count; the process's
overall peak is shown beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "sft-lora": ["objective.name=sft", "model.task=causal-lm", "method.name=lora", "train.batch_size=16"],
    "dpo-lora": ["objective.name=dpo", "method.name=lora", "train.batch_size=8"],
    "dpo-full": ["objective.name=dpo", "method.name=full", "train.batch_size=8"],
    "dpo-full-precomputed": ["objective.name=dpo", "method.name=full", "train.batch_size=8",
                             "objective.precompute_reference=true"],
}
COMMON = ["model.name=smollm2-135m", "data.max_length=128", "data.max_examples=200", "data.split.validation=0",
          "data.split.test=0", "train.max_steps=6", "train.group_by_length=false", "train.progress=false",
          "train.lr=1e-5"]


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(case: str, workdir: Path) -> None:
    from deltatune.config.loader import load_config
    from deltatune.runner import train
    from deltatune.training.loop import TrainingLoop

    overrides = [*COMMON, *CASES[case], f"output_dir={workdir}", f"run_name={case}"]
    if case.startswith("sft"):
        overrides[overrides.index("data.max_examples=200")] = "data.max_examples=400"
        overrides.append(f"data.name={sft_rows(workdir)}")
    else:
        overrides.append("data.name=rotten-tomatoes-pairs")
    real_run = TrainingLoop.run

    def measured_run(self):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: from here on, training only
        return real_run(self)

    TrainingLoop.run = measured_run
    train(load_config(None, overrides), echo=lambda *_: None)
    print(json.dumps({"training_peak_mib": memory_kib("VmHWM") / 1024}))


def sft_rows(workdir: Path) -> str:
    """The first 200 training pairs' halves as SFT rows (prompt, chosen) then (prompt, rejected)."""
    from deltatune.config.schema import DataConfig
    from deltatune.data import load_rows

    rows = load_rows(DataConfig(name="rotten-tomatoes-pairs"))[:200]
    path = workdir / "halves.jsonl"
    path.write_text("".join(json.dumps({"prompt": row["prompt"], "response": row[half]}) + "\n"
                            for row in rows for half in ("chosen", "rejected")))
    return str(path)


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for case in CASES:
            done = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, __file__, "--child", case, workdir],
                                  capture_output=True, text=True, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            figures["process_peak_mib"] = int(done.stderr.strip().splitlines()[-1]) / 1024
            results[case] = figures
            print(case, figures, file=sys.stderr, flush=True)
    base = results["sft-lora"]["training_peak_mib"]
    print("| case | peak RSS while training (MiB) | vs LoRA SFT | process peak (MiB) |")
    print("|---|---|---|---|")
    for case, figures in results.items():
        print(f"| {case} | {figures['training_peak_mib']:.0f} | {figures['training_peak_mib'] / base:.2f}x | "
              f"{figures['process_peak_mib']:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
