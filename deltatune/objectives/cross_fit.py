"""Cross-fitted teachers: each training row's soft labels come from a teacher that never trained on it.

A teacher fine-tuned on the very rows a student is then distilled on has learnt them: its soft labels there are
close to its hard labels (MiniLM on Rotten Tomatoes: mean top probability 0.978 on its own training rows, 71% of
rows above 0.99), so the soft term teaches little the labels do not. Cross-fitting, the out-of-fold predictions of
stacking (Wolpert 1992), trains K teachers with the same recipe, each with one fold of the train split held out
(`data.split.held_out_fold=k` of `data.split.folds=K`), and gives every training row the logits of the teacher that
held it out: the teacher's real uncertainty on text it has not seen. Validation and test rows, which no teacher
trained on, keep the logits of `objective.teacher_model`.

`objective.teacher_folds` lists the K run directories; which rows each trained on is read from its saved splits, so
the folds are checked, not assumed.
"""

from __future__ import annotations

from pathlib import Path

from deltatune.errors import UserError

KEY = "objective.teacher_folds"


def trained_rows(source: str) -> set[int]:
    """The dataset rows a fold teacher's run trained on (its saved train split)."""
    from deltatune.training.run_dir import RunDir

    splits = RunDir(Path(source)).read_splits() if (Path(source) / "config.yaml").is_file() else None
    if splits is None:
        raise UserError(f"{KEY} lists {source}, which is not a finished run directory with saved splits; list the "
                        f"runs trained with data.split.held_out_fold=0, 1, ...")
    return {int(row) for row in splits["train"]}


def fold_owners(train_rows: list[int], trained_on: list[set[int]], sources: list[str]) -> list[int]:
    """For each training row of the student, the first fold teacher (by position) that did not train on it; a row
    every fold teacher trained on is a one-line error (a missing fold, or teachers split with another seed)."""
    owners, unseen_by_none = [], []
    for row in train_rows:
        owner = next((k for k, rows in enumerate(trained_on) if row not in rows), None)
        if owner is None:
            unseen_by_none.append(row)
        owners.append(owner)
    if unseen_by_none:
        raise UserError(f"every run in {KEY} trained on {len(unseen_by_none)} of the student's {len(train_rows)} "
                        f"training rows (row {unseen_by_none[0]} first); {describe_folds(sources)}; give one run "
                        f"per fold, each trained on the student's data and split seed")
    return owners


def describe_folds(sources: list[str]) -> str:
    """Which folds the runs held out, and which of their `data.split.folds` none did, from their saved configs."""
    import yaml

    held_out, folds = [], set()
    for source in sources:
        split = (yaml.safe_load((Path(source) / "config.yaml").read_text()) or {}).get("data", {}).get("split", {})
        held_out.append(split.get("held_out_fold"))
        folds.add(split.get("folds"))
    if None in held_out or len(folds) != 1:
        return (f"the runs hold out folds {held_out} of {sorted(folds, key=str)} (data.split.held_out_fold and "
                f"data.split.folds must be set, the same folds in every run)")
    total = folds.pop()
    missing = [k for k in range(total) if k not in held_out]
    return f"the runs hold out folds {sorted(held_out)} of {total}" + (f" (missing: {missing})" if missing else "")
