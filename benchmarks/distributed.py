"""Data-parallel runs on this 2-core machine against one process with the same global batch (issue 15). Both ranks
share the same two cores, so this checks that `--nproc` trains the same model at a comparable speed, not that it
scales: on CPU each rank gets one core (OMP_NUM_THREADS = cores / ranks) where the single process gets both.

    python benchmarks/distributed.py train     # MiniLM/RT LoRA, 1 epoch; SmolLM2 LoRA SFT, 30 steps; 1 vs 2 processes;
                                               # SmolLM2 full FT, 10 steps, 2 ranks ddp vs fsdp
    python benchmarks/distributed.py table

Run alone on the machine (timings). Every run is a normal run directory under runs/ (`dist-*`); finished ones are
skipped.
"""

from __future__ import annotations

import sys

from _runs import RUNS, read_json, run_training

WORKLOADS = {
    "minilm-lora": ("examples/minilm_rotten_tomatoes_lora.yaml", ["train.epochs=1"], "accuracy"),
    "smollm2-lora-sft": ("examples/smollm2_chatterbot_lora.yaml", ["train.max_steps=30", "train.eval_every=30"],
                         "perplexity"),
}
LAYOUTS = {"1-process": [], "2-ranks-ddp": ["--nproc", "2"]}
# Full fine-tuning of SmolLM2 on 2 ranks, whole copies (ddp) against shards (fsdp): same losses, half the
# parameter bytes per rank.
SHARDED = ("examples/smollm2_chatterbot_sft.yaml",
           ["method={name: full}", "train.max_steps=10", "train.eval_every=10", "train.log_every=1"])
SHARDED_LAYOUTS = {"2-ranks-ddp": ["--nproc", "2"], "2-ranks-fsdp": ["--nproc", "2", "train.distributed=fsdp"]}


def train() -> None:
    for key, (config, overrides, _) in WORKLOADS.items():
        for layout, flags in LAYOUTS.items():
            run_training(config, f"dist-{key}-{layout}", [*overrides, *flags])
    for layout, flags in SHARDED_LAYOUTS.items():
        run_training(SHARDED[0], f"dist-smollm2-full-{layout}", [*SHARDED[1], *flags])


def sharded_table() -> None:
    print("\n| SmolLM2 full FT, 10 steps | train loss by step | validation perplexity | parameter MiB per rank | "
          "peak RSS MiB (largest process) |")
    print("|---|---|---|---|---|")
    for layout in SHARDED_LAYOUTS:
        run = RUNS / f"dist-smollm2-full-{layout}"
        summary, resources = read_json(run / "summary.json"), read_json(run / "resources.json")
        if not summary:
            continue
        import json

        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open() if '"train"' in line]
        print(f"| {layout} | {' '.join(f'{loss:.3f}' for loss in losses)} | "
              f"{summary['after']['validation']['perplexity']:.3f} | "
              f"{summary['parameter_bytes_per_rank'] / 2**20:.0f} | {resources.get('peak_rss_mib', float('nan')):.0f} |")


def table() -> None:
    print("| workload | layout | train tok/s (all ranks) | wall s | peak RSS MiB (largest process) | validation | test |")
    print("|---|---|---|---|---|---|---|")
    for key, (_, _, metric) in WORKLOADS.items():
        for layout in LAYOUTS:
            run = RUNS / f"dist-{key}-{layout}"
            summary, resources = read_json(run / "summary.json"), read_json(run / "resources.json")
            if not summary:
                continue
            after = summary["after"]
            print(f"| {key} | {layout} | {summary['tokens_per_second']:.0f} | {resources.get('wall_seconds', 0):.0f} | "
                  f"{resources.get('peak_rss_mib', float('nan')):.0f} | {metric} {after['validation'][metric]:.4f} | "
                  f"{after['test'][metric]:.4f} |")
    sharded_table()


def main(argv: list[str]) -> None:
    actions = {"train": train, "table": table}
    if len(argv) != 1 or argv[0] not in actions:
        sys.exit(f"usage: python benchmarks/distributed.py {'|'.join(actions)}")
    actions[argv[0]]()


if __name__ == "__main__":
    main(sys.argv[1:])
