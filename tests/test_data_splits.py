"""Seeded splits and label encoding."""

from __future__ import annotations

import pytest

from deltatune.config.schema import SplitConfig
from deltatune.data import make_splits
from deltatune.data.labels import encode_labels
from deltatune.data.splits import check_splits
from deltatune.errors import UserError


def test_splits_deterministic_disjoint_covering() -> None:
    splits = make_splits(1000, SplitConfig(validation=0.1, test=0.2, seed=3))
    assert splits == make_splits(1000, SplitConfig(validation=0.1, test=0.2, seed=3))
    assert splits != make_splits(1000, SplitConfig(validation=0.1, test=0.2, seed=4))
    sizes = {name: len(indices) for name, indices in splits.items()}
    assert sizes == {"train": 700, "validation": 100, "test": 200}
    combined = splits["train"] + splits["validation"] + splits["test"]
    assert sorted(combined) == list(range(1000))


def test_test_split_independent_of_validation_fraction() -> None:
    a = make_splits(500, SplitConfig(validation=0.1, test=0.1, seed=0))
    b = make_splits(500, SplitConfig(validation=0.3, test=0.1, seed=0))
    assert a["test"] == b["test"]


def test_max_examples_keeps_seeded_subset() -> None:
    splits = make_splits(1000, SplitConfig(seed=1), max_examples=50)
    kept = splits["train"] + splits["validation"] + splits["test"]
    assert len(kept) == 50 and len(set(kept)) == 50
    assert splits == make_splits(1000, SplitConfig(seed=1), max_examples=50)
    assert kept != list(range(50))  # a shuffled subset, not the head of the file


def test_small_dataset_gets_nonempty_requested_splits() -> None:
    splits = make_splits(5, SplitConfig(validation=0.1, test=0.1))
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [3, 1, 1]
    assert make_splits(5, SplitConfig(validation=0.0, test=0.0))["train"] == [0, 1, 2, 3, 4]


def test_split_errors() -> None:
    with pytest.raises(UserError, match="too few for validation"):
        make_splits(2, SplitConfig(validation=0.1, test=0.1))
    with pytest.raises(UserError, match="leaves nothing to train on"):
        make_splits(100, SplitConfig(validation=0.5, test=0.5))
    with pytest.raises(UserError, match=r"data.split.test is -0.1"):
        make_splits(100, SplitConfig(test=-0.1))
    with pytest.raises(UserError, match="max_examples is 0"):
        make_splits(100, SplitConfig(), max_examples=0)
    with pytest.raises(UserError, match="no rows"):
        make_splits(0, SplitConfig())


def test_check_saved_splits() -> None:
    with pytest.raises(UserError, match="refers to row 10 but the dataset has 10 rows"):
        check_splits({"train": [0, 10], "validation": [], "test": []}, 10)
    with pytest.raises(UserError, match="more than one split"):
        check_splits({"train": [0, 1], "validation": [1], "test": []}, 10)
    with pytest.raises(UserError, match="lack test"):
        check_splits({"train": [0], "validation": []}, 10)
    # a hand-edited file out of order reads as the sorted one (the example store reads rows chunk by chunk)
    assert check_splits({"train": [8, 1, 3], "validation": [5], "test": []}, 10)["train"] == [1, 3, 8]


def test_string_labels_sorted() -> None:
    encoded = encode_labels(["pos", "neg", "neutral", "pos"], "label")
    assert encoded.label_names == ["neg", "neutral", "pos"]
    assert encoded.ids == [2, 0, 1, 2] and encoded.num_labels == 3


def test_integer_labels_kept_and_csv_strings_converted() -> None:
    encoded = encode_labels(["1", "0", " 2", 1.0], "label", known_names=["a", "b", "c"])
    assert encoded.ids == [1, 0, 2, 1] and encoded.num_labels == 3 and encoded.label_names == ["a", "b", "c"]
    assert encode_labels([0, 1], "label", num_labels=4).num_labels == 4
    # pandas writes integer labels as "3.0" when the column held a missing value: the same ids as from parquet
    assert encode_labels([f"{k}.0" for k in (1, 0, 10, 2, 3, 4, 5, 6, 7, 8, 9)], "label").ids == [1, 0, 10, 2, 3, 4,
                                                                                              5, 6, 7, 8, 9]


def test_label_errors() -> None:
    with pytest.raises(UserError, match=r"label 5 in column 'stars' is out of range 0..4.*num_labels to at least 6"):
        encode_labels([1, 2, 3, 4, 5], "stars")
    with pytest.raises(UserError, match=r"label 7 .* out of range 0..2 \(model.num_labels\)"):
        encode_labels([0, 7], "label", num_labels=3)
    with pytest.raises(UserError, match="label -1 .*negative labels cannot"):
        encode_labels([-1, 0], "label")
    with pytest.raises(UserError, match="mixes integer and string labels"):
        encode_labels([0, "pos"], "label")
    with pytest.raises(UserError, match="label 0.5 is not an integer"):
        encode_labels([0.5, 1.0], "label")
    with pytest.raises(UserError, match="3 classes but model.num_labels is 2"):
        encode_labels(["a", "b", "c"], "label", num_labels=2)
