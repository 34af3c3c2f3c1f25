"""The three CNN transfer-learning strategies on EfficientNet-Lite0 / MNIST-5k, as a README table.

    python benchmarks/efficientnet_strategies.py [extra overrides...]

Each strategy is the same config (examples/efficientnet_mnist.yaml) with method overrides; the split is shared,
so the test accuracies compare like for like. Time per epoch counts training steps only (not evaluation).
"""

from __future__ import annotations

import sys

from deltatune import load_config, train

STRATEGIES = {
    "head only (replace + train last layer)": ["method.name=freeze", "train.lr=3e-3", "train.epochs=3"],
    "head + last 4 blocks + conv head": ["method.name=freeze", "method.last_n_blocks=4"],
    "whole network (full)": ["method.name=full"],
}


def main(extra: list[str]) -> None:
    rows = []
    for label, overrides in STRATEGIES.items():
        config = load_config("examples/efficientnet_mnist.yaml", [*overrides, *extra])
        summary = train(config)
        epochs = config.train.epochs
        rows.append((label, summary["after"]["test"]["accuracy"], summary["trainable_parameters"],
                     summary["train_seconds"] / epochs, epochs, summary["run_dir"]))
    print("\n| strategy | test accuracy | trainable parameters | seconds / epoch | epochs |")
    print("|---|---|---|---|---|")
    for label, accuracy, trainable, seconds, epochs, _ in rows:
        print(f"| {label} | {accuracy:.4f} | {trainable:,} | {seconds:.0f} | {epochs:g} |")
    print("\nruns: " + ", ".join(row[-1] for row in rows))


if __name__ == "__main__":
    main(sys.argv[1:])
