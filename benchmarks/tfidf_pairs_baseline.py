"""TF-IDF + logistic regression as a reward model: the baseline for the reward objective on preference pairs.

    python benchmarks/tfidf_pairs_baseline.py examples/rlhf/2_reward.yaml    # the config's data and split
    python benchmarks/tfidf_pairs_baseline.py runs/rlhf-reward               # a finished run's saved splits

A classifier learns P(chosen | response text) from the training pairs' responses (chosen = 1, rejected = 0); a pair
counts as ordered correctly when its chosen response gets the higher probability. The regularisation strength C is
picked on the validation pairs; the test pairs are scored once. The split is the run's (for rotten-tomatoes-pairs:
by movie, so no movie of the test pairs was seen in training).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from deltatune.config.loader import load_config
from deltatune.data import load_rows, make_splits
from deltatune.data.splits import group_keys
from deltatune.runs import open_run


def main(argv: list[str]) -> None:
    target = Path(argv[0])
    if target.is_dir():
        config = open_run(target).config
        splits = json.loads((target / "splits.json").read_text())
    else:
        config = load_config(target, argv[1:])
        rows = load_rows(config.data)
        splits = make_splits(len(rows), config.data.split, config.data.max_examples, group_keys(config.data, rows))
    rows = load_rows(config.data)
    chosen, rejected = config.data.columns.get("chosen", "chosen"), config.data.columns.get("rejected", "rejected")

    def pairs(split: str) -> tuple[list[str], list[str]]:
        return [rows[i][chosen] for i in splits[split]], [rows[i][rejected] for i in splits[split]]

    def pairwise_accuracy(model, vectorizer, split: str) -> float:
        good, bad = pairs(split)
        good_p = model.predict_proba(vectorizer.transform(good))[:, 1]
        bad_p = model.predict_proba(vectorizer.transform(bad))[:, 1]
        return float((good_p > bad_p).mean())

    good, bad = pairs("train")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(good + bad)
    labels = [1] * len(good) + [0] * len(bad)
    best = max(((pairwise_accuracy(model, vectorizer, "validation"), c, model)
                for c in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
                for model in [LogisticRegression(C=c, max_iter=2000).fit(features, labels)]),
               key=lambda item: item[0])
    accuracy, c, model = best
    print(f"tfidf+logreg reward  C={c}  train_pairs={len(good)}  validation_pairwise_accuracy={accuracy:.4f}  "
          f"test_pairwise_accuracy={pairwise_accuracy(model, vectorizer, 'test'):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
