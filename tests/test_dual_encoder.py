"""The dual encoder (issue 16, item 2): CLIP's loss against hand-computed values and against transformers' own
`image_text_contrastive_loss`, recall@k and zero-shot classification by hand, a tiny image-text run through the CLI (captions made
from labels, and a jsonl of image files with captions), export and `deltatune.load`, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import deltatune
from deltatune.cli import main
from deltatune.config.loader import load_config
from deltatune.objectives.losses.contrastive import (
    caption_groups,
    class_embeddings,
    contrastive_loss,
    retrieval_recall,
    zero_shot_predictions,
)
from tests.bad_input import assert_refused, write_jsonl

SHAPES = ["bar top", "bar middle", "bar bottom"]


def test_contrastive_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(3) / (math.exp(1) + math.exp(3)))
    columns = -math.log(math.exp(2) / (math.exp(2) + math.exp(1))) - math.log(math.exp(3) / (1 + math.exp(3)))
    assert contrastive_loss(logits).item() == pytest.approx((rows / 2 + columns / 2) / 2, rel=1e-6)


def test_contrastive_loss_equals_transformers_clip_loss() -> None:
    from transformers.models.clip import modeling_clip

    # transformers' CLIPModel loss (named clip_loss before transformers 5); it takes the text-by-image matrix.
    clip_loss = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss
    logits = torch.randn(7, 7, generator=torch.Generator().manual_seed(0)) * 5
    assert torch.allclose(contrastive_loss(logits), clip_loss(logits.T), atol=1e-6)


def test_retrieval_recall_counts_an_identical_caption_as_a_hit() -> None:
    similarity = torch.tensor([[0.0, 0.9, 0.5], [0.8, 0.2, 0.1], [0.0, 0.1, 0.3]])
    distinct = torch.tensor([0, 1, 2])
    assert retrieval_recall(similarity, distinct, distinct, 1) == pytest.approx(1 / 3)  # only row 2 finds itself
    assert retrieval_recall(similarity, distinct, distinct, 2) == pytest.approx(2 / 3)  # rows 1 and 2; row 0 ranks itself last
    repeated = caption_groups([(5, 6), (5, 6), (7,)])  # rows 0 and 1 carry the same caption
    assert repeated.tolist() == [0, 0, 1]
    assert retrieval_recall(similarity, repeated, repeated, 1) == 1.0


def test_zero_shot_by_prompt_ensembles() -> None:
    prompts = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0], [1.0, 0.2]], [[0.0, 1.0], [0.2, 1.0]]]), dim=-1)
    centres = class_embeddings(prompts)
    assert torch.allclose(centres.norm(dim=-1), torch.ones(2))
    images = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.7, 0.69]]), dim=-1)
    assert zero_shot_predictions(images, centres).tolist() == [0, 1, 0]


def bar_image(label: int, seed: int) -> np.ndarray:
    """A 16x16 grey image with a bright band at the top, middle or bottom, and noise."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (16, 16))
    image[label * 5:label * 5 + 5, :] += 180
    return image.clip(0, 255).astype(np.uint8)


def write_config(root: Path, data_file: Path, **sections) -> Path:
    config = {
        "model": {"name": "dual-encoder", "image": "tests.tiny_models:tiny_cnn", "text": "tests.tiny_models:tiny_bert",
                  "projection_dim": 16},
        "data": {"name": str(data_file), "columns": {"label": "label"}, "max_length": 16,
                 "split": {"validation": 0.25, "test": 0.25}},
        "method": {"image": {"name": "full"}, "text": {"name": "lora", "r": 4}},
        "objective": {"name": "contrastive", "templates": ["a {label}", "the {label} picture"]},
        "train": {"max_steps": 30, "batch_size": 12, "lr": 3e-3, "num_threads": 1, "progress": False},
        "output_dir": str(root / "runs"),
    }
    for section, values in sections.items():  # model, data and train merge; method and objective are replaced
        config[section] = {**config[section], **values} if section in ("model", "data", "train") else values
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def labelled_rows(count: int = 72) -> list[dict]:
    return [{"image": bar_image(i % 3, i).tolist(), "label": SHAPES[i % 3]} for i in range(count)]


def test_towers_method_is_implied_by_the_tower_keys(tmp_path) -> None:
    config = load_config(write_config(tmp_path, tmp_path / "unused.jsonl"))
    assert config.method.name == "towers"
    assert config.method.image.name == "full" and config.method.text.name == "lora" and config.method.text.r == 4


def test_tiny_dual_encoder_learns_zero_shot_and_exports(tmp_path) -> None:
    data = write_jsonl(tmp_path / "bars.jsonl", labelled_rows())
    assert main(["train", str(write_config(tmp_path, data)), "run_name=bars"]) == 0
    summary = json.loads((tmp_path / "runs" / "bars" / "summary.json").read_text())
    before, after = summary["before"]["test"], summary["after"]["test"]
    assert after["loss"] < before["loss"] and after["zero_shot_accuracy"] > 0.9
    assert {"image_to_text_recall_at_1", "text_to_image_recall_at_5"} <= set(after)
    assert main(["export", str(tmp_path / "runs" / "bars"), str(tmp_path / "export")]) == 0
    from_run, from_export = deltatune.load(str(tmp_path / "runs" / "bars")), deltatune.load(str(tmp_path / "export"))
    images = [bar_image(label, 1000 + label) for label in range(3)]
    texts = [f"a {shape}" for shape in SHAPES]
    assert torch.allclose(from_run.encode_image(images), from_export.encode_image(images), atol=1e-5)
    assert torch.allclose(from_run.encode_text(texts), from_export.encode_text(texts), atol=1e-5)
    # Past data.max_length=16 both truncate where training did (an export once encoded up to 128 tokens).
    long_text = [" ".join(["a"] + SHAPES * 8)]
    assert from_export.max_length == from_run.max_length == 16
    assert torch.allclose(from_run.encode_text(long_text), from_export.encode_text(long_text), atol=1e-5)
    similarity = from_export.encode_image(images) @ from_export.encode_text(texts).T
    assert similarity.argmax(dim=1).tolist() == [0, 1, 2]


def test_pairs_from_a_jsonl_of_image_files_and_captions(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(48):
        Image.fromarray(bar_image(i % 3, i)).save(tmp_path / "images" / f"{i}.png")
        rows.append({"file": f"images/{i}.png", "text": f"a band at the {SHAPES[i % 3].split()[1]}"})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = write_config(tmp_path, data, data={"columns": {"image": "file", "caption": "text"}})
    assert main(["train", str(config), "run_name=pairs"]) == 0
    after = json.loads((tmp_path / "runs" / "pairs" / "summary.json").read_text())["after"]["validation"]
    assert "zero_shot_accuracy" not in after and after["recall_at_1"] > 0.5


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "bars.jsonl", labelled_rows(12))
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"image": "nowhere.png", "caption": "a bar"}] * 4)
    config = write_config(tmp_path, missing, data={"columns": {"caption": "caption"}})
    assert_refused(["train", str(config), "run_name=a"], r"image file nowhere\.png not found", capsys, tmp_path)
    config = write_config(tmp_path, data, model={"projection_dim": None, "text": "tests.tiny_models:tiny_llama"})
    assert_refused(["train", str(config), "run_name=b"], "projection sizes disagree", capsys, tmp_path)
    config = write_config(tmp_path, data, data={"columns": {}})
    assert_refused(["train", str(config), "run_name=c"], "needs captions or labels", capsys, tmp_path)
    config = write_config(tmp_path, data, model={"name": "tests.tiny_models:tiny_bert", "task": "classification"},
                          data={"columns": {"text": "label"}}, objective={"name": "auto"}, method={"name": "full"})
    assert_refused(["train", str(config), "run_name=d"], r"model\.image names a tower", capsys, tmp_path)
    config = write_config(tmp_path, data, method={"image": {"name": "lora", "bogus": 1}})
    assert_refused(["train", str(config), "run_name=e"], r"unknown key 'bogus' in method\.image", capsys, tmp_path)


def test_an_image_folder_of_classes_trains_with_captions_from_its_folder_names(tmp_path) -> None:
    for label, shape in enumerate(["top", "middle", "bottom"]):
        (tmp_path / "folder" / shape).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(bar_image(label, 100 * label + i)).save(tmp_path / "folder" / shape / f"{i}.png")
    config = write_config(tmp_path, tmp_path / "folder", objective={"name": "contrastive", "templates": ["a {label} band"]})
    assert main(["train", str(config), "run_name=folder"]) == 0
    after = json.loads((tmp_path / "runs" / "folder" / "summary.json").read_text())["after"]["test"]
    assert after["zero_shot_accuracy"] > 0.9  # captions such as "a middle band", from the subfolder names


def test_an_image_folder_reads_its_labels_without_data_columns(tmp_path) -> None:
    from deltatune.config.schema import DataConfig, SplitConfig
    from deltatune.models.dual_encoder import DualProcessor
    from deltatune.models.image import ImageProcessor
    from deltatune.tasks import build_datasets
    from tests.tiny_models import tiny_bert_processor

    for label, shape in enumerate(["top", "bottom"]):
        (tmp_path / "folder" / shape).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(bar_image(2 * label, i)).save(tmp_path / "folder" / shape / f"{i}.png")
    data = DataConfig(name=str(tmp_path / "folder"), split=SplitConfig(validation=0.25, test=0.25))
    processor = DualProcessor(ImageProcessor(16, (0.5,), (0.5,)), tiny_bert_processor())
    bundle = build_datasets(data, "image-text", processor)
    assert bundle.label_names == ["bottom", "top"]  # the subfolders, sorted
    assert {example["labels"] for example in bundle.train} <= {0, 1}


def test_template_captions_keep_their_tokens_with_a_left_padding_tokenizer() -> None:
    from types import SimpleNamespace

    from deltatune.objectives.contrastive import Contrastive, ContrastiveConfig
    from tests.tiny_models import tiny_bert_processor

    tokenizer = tiny_bert_processor()
    tokenizer.padding_side = "left"
    objective = Contrastive(ContrastiveConfig(templates=["a {label}"]))
    objective.processor, objective.label_names = SimpleNamespace(text=tokenizer), ["dog", "very large striped cat"]
    ids, mask = objective.captions({"labels": torch.tensor([0, 1])}, torch.tensor([0, 0]))
    assert ids[0, : int(mask[0].sum())].tolist() == tokenizer("a dog")["input_ids"]  # right-padded, as data captions
    assert ids[1].tolist() == tokenizer("a very large striped cat")["input_ids"] and bool(mask[1].all())


def test_recall_metrics_score_a_split_a_chunk_of_queries_at_a_time(monkeypatch) -> None:
    from deltatune.objectives import contrastive

    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(10, 4, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(10, 4, generator=generator), dim=-1)
    groups = caption_groups([(i % 4,) for i in range(10)])  # repeated captions, as template captions are
    expected = {k: (retrieval_recall(images @ texts.T, groups, groups, k),
                    retrieval_recall(texts @ images.T, groups, groups, k)) for k in (1, 5)}
    shapes: list[tuple[int, ...]] = []

    def spy(similarity, *args):
        shapes.append(tuple(similarity.shape))
        return retrieval_recall(similarity, *args)

    monkeypatch.setattr(contrastive, "retrieval_recall", spy)
    metrics = contrastive.recall_metrics(images, texts, groups, chunk=3)
    assert shapes and max(rows for rows, _ in shapes) == 3  # never the whole 10 x 10 matrix
    for k, (image_to_text, text_to_image) in expected.items():
        assert metrics[f"image_to_text_recall_at_{k}"] == pytest.approx(image_to_text)
        assert metrics[f"text_to_image_recall_at_{k}"] == pytest.approx(text_to_image)
        assert metrics[f"recall_at_{k}"] == pytest.approx((image_to_text + text_to_image) / 2)
