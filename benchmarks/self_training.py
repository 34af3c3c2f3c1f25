"""Self-training with 5% of the training labels (issue 13): EfficientNet-Lite0 on MNIST-5k and MiniLM-L6 on Rotten
Tomatoes, each against the same model trained on the 5% alone.

    python benchmarks/self_training.py train [mnist|rt ...]   # both arms of each setting (runs/semi-*)
    python benchmarks/self_training.py table                  # every round of every run, and the comparison

`data.labelled_fraction=0.05` keeps a seeded, class-stratified 5% of the train split's labels and hides the rest
(validation and test keep theirs, so model selection and the final score use the same rows in both arms). Both
arms run the `self_training` objective with the same batches and evaluations:
- labels alone: one round of ROUNDS x BATCHES micro-batches on the labelled rows, evaluated every BATCHES, best kept;
- self-training: ROUNDS rounds of BATCHES micro-batches; before each round after the first, the model labels the
  unlabelled rows and keeps the pseudo-labels above the confidence threshold (0.9); stops when validation stops
  improving. Whether a round trains on from the previous round's weights or from the starting ones (`restart`) is
  the setting's choice, made on validation: a restarted EfficientNet round of 120 batches is one pass over its
  ~3,600 rows, too few to relearn from the ImageNet weights (validation 0.910 -> 0.882), so MNIST trains on.
BATCHES is where the labels-alone curve peaked in a first run (validation accuracy every 40 / 60 micro-batches): a
first round shorter than that hands the next one pseudo-labels from an undertrained model.
"""

from __future__ import annotations

import json
import sys

from _runs import RUNS, read_json, run_training

ROUNDS = 3
SETTINGS = {
    # (config, batches per round, overrides shared by both arms, overrides of the self-training arm)
    "mnist": ("examples/efficientnet_mnist.yaml", 120, [
        "method.name=freeze", "method.last_n_blocks=4", "train.lr=1e-3", "train.schedule=constant",
        "train.warmup_steps=0"], ["objective.restart=false"]),
    "rt": ("examples/self_training_rotten_tomatoes.yaml", 120, [], ["objective.restart=true"]),
}
ARMS = {
    "alone": lambda batches: ["objective.rounds=1", f"objective.batches_per_round={ROUNDS * batches}",
                              f"train.eval_every={batches}"],
    "self-training": lambda batches: [f"objective.rounds={ROUNDS}", f"objective.batches_per_round={batches}",
                                      "objective.confidence=0.9"],
}


def train(keys: list[str]) -> None:
    for key in keys:
        config, batches, shared, own = SETTINGS[key]
        for arm, overrides in ARMS.items():
            run_training(config, f"semi-{key}-{arm}", ["objective.name=self_training", "data.labelled_fraction=0.05",
                                                        *shared, *overrides(batches), *(own if arm != "alone" else [])])


def table() -> None:
    for key in SETTINGS:
        results = {arm: read_json(RUNS / f"semi-{key}-{arm}" / "summary.json") for arm in ARMS}
        if not all(results.values()):
            continue
        print(f"\n{key}: test accuracy, labels alone {results['alone']['after']['test']['accuracy']:.4f}, "
              f"self-training {results['self-training']['after']['test']['accuracy']:.4f} "
              f"({100 * (results['self-training']['after']['test']['accuracy'] - results['alone']['after']['test']['accuracy']):+.1f} points)")
        print("| run | round | labelled | pseudo-labels kept | their accuracy | validation accuracy after the round |")
        print("|---|---|---|---|---|---|")
        for arm in ARMS:
            records = [json.loads(line) for line in (RUNS / f"semi-{key}-{arm}" / "metrics.jsonl").open()]
            rounds = [r for r in records if r["type"] == "round"]
            evaluations = [r for r in records if r["type"] == "eval"]
            for record in rounds:
                after = [e["accuracy"] for e in evaluations if e["step"] >= record["step"]]
                accuracy = record.get("pseudo_accuracy")
                print(f"| {arm} | {record['round']} | {record['labelled']} | {record.get('pseudo_labels', 0)} | "
                      f"{'-' if accuracy is None else format(accuracy, '.4f')} | "
                      f"{', '.join(f'{a:.4f}' for a in after[:1 if arm != 'alone' else None])} |")


def main(argv: list[str]) -> None:
    action, keys = (argv[0], argv[1:]) if argv else ("table", [])
    unknown = [key for key in keys if key not in SETTINGS]
    if action not in ("train", "table") or unknown:
        sys.exit(f"self_training.py: use `train [{'|'.join(SETTINGS)} ...]` or `table`")
    train(keys or list(SETTINGS)) if action == "train" else table()


if __name__ == "__main__":
    main(sys.argv[1:])
