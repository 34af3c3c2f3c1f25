"""TF-IDF + logistic regression on exactly the split a deltatune config (or finished run) uses.

    python benchmarks/tfidf_baseline.py examples/minilm_rotten_tomatoes.yaml
    python benchmarks/tfidf_baseline.py runs/RUN_DIR          # reuses the run's saved splits.json

The regularisation strength C is chosen on the validation split; the test split is touched once, at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from deltatune.config.loader import load_config
from deltatune.data import load_rows, make_splits
from deltatune.runs import open_run
from deltatune.tasks import get_task


def main(argv: list[str]) -> None:
    target = Path(argv[0])
    if target.is_dir():
        config = open_run(target).config  # also reads runs saved before data.columns
        splits = json.loads((target / "splits.json").read_text())
    else:
        config = load_config(target, argv[1:])
        splits = None
    rows = load_rows(config.data)
    splits = splits or make_splits(len(rows), config.data.split, config.data.max_examples)
    columns = get_task("classification")().columns(config.data)
    text, label = columns["text"], columns["label"]

    def column(split: str, key: str) -> list:
        return [rows[i][key] for i in splits[split]]

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    train_x = vectorizer.fit_transform(column("train", text))
    validation_x, test_x = vectorizer.transform(column("validation", text)), vectorizer.transform(column("test", text))
    best = None
    for c in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(train_x, column("train", label))
        accuracy = model.score(validation_x, column("validation", label))
        if best is None or accuracy > best[0]:
            best = (accuracy, c, model)
    accuracy, c, model = best
    test_accuracy = model.score(test_x, column("test", label))
    print(f"tfidf+logreg  C={c}  train={len(splits['train'])}  validation_accuracy={accuracy:.4f}  "
          f"test_accuracy={test_accuracy:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
