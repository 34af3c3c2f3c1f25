"""The measurements of issue 14 (insight and strategy), one command each, on MiniLM-L6 / Rotten Tomatoes and the
SmolLM2 SFT run. Run alone on the machine (timings); every step skips what already exists.

    python benchmarks/insight.py reports    # deltatune report (+ forgetting) on full, LoRA, Houlsby, prompt, SmolLM2
    python benchmarks/insight.py layers     # LoRA on auto-selected 25% of blocks vs all blocks vs the last 25%
    python benchmarks/insight.py tune       # a 12-trial optuna study of the LoRA recipe, its best trial's test score
    python benchmarks/insight.py tune-narrow  # a second 12-trial study in the space the first one points to
    python benchmarks/insight.py tune-narrow-min3  # the same space under the three-finished-trials pruning rule
    python benchmarks/insight.py tune-narrow-patient  # ... and judging only trials that stopped improving
    python benchmarks/insight.py advise     # the advisor's predictions vs the real runs of three methods
    python benchmarks/insight.py table      # every figure above, as markdown

Forgetting: MiniLM runs are probed on chatterbot topic classification (text = the prompt, label = its category: a
task the Rotten Tomatoes runs never saw), the SmolLM2 chatterbot SFT run on the Rotten Tomatoes review SFT rows
(text it was not tuned on), each base against tuned (docs/insight.md says how).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

from _runs import RUNS, read_json, run_training

MINILM, LORA = "examples/minilm_rotten_tomatoes.yaml", "examples/minilm_rotten_tomatoes_lora.yaml"
SMOLLM2_SFT = "examples/smollm2_chatterbot_lora.yaml"
# The README methods table's recipes (benchmarks/minilm_methods.py), one run each.
REPORTED = {
    "full": (MINILM, ["method={name: full}", "train.epochs=3", "train.lr=1e-4"]),
    "lora": (LORA, []),
    "houlsby": (MINILM, ["method={name: adapter, placement: houlsby}", "train.epochs=3", "train.lr=3e-3"]),
    "prompt": (MINILM, ["method={name: prompt}", "train.epochs=1", "train.lr=1e-2"]),
    "smollm2-sft": (SMOLLM2_SFT, []),
}
FORGETTING = {"smollm2-sft": ["--forgetting", "rotten-tomatoes-reviews"]}
MINILM_FORGETTING = ["--forgetting", "chatterbot", "--forgetting-columns", "text=prompt", "label=category"]
LAYERS = {  # MiniLM has 6 blocks: 25% is ceil(1.5) = 2
    "auto-25": ["method.layers=auto", "method.layer_budget=0.25"],
    "all": [],
    "last-25": ["method.layers=[4, 5]"],
}
ADVISED = {"full": "full", "lora": "lora", "houlsby": "adapter"}  # report key -> advisor candidate


def deltatune(*arguments: str) -> None:
    command = [sys.executable, "-m", "deltatune.cli", *arguments]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def reports() -> None:
    for key, (config, overrides) in REPORTED.items():
        run_training(config, f"insight-{key}", overrides)
        if not (RUNS / f"insight-{key}" / "report" / "report.json").exists():
            deltatune("report", str(RUNS / f"insight-{key}"), *FORGETTING.get(key, MINILM_FORGETTING))


def layers() -> None:
    for key, overrides in LAYERS.items():
        run_training(LORA, f"insight-layers-{key}", overrides)


# study name -> the arguments of its `deltatune tune`: the default space, then the narrower one the first points to
STUDIES = {
    "insight-tune": [],
    "insight-tune-narrow": ["--space", "examples/search_spaces/minilm_lora_narrow.yaml", "--timeout", "5400"],
    # the same narrow space once the pruner judged only against three finished trials (tune.MIN_TRIALS_TO_JUDGE)
    "insight-tune-narrow-min3": ["--space", "examples/search_spaces/minilm_lora_narrow.yaml"],
    # and once it also judged only trials that stopped improving (tune.py: a still-rising trial runs on)
    "insight-tune-narrow-patient": ["--space", "examples/search_spaces/minilm_lora_narrow.yaml"],
}


def tune(study: str) -> None:
    deltatune("tune", LORA, f"run_name={study}", "--trials", "12", *STUDIES[study])
    best = json.loads((RUNS / f"tune-{study}" / "trials.json").read_text())
    finished = [t for t in best if t["state"] == "COMPLETE"]
    chosen = max(finished, key=lambda t: t["value"])
    print(f"best trial {chosen['number']}: {chosen['params']}; run {chosen['run_dir']}")


def advise() -> None:
    out = RUNS / "insight-advise.json"
    if not out.exists():
        from deltatune.advise import CANDIDATES, advise as run_advisor

        started = time.perf_counter()
        rows = run_advisor(MINILM, ["train.epochs=3"], candidates={name: CANDIDATES[name] for name in ADVISED.values()})
        out.write_text(json.dumps({"seconds": time.perf_counter() - started, "rows": rows}, indent=1))


def table() -> None:
    print("| run | method | test accuracy / perplexity | blocks most changed | CKA of the last block | forgetting |")
    print("|---|---|---|---|---|---|")
    for key in REPORTED:
        numbers = read_json(RUNS / f"insight-{key}" / "report" / "report.json")
        summary = read_json(RUNS / f"insight-{key}" / "summary.json")
        if not numbers:
            continue
        test = summary["after"]["test"]
        score = test.get("accuracy", test.get("perplexity"))
        per_block = (numbers.get("weights") or {}).get("per_block") or numbers["hidden_change"]
        top = sorted(range(len(per_block)), key=lambda i: -per_block[i])[:2]
        forgetting = numbers.get("forgetting", {})
        moved = ", ".join(f"{metric} {forgetting['base'][metric]:.4f} → {forgetting['tuned'][metric]:.4f}"
                          for metric in forgetting.get("base", {}))
        print(f"| {key} | {numbers['method']} | {score:.4f} | {top} | {numbers['cka']['diagonal'][-1]:.2f} | "
              f"{moved} |")
    print("\n| LoRA on | blocks | trainable parameters | train tok/s | validation accuracy | test accuracy |")
    print("|---|---|---|---|---|---|")
    for key in LAYERS:
        summary = read_json(RUNS / f"insight-layers-{key}" / "summary.json")
        if summary:
            given = [override.split("=", 1)[1] for override in LAYERS[key] if override.startswith("method.layers=")]
            blocks = summary.get("method_choices", {}).get("layers", given[0] if given else "all")
            print(f"| {key} | {blocks} | {summary['trainable_parameters']:,} | {summary['tokens_per_second']:.0f} | "
                  f"{summary['after']['validation']['accuracy']:.4f} | {summary['after']['test']['accuracy']:.4f} |")
    for study in STUDIES:
        tune_table(study)
    advised = read_json(RUNS / "insight-advise.json")
    if advised:
        print(f"\nadvisor: {advised['seconds']:.0f} s in all")
        print("| method | predicted time | real wall time (error) | predicted peak RSS | real peak RSS (error) |")
        print("|---|---|---|---|---|")
        for key, candidate in ADVISED.items():
            row = next(r for r in advised["rows"] if r["candidate"] == candidate)
            real = read_json(RUNS / f"insight-{key}" / "resources.json")
            wall, rss = real.get("wall_seconds", float("nan")), real.get("peak_rss_mib", float("nan"))
            print(f"| {candidate} | {row['predicted_seconds']:.0f} s | {wall:.0f} s "
                  f"({100 * (row['predicted_seconds'] / wall - 1):+.0f}%) | {row['peak_memory_bytes'] / 2**20:.0f} MiB | "
                  f"{rss:.0f} MiB ({100 * (row['peak_memory_bytes'] / 2**20 / rss - 1):+.0f}%) |")


def tune_table(study: str) -> None:
    """The study's best trial against the README LoRA recipe (runs/insight-lora), on validation and test."""
    path = RUNS / f"tune-{study}" / "trials.json"
    if not path.exists():
        return
    print(f"\nstudy {study}:")
    trials = json.loads(path.read_text())
    finished = [t for t in trials if t["state"] == "COMPLETE"]
    pruned = sum(t["state"] == "PRUNED" for t in trials)
    best = max(finished, key=lambda t: t["value"])
    print(f"\n{len(trials)} trials: {len(finished)} complete, {pruned} pruned; best: trial {best['number']}")
    print("| config | settings | validation accuracy | test accuracy |\n|---|---|---|---|")
    recipe = read_json(RUNS / "insight-lora" / "summary.json")
    if recipe:
        print(f"| README recipe | epochs 3, batch 32, lr 1e-3, r 8, alpha 16 | "
              f"{recipe['after']['validation']['accuracy']:.4f} | {recipe['after']['test']['accuracy']:.4f} |")
    # trial 0 is the recipe's own settings (deltatune tune starts there); the best searched trial is shown too
    searched = [t for t in finished if t["number"] != 0]
    rows = [("best trial", best)] + ([("best searched trial", max(searched, key=lambda t: t["value"]))]
                                     if searched and best["number"] == 0 else [])
    for label, trial in rows:
        found = read_json(Path(trial["run_dir"]) / "summary.json")
        settings = ", ".join(f"{key.split('.')[-1]} {value:.3g}" if isinstance(value, float) else
                             f"{key.split('.')[-1]} {value}" for key, value in trial["params"].items())
        print(f"| {label} ({trial['number']}) | {settings} | {found['after']['validation']['accuracy']:.4f} | "
              f"{found['after']['test']['accuracy']:.4f} |")


def main(argv: list[str]) -> None:
    studies = {study.removeprefix("insight-"): functools.partial(tune, study) for study in STUDIES}  # tune, tune-...
    actions = {"reports": reports, "layers": layers, **studies, "advise": advise, "table": table}
    if len(argv) != 1 or argv[0] not in actions:
        sys.exit(f"usage: python benchmarks/insight.py {'|'.join(actions)}")
    actions[argv[0]]()


if __name__ == "__main__":
    main(sys.argv[1:])
