"""Self-training with 5% of the training labels (issue 13): EfficientNet-Lite0 on MNIST-5k and MiniLM-L6 on Rotten
Tomatoes, each against the same model trained on the 5% alone, over several training seeds.

    python benchmarks/self_training.py train [mnist|rt ...] [--seeds 0,1,2]   # both arms (runs/semi-KEY-ARM-seedN)
    python benchmarks/self_training.py table [--seeds 0,1,2]                  # every round, every seed, the means

`data.labelled_fraction=0.05` keeps a seeded, class-stratified 5% of the train split's labels and hides the rest
(validation and test keep theirs, so model selection and the final score use the same rows in both arms); the
labelled rows are the same for every seed (they follow `data.split.seed`), `train.seed` changes the head's
initialisation and the batch order. Both arms run the `self_training` objective with the same micro-batches and
evaluations, and a cosine learning rate that decays to ~0 once per round (`train.restart_schedule_each_epoch`):
- labels alone: one round of ROUNDS x BATCHES micro-batches on the labelled rows, evaluated every BATCHES, best kept;
- self-training: ROUNDS rounds of BATCHES micro-batches; before each round after the first, the model labels the
  unlabelled rows and keeps the pseudo-labels above the confidence threshold; stops after `patience` rounds without
  a better validation score.
  Whether a round trains on from the previous round's weights or from the starting ones (`restart`) is the
  setting's choice, made on validation: a restarted EfficientNet round of 120 batches is one pass over its ~3,600
  rows, too few to relearn from the ImageNet weights, so MNIST trains on.
BATCHES is where the labels-alone curve peaks: a first round shorter than that hands the next one pseudo-labels
from an undertrained model.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field

from _runs import RUNS, read_json, run_training


@dataclass(frozen=True)
class Setting:
    config: str
    rounds: int
    batches: int  # micro-batches per round
    shared: list[str]  # overrides of both arms
    self_training: list[str] = field(default_factory=list)  # overrides of the self-training arm
    patience: int = 1  # rounds without a better validation score before self-training stops


SHARED = ["objective.name=self_training", "data.labelled_fraction=0.05", "train.schedule=cosine",
          "train.restart_schedule_each_epoch=true", "train.warmup_steps=0"]
SETTINGS = {
    "mnist": Setting("examples/efficientnet_mnist.yaml", 5, 120, [
        "method.name=freeze", "method.last_n_blocks=4", "train.lr=1e-3"],
        ["objective.restart=false", "objective.confidence=0.9"], patience=2),
    "rt": Setting("examples/self_training_rotten_tomatoes.yaml", 3, 240, [],
                  ["objective.restart=true", "objective.confidence=0.9"]),
}
ARMS = ("alone", "self-training")


def arm_overrides(setting: Setting, arm: str) -> list[str]:
    # Both arms stop after `patience` evaluations without a better validation score (one evaluation per round).
    if arm == "alone":
        return ["objective.rounds=1", f"objective.batches_per_round={setting.rounds * setting.batches}",
                f"train.eval_every={setting.batches}", f"objective.patience={setting.patience}"]
    return [f"objective.rounds={setting.rounds}", f"objective.batches_per_round={setting.batches}",
            f"objective.patience={setting.patience}", *setting.self_training]


def run_name(key: str, arm: str, seed: int) -> str:
    return f"semi-{key}-{arm}-seed{seed}"


def train(keys: list[str], seeds: list[int]) -> None:
    for key in keys:
        setting = SETTINGS[key]
        for seed in seeds:
            for arm in ARMS:
                run_training(setting.config, run_name(key, arm, seed),
                             [*SHARED, *setting.shared, *arm_overrides(setting, arm), f"train.seed={seed}"])


def test_accuracy(key: str, arm: str, seed: int) -> float | None:
    summary = read_json(RUNS / run_name(key, arm, seed) / "summary.json")
    return summary["after"]["test"]["accuracy"] if summary else None


def rounds_table(key: str, seed: int) -> None:
    print(f"\n{key}, seed {seed}:\n| arm | round | pseudo-labels kept | their accuracy | validation accuracy |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        records = [json.loads(line) for line in (RUNS / run_name(key, arm, seed) / "metrics.jsonl").open()]
        evaluations = [r for r in records if r["type"] == "eval"]
        for record in (r for r in records if r["type"] == "round"):
            after = [e["accuracy"] for e in evaluations if e["step"] >= record["step"]]
            accuracy = record.get("pseudo_accuracy")
            print(f"| {arm} | {record['round']} | {record.get('pseudo_labels', 0):,} | "
                  f"{'-' if accuracy is None else format(accuracy, '.4f')} | "
                  f"{' / '.join(f'{a:.4f}' for a in after[:1 if arm != 'alone' else None])} |")


def table(seeds: list[int]) -> None:
    for key in SETTINGS:
        done = [seed for seed in seeds if all(test_accuracy(key, arm, seed) is not None for arm in ARMS)]
        if not done:
            continue
        for seed in done:
            rounds_table(key, seed)
        print(f"\n{key}: test accuracy by seed\n| seed | labels alone | self-training | gain (points) |\n|---|---|---|---|")
        gains = []
        for seed in done:
            alone, self_trained = (test_accuracy(key, arm, seed) for arm in ARMS)
            gains.append(100 * (self_trained - alone))
            print(f"| {seed} | {alone:.4f} | {self_trained:.4f} | {gains[-1]:+.1f} |")
        means = [statistics.mean(test_accuracy(key, arm, seed) for seed in done) for arm in ARMS]
        print(f"| mean | {means[0]:.4f} | {means[1]:.4f} | {statistics.mean(gains):+.1f} "
              f"(min {min(gains):+.1f}) |")


def main(argv: list[str]) -> None:
    seeds = [0]
    if "--seeds" in argv:
        at = argv.index("--seeds")
        seeds = [int(seed) for seed in argv[at + 1].split(",")]
        argv = argv[:at] + argv[at + 2:]
    action, keys = (argv[0], argv[1:]) if argv else ("table", [])
    unknown = [key for key in keys if key not in SETTINGS]
    if action not in ("train", "table") or unknown:
        sys.exit(f"self_training.py: use `train [{'|'.join(SETTINGS)} ...] [--seeds 0,1,2]` or `table [--seeds ...]`")
    train(keys or list(SETTINGS), seeds) if action == "train" else table(seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
