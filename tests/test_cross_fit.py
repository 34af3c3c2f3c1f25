"""Cross-fitted distillation teachers: held-out folds of the train split, and each training row's soft labels taken
from the fold teacher that never trained on it (deltatune.objectives.cross_fit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltatune.config.loader import load_config
from deltatune.config.schema import SplitConfig
from deltatune.data import make_splits
from deltatune.errors import UserError
from deltatune.objectives.cross_fit import fold_owners, trained_rows
from deltatune.objectives.teacher_cache import TeacherLogitCache, fingerprint
from deltatune.runner import train
from tests.bad_input import write_jsonl

TINY_BERT = "tests.tiny_models:tiny_bert"


def test_held_out_folds_partition_the_train_split_and_leave_validation_and_test_alone() -> None:
    whole = make_splits(300, SplitConfig(seed=2))
    held_out = []
    for fold in range(3):
        split = make_splits(300, SplitConfig(seed=2, folds=3, held_out_fold=fold))
        assert split["validation"] == whole["validation"] and split["test"] == whole["test"]
        assert set(split["train"]) < set(whole["train"])
        held_out.append(set(whole["train"]) - set(split["train"]))
    assert [len(part) for part in held_out] == [80, 80, 80]
    assert set().union(*held_out) == set(whole["train"])
    assert not held_out[0] & held_out[1] and not held_out[1] & held_out[2]
    assert held_out[0] != set(sorted(whole["train"])[:80])  # the folds are drawn at random, not by row number


def test_a_group_lies_in_one_fold() -> None:
    groups = [f"movie {row // 4}" for row in range(200)]
    whole = make_splits(200, SplitConfig(seed=0), groups=groups)
    for fold in range(4):
        train = make_splits(200, SplitConfig(seed=0, folds=4, held_out_fold=fold), groups=groups)["train"]
        held = set(whole["train"]) - set(train)
        assert held and {groups[row] for row in held}.isdisjoint(groups[row] for row in train)


@pytest.mark.parametrize(("split", "message"), [
    (SplitConfig(folds=3, held_out_fold=3), r"held_out_fold is 3 but data\.split\.folds is 3; choose a fold from 0 to 2"),
    (SplitConfig(folds=9, held_out_fold=0), r"cannot cut the 8 training rows into non-empty parts .* lower"),
])
def test_impossible_folds_are_refused(split: SplitConfig, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_splits(10, split)


def test_each_row_goes_to_the_first_teacher_that_did_not_train_on_it() -> None:
    assert fold_owners([1, 2, 3, 4], [{1, 2, 3}, {3, 4}, {1, 2}], ["a", "b", "c"]) == [1, 1, 2, 0]


def reviews(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "reviews.jsonl", [{"text": f"{'good' if i % 3 else 'bad'} film number {i}",
                                                     "label": int(i % 3 > 0)} for i in range(48)])


def run_config(tmp_path: Path, run_name: str, *extra: str):
    return load_config(None, [f"model.name={TINY_BERT}", "model.task=classification", f"data.name={reviews(tmp_path)}",
                              "train.max_steps=3", "train.batch_size=8", "train.lr=1e-3", "train.progress=false",
                              "train.num_threads=1", f"output_dir={tmp_path / 'runs'}", f"run_name={run_name}", *extra])


def test_training_rows_are_distilled_from_the_fold_teacher_that_held_them_out(tmp_path) -> None:
    folds = [str(tmp_path / "runs" / f"fold{k}") for k in range(2)]
    for k in range(2):
        train(run_config(tmp_path, f"fold{k}", "data.split.folds=2", f"data.split.held_out_fold={k}"),
              echo=lambda *_: None)
    summary = train(run_config(tmp_path, "student", "model.student.keep_layers=[0]", "objective.name=distill",
                               f"objective.teacher_model={TINY_BERT}", "objective.precompute_teacher=true",
                               f"objective.teacher_folds=[{folds[0]}, {folds[1]}]"), echo=lambda *_: None)
    assert "divergence" in summary["after"]["validation"]

    from deltatune.runs import load_run

    student = load_run(tmp_path / "runs" / "student", with_data=True)
    rows, examples = student.data.splits["train"], student.data.train
    owners = fold_owners(rows, [trained_rows(fold) for fold in folds], folds)
    assert sorted(set(owners)) == [0, 1]
    for k, fold in enumerate(folds):
        teacher = load_run(fold).model.eval()
        part = [example for example, owner in zip(examples, owners) if owner == k]
        assert {row for row, owner in zip(rows, owners) if owner == k}.isdisjoint(trained_rows(fold))
        key = fingerprint(teacher, part, student.data.collate)
        cache = TeacherLogitCache(tmp_path / "runs" / "cache" / f"teacher-logits-{key}")
        assert cache.complete, "the fold teacher's part was not cached under its own fingerprint"
        batch = student.data.collate(part)
        with torch.no_grad():
            expected = teacher(**{key: value for key, value in batch.items() if key != "labels"}).logits
        assert torch.allclose(torch.stack(cache.rows(list(range(len(part))))), expected, atol=1e-5)


def test_fold_teachers_mistakes(tmp_path) -> None:
    distill = ["objective.name=distill", f"objective.teacher_model={TINY_BERT}"]
    with pytest.raises(UserError, match=r"computed once before training; set objective\.precompute_teacher=true"):
        train(run_config(tmp_path, "a", *distill, f"objective.teacher_folds=[{tmp_path}]"), echo=lambda *_: None)
    with pytest.raises(UserError, match=r"teacher_folds lists .*, which is not a finished run directory"):
        train(run_config(tmp_path, "b", *distill, "objective.precompute_teacher=true",
                         f"objective.teacher_folds=[{tmp_path}]"), echo=lambda *_: None)
    train(run_config(tmp_path, "whole"), echo=lambda *_: None)
    with pytest.raises(UserError, match=r"every run in objective\.teacher_folds trained on \d+ of the student's"
                                         r".*folds \[None\] of \[5\] \(data\.split\.held_out_fold and"):
        train(run_config(tmp_path, "c", *distill, "objective.precompute_teacher=true",
                         f"objective.teacher_folds=[{tmp_path / 'runs' / 'whole'}]"), echo=lambda *_: None)
    assert not (tmp_path / "runs" / "c").exists()
    train(run_config(tmp_path, "fold0", "data.split.folds=3", "data.split.held_out_fold=0"), echo=lambda *_: None)
    with pytest.raises(UserError, match=r"the runs hold out folds \[0\] of 3 \(missing: \[1, 2\]\); give one run"):
        train(run_config(tmp_path, "d", *distill, "objective.precompute_teacher=true",
                         f"objective.teacher_folds=[{tmp_path / 'runs' / 'fold0'}]"), echo=lambda *_: None)


def test_the_teacher_cache_key_changes_with_anything_that_changes_the_logits() -> None:
    """Raw images, the collate function that turns them into inputs (image size, normalisation), the teacher's
    dtype and weights all change the key; the teacher_index an example receives after caching does not."""
    import numpy

    teacher = torch.nn.Linear(4, 2)
    images = [{"image": numpy.full((2, 2), k + 1, dtype=numpy.uint8), "labels": k % 2} for k in range(3)]

    def collate(examples, scale=1.0):
        return {"pixel_values": torch.stack([torch.from_numpy(e["image"]).float().flatten() for e in examples]) * scale,
                "labels": torch.tensor([e["labels"] for e in examples])}

    key = fingerprint(teacher, images, collate)
    assert fingerprint(teacher, [{**e, "teacher_index": k} for k, e in enumerate(images)], collate) == key
    changed = [{**images[0], "image": numpy.full((2, 2), 9, dtype=numpy.uint8)}, *images[1:]]
    assert fingerprint(teacher, changed, collate) != key
    assert fingerprint(teacher, images, lambda examples: collate(examples, 1 / 255)) != key
    assert fingerprint(teacher.double(), images, collate) != key
    with torch.no_grad():
        teacher.float().weight[0, 0] += 1
    assert fingerprint(teacher, images, collate) != key
