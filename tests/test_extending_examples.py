"""The worked examples of docs/extending.md really work. The toy method (toy_scale) and the toy objective
(toy_label_smoothing) live in tests/extending_examples/ exactly as the page shows them (a test compares the files with
the page), are registered only while this module runs, and are checked to do what the page says."""

import contextlib
import importlib
import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune.errors import UserError
from deltatune.methods import METHODS
from deltatune.models.families import family_of
from deltatune.objectives import OBJECTIVES, get_objective
from deltatune.registry import Registry
from deltatune.tasks import TASKS, build_datasets, get_task
from tests import test_method_contracts as contracts
from tests.tiny_models import tiny_bert, tiny_llama

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
EXAMPLES = Path(__file__).resolve().parent / "extending_examples"


@contextlib.contextmanager
def _registered(key: str, registry: Registry, name: str | None = None) -> Iterator[types.ModuleType]:
    """Import tests/extending_examples/KEY.py, whose decorator registers NAME (default: KEY); afterwards undo both, so
    the other tests (which list every registered entry) never see it and a later import registers it afresh."""
    module_name = f"tests.extending_examples.{key}"
    try:
        yield importlib.import_module(module_name)
    finally:
        registry._entries.pop(name or key, None)
        sys.modules.pop(module_name, None)


@pytest.fixture(scope="module")
def toy_scale():
    """Method toy_scale and its layer class, registered while this module's tests run."""
    with _registered("toy_scale", METHODS) as module:
        yield module.ToyScale, module.ScaledLinear


@pytest.fixture(scope="module")
def toy_label_smoothing():
    """Objective toy_label_smoothing, registered while this module's tests run."""
    with _registered("toy_label_smoothing", OBJECTIVES) as module:
        yield module.LabelSmoothedClassification


@pytest.fixture(scope="module")
def stars_sentiment():
    """Task stars-sentiment, registered while this module's tests run."""
    with _registered("stars_sentiment", TASKS, "stars-sentiment") as module:
        yield module


def _doc_block(key: str) -> str:
    """The python block that follows `<!-- tested: KEY -->` in docs/extending.md."""
    match = re.search(rf"<!-- tested: {key} -->\n```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert match, f"docs/extending.md has no python block marked 'tested: {key}'"
    return match.group(1)


@pytest.mark.parametrize("key", ["toy_scale", "toy_label_smoothing", "stars_sentiment"])
def test_the_page_shows_exactly_the_tested_code(key):
    assert (EXAMPLES / f"{key}.py").read_text(encoding="utf-8") == _doc_block(key)


def test_toy_scale_keeps_the_output_trains_only_its_scales_and_refuses_cnns(toy_scale):
    method_class, scaled_linear = toy_scale
    assert deltatune.available_methods()["toy_scale"] is method_class
    torch.manual_seed(0)
    model = tiny_bert(num_labels=3)
    batch = {"input_ids": torch.randint(5, 100, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    model.eval()
    before = model(**batch).logits
    deltatune.apply(model, {"name": "toy_scale", "include_mlp": False})
    assert torch.equal(model(**batch).logits, before)  # ℓ = 1 at init
    family = family_of(model)
    wrapped = {name for name, module in model.named_modules() if isinstance(module, scaled_linear)}
    # Attention only: query, key, value and the attention output of each of the 2 blocks.
    assert len(wrapped) == 8 and all(family.is_attention(name) for name in wrapped)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {f"{name}.scale" for name in wrapped} | {
        name for name, _ in model.named_parameters() if family.is_head(name)}
    with pytest.raises(UserError, match="works on transformer models"):
        deltatune.apply(contracts.build("cnn")[0], {"name": "toy_scale"})
    with pytest.raises(UserError, match="method.include_mlp"):
        deltatune.load_config(None, ["method.name=toy_scale", "method.include_mlp=maybe"])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_toy_scale_passes_the_contract_suite(toy_scale, kind, tmp_path):
    contracts.test_output_unchanged_at_init("toy_scale", kind)
    contracts.test_only_trainable_parameters_get_gradients("toy_scale", kind)
    if kind == "bert":
        contracts.test_save_load_round_trip_and_loss_falls("toy_scale", kind, tmp_path)


def test_toy_scale_on_llama_scales_attention_and_mlp(toy_scale):
    _, scaled_linear = toy_scale
    model = tiny_llama()
    deltatune.apply(model, {"name": "toy_scale"})
    wrapped = sorted(name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, scaled_linear))
    assert wrapped == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] * 2)


def test_label_smoothing_loss_is_the_formula(toy_label_smoothing):
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))

    class Fixed(torch.nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return logits

    objective = get_objective("toy_label_smoothing", get_task("classification")())()
    loss, stats = objective.loss(Fixed(), {"inputs": torch.zeros(6), "labels": labels})
    # torch's own label smoothing is the same target: 1 - ε + ε/K on the true class, ε/K elsewhere.
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-6)
    probabilities = logits.softmax(-1)
    by_hand = [0.9 * -probabilities[i, labels[i]].log() + 0.1 * -probabilities[i].log().mean() for i in range(6)]
    assert loss.item() == pytest.approx(float(sum(by_hand) / 6), rel=1e-6)
    assert stats["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    metrics = objective.evaluate(Fixed(), [{"inputs": torch.zeros(6), "labels": labels}])
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6)
    # `auto` still picks the built-in classification objective: the toy names no default task.
    assert get_objective("auto", get_task("classification")()).name == "classification"


def _sentiment_rows(count: int = 240) -> list[dict]:
    """Six-word snippets: three sentiment words (which decide the label) among three neutral ones."""
    rng = np.random.default_rng(0)
    positive, negative = ["good", "great", "superb", "lovely"], ["bad", "awful", "dull", "poor"]
    rows = []
    for i in range(count):
        label = i % 2
        words = list(rng.choice(positive if label else negative, 3)) + list(rng.choice(["film", "plot", "cast"], 3))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": ["neg", "pos"][label]})
    return rows


def _train_toy(tmp_path: Path, model_name: str, epochs: int) -> dict:
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _sentiment_rows()))
    config = deltatune.load_config(None, [
        f"output_dir={tmp_path / 'runs'}", "run_name=toy", "train.progress=false", "train.num_threads=2",
        f"model.name={model_name}", "model.task=classification", f"data.name={data}", "data.max_length=16",
        "method.name=toy_scale", "objective.name=toy_label_smoothing",
        f"train.epochs={epochs}", "train.lr=1e-2", "train.batch_size=16"])
    return deltatune.train(config)


def test_a_run_with_the_toy_method_and_objective_saves_what_eval_reproduces(
        toy_scale, toy_label_smoothing, tmp_path):
    from safetensors.torch import load_file

    summary = _train_toy(tmp_path, "tests.tiny_models:tiny_bert", epochs=1)
    # 2 blocks x (4 attention linears of width 32 + intermediate 64 + output 32) scales, plus pooler and 2-way head.
    head = 32 * 32 + 32 + 32 * 2 + 2
    assert summary["trainable_parameters"] == 2 * (4 * 32 + 64 + 32) + head
    saved = load_file(Path(summary["run_dir"]) / "weights" / "model.safetensors")
    scales = {name: tensor for name, tensor in saved.items() if name.endswith(".scale")}
    assert len(scales) == 12 and all(not torch.equal(s, torch.ones_like(s)) for s in scales.values())
    again = deltatune.evaluate_run(summary["run_dir"])
    assert again["test"] == pytest.approx(summary["after"]["test"], rel=1e-5)


@pytest.mark.slow
def test_the_toy_method_and_objective_learn_on_pretrained_minilm(toy_scale, toy_label_smoothing, tmp_path):
    # A random tiny model gives the scales nothing to work with; pretrained MiniLM features do.
    summary = _train_toy(tmp_path, "minilm-l6", epochs=3)
    assert summary["after"]["test"]["accuracy"] >= 0.9 and summary["before"]["test"]["accuracy"] <= 0.7
    # Label smoothing keeps the loss above the smoothed target's entropy: -(0.95 ln 0.95 + 0.05 ln 0.05) = 0.199.
    assert summary["after"]["test"]["loss"] > 0.198


def _rated_reviews(path: Path, count: int = 60) -> Path:
    """Rated reviews under the file's own column names: the star count decides which word the review holds."""
    words = {1: "awful", 2: "poor", 3: "okay", 4: "good", 5: "superb"}
    rows = [{"review": f"the film was {words[1 + i % 5]}", "rating": 1 + i % 5} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_stars_sentiment_maps_stars_to_three_classes_and_names_a_bad_row(stars_sentiment, tmp_path):
    from tests.tiny_models import tiny_bert_processor

    data = _rated_reviews(tmp_path / "reviews.jsonl")
    config = deltatune.DataConfig(name=str(data), columns={"text": "review", "stars": "rating"})
    bundle = build_datasets(config, "stars-sentiment", tiny_bert_processor())
    assert bundle.num_labels == 3 and bundle.label_names == ["negative", "neutral", "positive"]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for name in ("train", "test"):
        expected = [{1: 0, 2: 0, 3: 1, 4: 2, 5: 2}[rows[i]["rating"]] for i in bundle.splits[name]]
        assert [example["labels"] for example in getattr(bundle, name)] == expected
    with pytest.raises(UserError, match="task 'stars-sentiment' does not read; its roles are text, stars"):
        build_datasets(deltatune.DataConfig(name=str(data), columns={"label": "rating"}), "stars-sentiment", None)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(data.read_text().replace('"rating": 3', '"rating": "three"', 1))
    with pytest.raises(UserError, match=r"row 2: stars must be a number from 1 to 5, got 'three'"):
        build_datasets(deltatune.DataConfig(name=str(broken), columns={"text": "review", "stars": "rating"}),
                       "stars-sentiment", tiny_bert_processor())


def test_a_stars_sentiment_run_trains_a_three_way_head_and_eval_reproduces_it(stars_sentiment, tmp_path):
    data = _rated_reviews(tmp_path / "reviews.jsonl", count=100)
    config = deltatune.load_config(None, [
        f"output_dir={tmp_path / 'runs'}", "run_name=stars", "train.progress=false", "train.num_threads=2",
        "model.name=tests.tiny_models:tiny_bert", "model.task=stars-sentiment", f"data.name={data}",
        "data.columns.text=review", "data.columns.stars=rating", "data.max_length=16", "train.epochs=6",
        "train.lr=3e-3", "train.batch_size=16"])
    summary = deltatune.train(config)
    from safetensors.torch import load_file

    assert summary["task"] == "stars-sentiment"
    assert summary["after"]["validation"]["loss"] < summary["before"]["validation"]["loss"]
    saved = load_file(Path(summary["run_dir"]) / "weights" / "model.safetensors")
    assert saved["classifier.weight"].shape == (3, 32)  # negative, neutral, positive
    again = deltatune.evaluate_run(summary["run_dir"])
    assert again["test"] == pytest.approx(summary["after"]["test"], rel=1e-5)


def test_a_new_task_fits_the_embedded_models_that_have_its_head(stars_sentiment):
    from deltatune.config.schema import ModelConfig
    from deltatune.tasks import resolve_task

    # The page trains stars-sentiment on minilm-l6: the alias lists heads, not task names, so it fits unedited.
    assert resolve_task(ModelConfig(name="minilm-l6", task="stars-sentiment")) == "stars-sentiment"
    assert resolve_task(ModelConfig(name="smollm2-135m", task="stars-sentiment")) == "stars-sentiment"
    with pytest.raises(UserError, match="cannot be loaded for task 'stars-sentiment'; set model.task to "
                                        "image-classification, or pick another model"):
        resolve_task(ModelConfig(name="efficientnet-lite0", task="stars-sentiment"))
