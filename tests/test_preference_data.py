"""Preference data: the `preference` (causal LM) and `reward-pairs` (one-output classifier) tasks, their nested
examples and batches, their one-line errors, grouped (movie-disjoint) splits and the `rotten-tomatoes-pairs` alias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deltatune.config.loader import load_config
from deltatune.config.schema import DataConfig, SplitConfig
from deltatune.data import IGNORE_INDEX, load_rows, make_splits
from deltatune.data.splits import group_keys
from deltatune.errors import UserError
from deltatune.objectives import OBJECTIVES
from deltatune.objectives.base import Objective, model_logits
from deltatune.tasks import build_datasets
from tests.bad_input import write_jsonl
from tests.tiny_models import (
    tiny_bert,
    tiny_bert_processor,
    tiny_chat_llama_processor,
    tiny_llama,
    tiny_llama_processor,
)

PROMPTS = ["Review the film Alpha.", "Review the film Beta, please, in one sentence.", "Review Gamma."]


def pair_rows(n: int = 12, **extra: object) -> list[dict]:
    return [{"prompt": PROMPTS[i % 3], "chosen": f"a fine and moving film number {i}",
             "rejected": "dull" + " and dull" * (i % 4), **extra} for i in range(n)]


def bundle(tmp_path: Path, task: str, processor: object, rows: list[dict] | None = None, num_labels: int | None = None,
           **data: object):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows if rows is not None else pair_rows())
    return build_datasets(DataConfig(name=str(path), **data), task, processor, num_labels=num_labels)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([i for i in ids if i != IGNORE_INDEX])


# --- causal LM form ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("processor", [tiny_chat_llama_processor, tiny_llama_processor], ids=["chat", "plain"])
def test_language_model_pairs_label_only_the_response(tmp_path, processor) -> None:
    tokenizer = processor()
    data = bundle(tmp_path, "preference", tokenizer)
    assert (data.num_labels, data.label_names) == (None, None)
    rows = pair_rows()
    for index, example in zip(data.splits["train"], data.train):
        assert set(example) == {"chosen", "rejected"}
        prompts = []
        for half in ("chosen", "rejected"):
            ids, labels = example[half]["input_ids"], example[half]["labels"]
            start = next(position for position, label in enumerate(labels) if label != IGNORE_INDEX)
            assert all(label == IGNORE_INDEX for label in labels[:start])
            assert labels[start:] == ids[start:]  # unshifted, every token after the prompt supervised
            assert decode(tokenizer, labels).startswith(rows[index][half])
            assert rows[index]["prompt"].lower() in tokenizer.decode(ids[:start]).lower()
            prompts.append(ids[:start])
        assert prompts[0] == prompts[1]  # both responses follow the very same prompt tokens


def test_language_model_batches_nest_and_pad_both_halves_to_one_length(tmp_path) -> None:
    tokenizer = tiny_chat_llama_processor()
    data = bundle(tmp_path, "preference", tokenizer, rows=pair_rows(margin=0.5), columns={"margin": "margin"})
    batch = data.collate(data.train[:4])
    assert set(batch) == {"chosen", "rejected", "margin"}
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [0.5] * 4
    width = batch["chosen"]["input_ids"].shape[1]
    for half in ("chosen", "rejected"):
        part = batch[half]
        assert set(part) == {"input_ids", "attention_mask", "labels"}
        assert all(tensor.shape == (4, width) for tensor in part.values())
        for row, example in enumerate(data.train[:4]):
            length = len(example[half]["input_ids"])
            assert part["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)  # right padding
            assert part["labels"][row, length:].eq(IGNORE_INDEX).all()
    loss = tiny_llama()(**batch["rejected"]).loss  # each half is an ordinary causal-LM batch
    assert torch.isfinite(loss)


# --- sequence classifier form ------------------------------------------------------------------------------------

def test_reward_pairs_encode_a_text_pair_for_an_encoder(tmp_path) -> None:
    tokenizer = tiny_bert_processor()
    data = bundle(tmp_path, "reward-pairs", tokenizer)
    assert (data.num_labels, data.label_names) == (1, None)  # a new head of one output: the reward
    index, example = data.splits["train"][0], data.train[0]
    row = pair_rows()[index]
    for half in ("chosen", "rejected"):
        assert set(example[half]) == {"input_ids", "token_type_ids"}
        text = tokenizer.decode(example[half]["input_ids"])
        assert text == f"[CLS] {row['prompt'].lower()} [SEP] {row[half].lower()} [SEP]"
        assert 1 in example[half]["token_type_ids"]  # the response is the second segment
    batch = data.collate(data.train[:5])
    assert "margin" not in batch and "labels" not in batch["chosen"]
    assert batch["chosen"]["input_ids"].shape == batch["rejected"]["input_ids"].shape
    scores = tiny_bert(num_labels=1)(**batch["chosen"]).logits
    assert scores.shape == (5, 1)


def test_reward_pairs_with_a_chat_template_read_what_the_language_model_reads(tmp_path) -> None:
    tokenizer = tiny_chat_llama_processor()
    scored = bundle(tmp_path, "reward-pairs", tokenizer)
    generated = bundle(tmp_path, "preference", tokenizer)
    for pair, lm_pair in zip(scored.train, generated.train):
        for half in ("chosen", "rejected"):
            assert pair[half] == {"input_ids": lm_pair[half]["input_ids"]}


def test_reward_pairs_pad_on_the_tokenizers_side(tmp_path) -> None:
    tokenizer = tiny_bert_processor()
    tokenizer.padding_side = "left"
    data = bundle(tmp_path, "reward-pairs", tokenizer)
    batch = data.collate(data.train[:6])
    for half in ("chosen", "rejected"):
        mask = batch[half]["attention_mask"]
        assert mask[:, -1].eq(1).all() and mask[:, 0].eq(0).any()


# --- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["preference", "reward-pairs"])
def test_missing_and_empty_cells_name_the_row(tmp_path, task) -> None:
    rows = pair_rows()
    rows[5]["rejected"] = None
    with pytest.raises(UserError, match=r"row 5 of dataset .* no value in column 'rejected'"):
        bundle(tmp_path, task, tiny_bert_processor(), rows=rows, split=SplitConfig(validation=0, test=0))
    rows = pair_rows()
    rows[7]["chosen"] = "   "
    with pytest.raises(UserError, match=r"^row 7 of dataset .* has an empty 'chosen' \(chosen\); fill"):
        bundle(tmp_path, task, tiny_bert_processor(), rows=rows)
    with pytest.raises(UserError, match=r"column 'answer_b' \(data.columns.rejected\) not found"):
        bundle(tmp_path, task, tiny_bert_processor(), columns={"rejected": "answer_b"})


def test_identical_chosen_and_rejected_everywhere_is_refused_but_in_some_rows_is_kept(tmp_path) -> None:
    with pytest.raises(UserError, match=r"in every row of .* the chosen text \('chosen'\) equals the rejected text "
                                        r"\('chosen'\); point data.columns.chosen"):
        bundle(tmp_path, "preference", tiny_llama_processor(), columns={"rejected": "chosen"})
    rows = pair_rows()
    rows[3]["rejected"] = rows[3]["chosen"]
    data = bundle(tmp_path, "preference", tiny_llama_processor(), rows=rows)
    assert len(data.train) + len(data.validation) + len(data.test) == len(rows)


def test_bad_margins_wrong_head_size_and_unknown_roles_are_one_line_errors(tmp_path) -> None:
    rows = pair_rows(margin=1.0)
    rows[2]["margin"] = "big"
    with pytest.raises(UserError, match=r"^row 2 of .* has margin 'big' in column 'margin'; write a finite number"):
        bundle(tmp_path, "reward-pairs", tiny_bert_processor(), rows=rows, columns={"margin": "margin"})
    with pytest.raises(UserError, match="model.num_labels is 2 but a reward model has one output"):
        bundle(tmp_path, "reward-pairs", tiny_bert_processor(), num_labels=2)
    with pytest.raises(UserError, match="role 'response'.*its roles are prompt, chosen, rejected, margin"):
        bundle(tmp_path, "preference", tiny_llama_processor(), columns={"response": "chosen"})


# --- grouped splits ------------------------------------------------------------------------------------------------

def groups_of(splits: dict[str, list[int]], groups: list[str]) -> dict[str, set[str]]:
    return {name: {groups[i] for i in indices} for name, indices in splits.items()}


def assert_disjoint(by_split: dict[str, set[str]]) -> None:
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]


def test_grouped_splits_keep_each_group_in_one_split() -> None:
    groups = [f"movie{(i * 7) % 40}" for i in range(400)]  # 40 groups of 10 rows, interleaved in the table
    split = SplitConfig(validation=0.1, test=0.2, seed=3)
    splits = make_splits(len(groups), split, groups=groups)
    assert splits == make_splits(len(groups), split, groups=groups)
    assert splits != make_splits(len(groups), SplitConfig(validation=0.1, test=0.2, seed=4), groups=groups)
    assert sorted(i for part in splits.values() for i in part) == list(range(400))
    assert_disjoint(groups_of(splits, groups))
    assert {name: len(part) for name, part in splits.items()} == {"train": 280, "validation": 40, "test": 80}
    wider = make_splits(len(groups), SplitConfig(validation=0.3, test=0.2, seed=3), groups=groups)
    assert wider["test"] == splits["test"]  # test is cut first, so validation never moves rows in or out of it


def test_grouped_splits_give_each_requested_split_a_group_and_refuse_too_few() -> None:
    groups = ["a"] * 50 + ["b"] * 3 + ["c"] * 3
    splits = make_splits(len(groups), SplitConfig(validation=0.01, test=0.01), groups=groups)
    assert all(splits[name] for name in ("train", "validation", "test"))
    assert_disjoint(groups_of(splits, groups))
    with pytest.raises(UserError, match="only 20 rows in 2 groups: too few"):
        make_splits(20, SplitConfig(validation=0.1, test=0.1), groups=["a"] * 10 + ["b"] * 10)
    capped = make_splits(len(groups), SplitConfig(validation=0, test=0.3), max_examples=20, groups=groups)
    assert sum(len(part) for part in capped.values()) == 20
    assert_disjoint(groups_of(capped, groups))


def test_data_split_group_names_a_column_of_any_file(tmp_path) -> None:
    rows = [dict(row, user=f"user{i % 6}") for i, row in enumerate(pair_rows(60))]
    data = bundle(tmp_path, "preference", tiny_llama_processor(), rows=rows,
                  split=SplitConfig(validation=0.2, test=0.2, group="user"))
    assert_disjoint(groups_of(data.splits, [row["user"] for row in rows]))
    with pytest.raises(UserError, match=r"column 'movie' \(data.split.group\) not found"):
        bundle(tmp_path, "preference", tiny_llama_processor(), split=SplitConfig(group="movie"))
    config = load_config(None, ["data.split.group=user"])
    assert config.data.split.group == "user"
    assert load_config(None, []).data.split.group is None


# --- the embedded alias --------------------------------------------------------------------------------------------

def test_rotten_tomatoes_pairs_are_same_movie_fresh_rotten_pairs_split_by_movie() -> None:
    cfg = DataConfig(name="rotten-tomatoes-pairs")
    rows = load_rows(cfg)
    assert len(rows) == 3226 and len({row["movie_name"] for row in rows}) == 465
    assert rows == load_rows(cfg)  # a fixed pairing
    assert all(row["prompt"].startswith("Write a one-sentence review of the movie ") for row in rows)
    assert all(row["chosen"] != row["rejected"] for row in rows)
    fresh = {row["text"] for row in load_rows(DataConfig(name="rotten-tomatoes")) if row["label"] == 1}
    assert all(row["chosen"] in fresh and row["rejected"] not in fresh for row in rows)
    data = build_datasets(cfg, "reward-pairs", tiny_bert_processor())
    movies = group_keys(cfg, rows)
    by_split = groups_of(data.splits, movies)
    assert_disjoint(by_split)
    assert sum(len(part) for part in by_split.values()) == 465
    assert len(data.test) == pytest.approx(0.1 * 3226, abs=20)


def test_rotten_tomatoes_reviews_put_the_same_movies_in_each_split_as_the_pairs() -> None:
    pairs_cfg, reviews_cfg = DataConfig(name="rotten-tomatoes-pairs"), DataConfig(name="rotten-tomatoes-reviews")
    pairs, reviews = load_rows(pairs_cfg), load_rows(reviews_cfg)
    assert len(reviews) == 2 * len(pairs)
    assert [(row["response"], row["label"]) for row in reviews[:2]] == [(pairs[0]["chosen"], 1), (pairs[0]["rejected"], 0)]
    for seed in (0, 3):
        split = SplitConfig(seed=seed)
        movies = [groups_of(make_splits(len(rows), split, None, group_keys(cfg, rows)), group_keys(cfg, rows))
                  for cfg, rows in ((pairs_cfg, pairs), (reviews_cfg, reviews))]
        assert movies[0] == movies[1]


# --- through the runner --------------------------------------------------------------------------------------------

class ToyPairwise(Objective):
    """Bradley–Terry on the one-output head, only to carry nested batches through the real runner and loop."""

    main_metric = "accuracy"
    greater_is_better = True
    metrics = ("loss", "accuracy")

    def scores(self, model, batch):
        return [model_logits(model, batch[half])[:, 0] for half in ("chosen", "rejected")]

    def loss(self, model, batch):
        chosen, rejected = self.scores(model, batch)
        return -F.logsigmoid(chosen - rejected).mean(), {"accuracy": float((chosen > rejected).float().mean())}

    @torch.no_grad()
    def evaluate(self, model, batches):
        gaps = torch.cat([chosen - rejected for chosen, rejected in (self.scores(model, b) for b in batches)])
        return {"loss": float(-F.logsigmoid(gaps).mean()), "accuracy": float((gaps > 0).float().mean())}

    def tokens_in(self, batch):
        return sum(int(batch[half]["attention_mask"].sum()) for half in ("chosen", "rejected"))


@pytest.fixture
def toy_pairwise():
    OBJECTIVES.register("toy-pairwise")(ToyPairwise)
    yield
    OBJECTIVES._entries.pop("toy-pairwise", None)


def test_reward_pairs_train_and_evaluate_through_the_runner(tmp_path, toy_pairwise) -> None:
    from deltatune import train
    from deltatune.runs import evaluate_run

    rows = [{"prompt": f"Rate movie {i % 10}.", "chosen": "great wonderful moving " * (1 + i % 3),
             "rejected": "awful boring dull " * (1 + i % 2), "movie": f"m{i % 10}"} for i in range(80)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = load_config(None, ["model.name=tests.tiny_models:tiny_bert", "model.task=reward-pairs",
                                f"data.name={path}", "data.split.group=movie", "objective.name=toy-pairwise",
                                "train.max_steps=12", "train.batch_size=8", "train.lr=3e-3", "train.progress=false",
                                "train.num_threads=1", f"output_dir={tmp_path / 'runs'}", "run_name=pairs"])
    summary = train(config)
    assert summary["task"] == "reward-pairs"
    assert summary["after"]["test"]["loss"] < summary["before"]["test"]["loss"]
    again = evaluate_run(summary["run_dir"], echo=lambda *_: None)
    assert again["test"]["loss"] == pytest.approx(summary["after"]["test"]["loss"], abs=1e-6)
    saved = json.loads((Path(summary["run_dir"]) / "splits.json").read_text())
    assert_disjoint(groups_of(saved, [row["movie"] for row in rows]))


@pytest.mark.parametrize("processor", [tiny_llama_processor, tiny_chat_llama_processor])
def test_a_prompt_too_long_for_max_length_is_cut_the_same_in_both_halves(processor) -> None:
    """DPO compares log π(chosen | x) with log π(rejected | x): when the prompt must be cut, both halves keep the
    same prompt tokens (decided by the longer response), whatever their responses' lengths."""
    from deltatune.data.preference import PreferenceRows, encode_language_model_pairs

    tokenizer = processor()
    long_prompt = "Review this film in detail: " + "a long winding story " * 20
    rows = PreferenceRows([long_prompt], ["fine"], ["dull and slow and long and flat and grey"], None)
    (pair,) = encode_language_model_pairs(tokenizer, rows, max_length=24)
    prompts = []
    for half in ("chosen", "rejected"):
        example = pair[half]
        assert len(example["input_ids"]) <= 24
        first_label = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        prompts.append(example["input_ids"][:first_label])
    assert prompts[0] == prompts[1] and len(prompts[0]) >= 12
