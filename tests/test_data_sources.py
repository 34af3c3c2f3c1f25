"""Loading raw rows: files, column mapping, image folders, embedded aliases, and the errors users see."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deltatune.config.schema import DataConfig
from deltatune.data import ALIASES, load_rows
from deltatune.errors import UserError

ROWS = [
    {"sentence": "good film", "other": "a", "y": 1},
    {"sentence": "bad film", "other": "b", "y": 0},
    {"sentence": "fine film", "other": "c", "y": 1},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_image_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (6, 5)) -> Path:
    from PIL import Image

    for index, (name, count) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((size[1], size[0], 3), 40 * index + i, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("writer, suffix", [(write_jsonl, ".jsonl"), (write_csv, ".csv"), (write_parquet, ".parquet")])
def test_file_formats_load_same_rows(tmp_path: Path, writer, suffix: str) -> None:
    path = writer(tmp_path / f"data{suffix}", ROWS)
    rows = load_rows(DataConfig(name=str(path), columns={"text": "sentence", "label": "y"}))
    assert [row["sentence"] for row in rows] == ["good film", "bad film", "fine film"]
    # CSV keeps cells as strings; label encoding turns "1" into 1 later
    assert [int(row["y"]) for row in rows] == [1, 0, 1]


def test_tsv_and_blank_jsonl_lines(tmp_path: Path) -> None:
    tsv = write_csv(tmp_path / "d.tsv", ROWS, delimiter="\t")
    assert len(load_rows(DataConfig(name=str(tsv)))) == 3
    # a stray quote opening a TSV cell would swallow the rows after it, to the next quote: refused, naming the line
    stray = tmp_path / "stray.tsv"
    stray.write_text('text\tlabel\n"Wow\t1\nplain row\t0\nsaid "hi"\t1\nlast\t0\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"stray\.tsv line 2: a cell that starts with a quote runs over several lines"):
        load_rows(DataConfig(name=str(stray)))
    inner = tmp_path / "inner.tsv"
    inner.write_text('text\tlabel\nsaid "hi"\t1\n', encoding="utf-8")
    assert load_rows(DataConfig(name=str(inner)))[0]["text"] == 'said "hi"'
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n', encoding="utf-8")
    assert len(load_rows(DataConfig(name=str(jsonl)))) == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_rows(DataConfig(name=str(tmp_path / "nope.jsonl")))


def test_unknown_alias_lists_valid_ones() -> None:
    with pytest.raises(UserError, match="unknown dataset 'rotten-tomato'.*rotten-tomatoes.*mnist-5k"):
        load_rows(DataConfig(name="rotten-tomato"))


@pytest.mark.parametrize("file_name, text, message", [
    ("data.xlsx", "x", r"unsupported data file extension '\.xlsx'.*\.jsonl"),
    ("empty.jsonl", "\n", "has no rows"),
    ("bad.jsonl", '{"text": "a"}\n{oops\n', "line 2 is not valid JSON"),  # the bad line is named
    ("bad.csv", "text,label\nhello, world,1\n", "line 2 has more cells"),  # a ragged row
])
def test_unreadable_file_is_refused_naming_the_problem(tmp_path: Path, file_name: str, text: str,
                                                       message: str) -> None:
    path = tmp_path / file_name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_rows(DataConfig(name=str(path)))


def test_image_folder_rows(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", {"dog": 2, "cat": 3})
    (root / "cat" / "notes.txt").write_text("not an image", encoding="utf-8")
    rows = load_rows(DataConfig(name=str(root)))
    assert Counter(row["label"] for row in rows) == {"cat": 3, "dog": 2}
    assert [row["label"] for row in rows] == ["cat"] * 3 + ["dog"] * 2  # sorted classes, stable order
    assert all(Path(row["image"]).is_absolute() for row in rows)


def test_image_folder_without_classes(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no subfolders"):
        load_rows(DataConfig(name=str(tmp_path / "flat")))


def test_alias_rotten_tomatoes() -> None:
    rows = load_rows(DataConfig(name="rotten-tomatoes"))
    assert len(rows) == 12_808
    assert sum(row["label"] for row in rows) == 7_403
    assert set(rows[0]) == {"text", "label", "movie_name"}
    assert ALIASES["rotten-tomatoes"].label_names == ("rotten", "fresh")


def test_alias_chatterbot() -> None:
    rows = load_rows(DataConfig(name="chatterbot"))
    assert len(rows) > 1_000
    assert set(rows[0]) == {"prompt", "response", "category"}
    assert rows == load_rows(DataConfig(name="chatterbot"))  # deterministic order


@pytest.mark.parametrize("name, count, shape", [("mnist-5k", 5_000, (28, 28)), ("digits", 1_797, (8, 8))])
def test_alias_images(name: str, count: int, shape: tuple[int, int]) -> None:
    rows = load_rows(DataConfig(name=name))
    assert len(rows) == count
    image = rows[0]["image"]
    assert image.dtype == np.uint8 and image.shape == shape
    assert max(int(row["image"].max()) for row in rows[:200]) > 200  # rescaled to the 0..255 range
    assert sorted({row["label"] for row in rows}) == list(range(10))


# --- encodings, long cells and other valid files that must load -----------------------------------------------

def test_explicit_encoding_reads_latin_1_and_auto_drops_a_byte_order_mark(tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncafé crème,1\n".encode("latin-1"))
    assert load_rows(DataConfig(name=str(latin), encoding="latin-1")) == [{"text": "café crème", "label": "1"}]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + '{"text": "café", "label": 0}\n'.encode("utf-8"))
    assert load_rows(DataConfig(name=str(bom))) == [{"text": "café", "label": 0}]


def test_utf_16_file_names_utf_16(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_bytes("text,label\na,1\n".encode("utf-16"))
    with pytest.raises(UserError, match=r"wide.csv is not UTF-8 text: byte 0xff at offset 0 \(line 1\).*"
                                        r"data.encoding=utf-16"):
        load_rows(DataConfig(name=str(path)))
    assert load_rows(DataConfig(name=str(path), encoding="utf-16")) == [{"text": "a", "label": "1"}]


def test_csv_cell_beyond_the_default_field_limit_loads_and_the_limit_is_restored(tmp_path: Path) -> None:
    long_text = "word " * 40_000  # 200,000 characters, over the csv module's 131,072 default
    path = write_csv(tmp_path / "long.csv", [{"text": long_text, "label": 1}, {"text": "short", "label": 0}])
    limit = csv.field_size_limit()
    rows = load_rows(DataConfig(name=str(path)))
    assert rows[0]["text"] == long_text and rows[1]["text"] == "short"
    assert csv.field_size_limit() == limit


def test_jsonl_line_separator_inside_a_string_stays_one_row(tmp_path: Path) -> None:
    path = tmp_path / "sep.jsonl"
    path.write_text('{"text": "one\u2028line", "label": 0}\n', encoding="utf-8")  # raw U+2028 is valid JSON
    assert load_rows(DataConfig(name=str(path))) == [{"text": "one\u2028line", "label": 0}]


def test_nan_and_bytes_cells(tmp_path: Path) -> None:
    from deltatune.data.sources import column_values, text_values

    rows = [{"text": "a", "label": float("nan")}, {"text": b"raw", "label": 1}]
    with pytest.raises(UserError, match="row 0 of data has no value in column 'label'"):
        column_values(rows, [0, 1], "label", "data")
    with pytest.raises(UserError, match="row 1 of data holds bytes in text column 'text'"):
        text_values(rows, [0, 1], "text", "data")
    assert text_values([{"text": 3}], [0], "text", "data") == ["3"]  # numbers still read as their text


def test_text_pairs_keep_a_boundary_on_tokenizers_that_mark_none() -> None:
    """GPT-2-style tokenizers add nothing between a pair's segments: the two texts are joined by a newline, not run
    together; BERT-style ones keep [SEP] and token_type_ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from deltatune.data.text import encode_classification, joined_pairs
    from tests.tiny_models import tiny_bert_processor

    bert = encode_classification(tiny_bert_processor(), ["great movie"], ["i loved it"], [1], 32)[0]
    assert set(bert["token_type_ids"]) == {0, 1}
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                   unk_token="[UNK]")
    assert bare.num_special_tokens_to_add(pair=True) == 0
    assert joined_pairs(bare, ["Great movie"], ["I loved it"]) == (["Great movie"], ["\nI loved it"])
    assert joined_pairs(tiny_bert_processor(), ["a"], ["b"]) == (["a"], ["b"])
