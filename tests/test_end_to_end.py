"""Whole runs through the public API on tiny random models: text classification, causal-LM SFT with packing,
image classification from an image folder; then `eval` and `generate` on the finished run directories."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deltatune import load_config, train
from deltatune.cli import main
from deltatune.generate import generate_from_run
from deltatune.runs import evaluate_run


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run(tmp_path: Path, overrides: list[str]) -> dict:
    config = load_config(None, [f"output_dir={tmp_path / 'runs'}", "train.progress=false", "train.num_threads=2",
                                *overrides])
    return train(config)


def test_text_classification_learns_and_eval_matches(tmp_path):
    rng = np.random.default_rng(0)
    positive, negative = ["good", "great", "superb", "lovely"], ["bad", "awful", "dull", "poor"]
    rows = []
    for i in range(240):
        label = i % 2
        words = list(rng.choice(positive if label else negative, 3)) + list(rng.choice(["film", "plot", "cast"], 3))
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": ["neg", "pos"][label]})
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    summary = run(tmp_path, ["model.name=tests.tiny_models:tiny_bert", "model.task=classification",
                             f"data.name={data}", "data.columns.text=sentence", "data.columns.label=sentiment",
                             "train.epochs=6", "train.lr=3e-3", "train.batch_size=16", "run_name=text"])
    assert summary["after"]["test"]["accuracy"] >= 0.9 > summary["before"]["test"]["accuracy"]
    run_dir = Path(summary["run_dir"])
    for name in ("config.yaml", "splits.json", "metrics.jsonl", "summary.json", "summary.md", "before.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "weights" / "model.safetensors").exists() and (run_dir / "best" / "model.safetensors").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert {r["type"] for r in records} == {"train", "eval"}
    again = evaluate_run(run_dir, echo=lambda *_: None)
    assert again["test"]["accuracy"] == pytest.approx(summary["after"]["test"]["accuracy"])
    assert main(["eval", str(run_dir)]) == 0


def test_causal_lm_sft_with_packing_lowers_validation_loss_and_generates(tmp_path):
    pairs = [{"prompt": f"what is {a} plus {b}", "response": f"{a} plus {b} is {a + b}"}
             for a in range(12) for b in range(12)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    summary = run(tmp_path, ["model.name=tests.tiny_models:tiny_llama", "model.task=causal-lm", f"data.name={data}",
                             "data.packing=true", "data.max_length=64", "train.epochs=15", "train.lr=5e-3",
                             "train.batch_size=8", "run_name=sft"])
    before, after = summary["before"]["validation"]["loss"], summary["after"]["validation"]["loss"]
    assert after < 0.7 * before
    assert summary["after"]["validation"]["perplexity"] == pytest.approx(np.exp(after), rel=1e-4)
    results = generate_from_run(summary["run_dir"], ["what is 3 plus 4"], compare=True, max_new_tokens=8,
                                echo=lambda *_: None)
    assert results[0]["tuned"] and "base" in results[0]


def test_image_folder_classification_with_frozen_backbone(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 200, 30)]):
        folder = tmp_path / "images" / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(rng.normal(colour, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    summary = run(tmp_path, ["model.name=tests.tiny_models:tiny_cnn", "model.task=image-classification",
                             f"data.name={tmp_path / 'images'}", "method.name=freeze", "method.last_n_blocks=1",
                             "train.epochs=8", "train.lr=1e-2", "train.batch_size=8", "run_name=images"])
    assert summary["after"]["test"]["accuracy"] >= 0.8
    assert summary["trainable_parameters"] < summary["total_parameters"]


@pytest.mark.parametrize("method, extra", [("lora", []), ("dora", []),
                                           # only `query` adapted: the other NF4 linears must be dequantised too
                                           ("qlora", ["method.target_modules=[query]"])])
def test_export_writes_a_plain_transformers_model_with_the_same_logits(tmp_path, method, extra):
    import transformers

    from deltatune.export import export_run

    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": i % 2} for i in range(60)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    summary = run(tmp_path, ["model.name=tests.tiny_models:tiny_bert", "model.task=classification",
                             f"data.name={data}", f"method.name={method}", "method.r=4", "train.max_steps=5",
                             "train.lr=1e-2", f"run_name={method}", *extra])
    result = export_run(summary["run_dir"], tmp_path / "exported", echo=lambda *_: None)
    assert result["max_abs_logit_difference"] <= 1e-5
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported")
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert all(param.dtype == torch.float32 for param in model.parameters())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tokenizer("good film")["input_ids"]
    assert main(["export", summary["run_dir"], str(tmp_path / "exported")]) == 2  # refuses to overwrite
