"""The one run loader (deltatune.runs) behind eval, export and generate: what a finished run loads back as, every
unusable directory as one line, runs saved before data.columns, and `generate --compare` showing the true base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from deltatune import load_config, train
from deltatune.errors import UserError
from deltatune.generate import generate_from_run, generate_text
from deltatune.runs import evaluate_run
from deltatune.runs import load_run, open_run
from deltatune.training.run_dir import RunDir
from tests.bad_input import assert_refused, write_jsonl

PROMPT = "what is 3 plus 4"


def tiny_run(root: Path, name: str, overrides: list[str]) -> Path:
    config = load_config(None, [f"output_dir={root / 'runs'}", f"run_name={name}", "train.progress=false",
                                "train.num_threads=1", *overrides])
    return Path(train(config)["run_dir"])


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classification")
    data = write_jsonl(root / "reviews.jsonl", [{"body": f"{'good' if i % 2 else 'bad'} film {i}", "stars": i % 2}
                                                for i in range(40)])
    return tiny_run(root, "text", ["model.name=tests.tiny_models:tiny_bert", "model.task=classification",
                                   f"data.name={data}", "data.columns.text=body", "data.columns.label=stars",
                                   "method.name=lora", "method.r=4", "train.max_steps=3", "train.lr=1e-2"])


def sft_run(root: Path, method: str, extra: list[str]) -> Path:
    """A causal-LM run on chat-formatted sums (the chat template keeps random models from stopping at once)."""
    pairs = [{"prompt": f"what is {a} plus {b}", "response": f"{a + b}"} for a in range(6) for b in range(6)]
    data = write_jsonl(root / "pairs.jsonl", pairs)
    return tiny_run(root, method, ["model.name=tests.tiny_models:tiny_chat_llama", "model.task=causal-lm",
                                   f"data.name={data}", "data.max_length=32", "train.batch_size=6",
                                   f"method.name={method}", *extra])


# --- what a finished run loads back as --------------------------------------------------------------------------

def test_load_run_gives_the_trained_model_task_and_data(classification_run) -> None:
    run = load_run(classification_run, with_data=True)
    assert run.task.name == "classification" and run.config.data.columns == {"text": "body", "label": "stars"}
    assert not run.model.training and run.data is not None and run.data.test
    weights, method_config = RunDir(classification_run).read_final_weights()
    assert method_config["name"] == "lora" and weights
    parameters = dict(run.model.named_parameters())
    assert all(torch.equal(parameters[name], tensor) for name, tensor in weights.items() if name in parameters)
    assert callable(run.processor)


def test_load_run_without_data_needs_no_data_file(tmp_path) -> None:
    run_dir = sft_run(tmp_path, "lora", ["method.r=4", "train.max_steps=2"])
    (tmp_path / "pairs.jsonl").unlink()  # generation must not need the data any more
    run = load_run(run_dir)
    assert run.data is None and run.task.can_generate
    with pytest.raises(UserError, match="pairs.jsonl' not found"):
        load_run(run_dir, with_data=True)


def test_unusable_run_directories_are_one_line_errors(tmp_path, classification_run, capsys) -> None:
    with pytest.raises(UserError, match=r"is not a run directory \(no config.yaml\)"):
        open_run(tmp_path / "missing")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((classification_run / "config.yaml").read_text())
    with pytest.raises(UserError, match="has no final weights yet; finish it with `deltatune train CONFIG --resume`"):
        open_run(unfinished)
    for command in (["eval"], ["generate", "--prompt", "hi"], ["export"]):
        argv = [command[0], str(unfinished), *command[1:]] + ([str(tmp_path / "out")] if command == ["export"] else [])
        assert_refused(argv, "has no final weights yet", capsys, tmp_path)
    assert_refused(["generate", str(classification_run), "--prompt", "hi"],
                   r"is a classification run; generation needs a run whose task generates text \(causal-lm, preference, prompts\)",
                   capsys, tmp_path)


def test_runs_saved_before_data_columns_still_load(tmp_path, classification_run) -> None:
    """Their config.yaml spelled every role of every task as its own key; eval maps the ones the task reads."""
    old = tmp_path / "old-run"
    old.mkdir()
    for name in ("splits.json", "weights"):
        (old / name).symlink_to(classification_run / name)
    saved = yaml.safe_load((classification_run / "config.yaml").read_text())
    saved["data"].pop("columns")
    saved["data"].update(text_column="body", text_pair_column=None, label_column="stars", prompt_column="prompt",
                         response_column="response", image_column="image")
    (old / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert open_run(old).config.data.columns == {"text": "body", "label": "stars"}
    metrics = evaluate_run(old, echo=lambda *_: None)
    assert metrics == evaluate_run(classification_run, echo=lambda *_: None)


# --- generate --compare -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, extra", [
    ("prompt", ["method.num_virtual_tokens=8", "train.max_steps=10", "train.lr=0.3"]),
    ("lora", ["method.r=8", "train.max_steps=30", "train.lr=2e-2"]),
])
def test_compare_base_is_the_plain_model_and_tuned_is_the_trained_one(tmp_path, method, extra) -> None:
    """Before the fix, a prompt run's "base" was the model with its untrained soft prompt, which already changes
    the model's outputs; the base must be the pretrained model alone."""
    from deltatune.runner import build_model
    from tests.tiny_models import tiny_chat_llama_processor, tiny_llama

    run_dir = sft_run(tmp_path, method, extra)
    results = generate_from_run(run_dir, [PROMPT], compare=True, max_new_tokens=6, echo=lambda *_: None)
    torch.manual_seed(0)  # train.seed: the tiny model's random weights as training started from them
    plain = tiny_llama().eval()
    assert results[0]["base"] == generate_text(plain, tiny_chat_llama_processor(), PROMPT, 6)
    # The tiny model's greedy text hardly reacts to an untrained soft prompt, its logits do: compare those too.
    saved, ids = open_run(run_dir), tiny_chat_llama_processor()(PROMPT, return_tensors="pt")["input_ids"]
    untrained, _ = build_model(saved.config, saved.task, None)
    with torch.no_grad():
        last = {name: model(input_ids=ids).logits[:, -1] for name, model in
                [("plain", plain), ("base", saved.load_base_model()), ("untrained", untrained.eval())]}
    assert torch.equal(last["base"], last["plain"])
    assert torch.equal(last["untrained"], last["plain"]) == (method == "lora")  # LoRA starts as the identity
    tuned = load_run(run_dir)
    assert results[0]["tuned"] == generate_text(tuned.model, tuned.processor, PROMPT, 6)
    assert results[0]["base"] and results[0]["tuned"] != results[0]["base"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["validation"]["loss"] < summary["before"]["validation"]["loss"]


def test_export_reloads_an_image_run_with_the_tasks_auto_class(tmp_path) -> None:
    """`model.task: auto` reads the ViT's architecture; export reloads it with AutoModelForImageClassification."""
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    from deltatune.export import export_run

    config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=3, architectures=["ViTForImageClassification"])
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps({"size": 16}))
    run_dir = tiny_run(tmp_path, "vit", [f"model.name={tmp_path / 'vit'}", "data.name=digits", "data.max_examples=60",
                                         "train.max_steps=2", "train.batch_size=8"])
    assert json.loads((run_dir / "summary.json").read_text())["task"] == "image-classification"
    result = export_run(run_dir, tmp_path / "exported", echo=lambda *_: None)
    assert result["max_abs_logit_difference"] <= 1e-5
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "exported").config.num_labels == 10


def test_the_public_load_run_gives_the_trained_model(classification_run) -> None:
    import deltatune

    run = deltatune.load_run(classification_run)
    assert run.task.name == "classification" and not run.model.training and run.data is None
    assert deltatune.load_run(classification_run, with_data=True).data.test


@pytest.mark.parametrize("processor", ["tiny_llama_processor", "tiny_chat_llama_processor"])
def test_generate_feeds_the_prompt_as_sft_put_it_before_a_response(processor) -> None:
    """With or without a chat template, the model sees the prefix SFT trained it to answer after (bos + "prompt\\n"
    without a template: a BERT-style tokenizer's own [CLS] ... [SEP] would be a context it never saw)."""
    import tests.tiny_models as tiny_models
    from deltatune.data.sft import encode_prompts, encode_sft

    tokenizer, seen = getattr(tiny_models, processor)(), {}

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, ids: torch.Tensor, **_) -> torch.Tensor:
            seen["ids"] = ids[0].tolist()
            return ids

    generate_text(Recorder(), tokenizer, PROMPT, 4)
    assert seen["ids"] == encode_prompts(tokenizer, [PROMPT], 256)[0]["input_ids"]
    trained = encode_sft(tokenizer, [PROMPT], ["7"], 256)[0]
    assert trained["input_ids"][: len(seen["ids"])] == seen["ids"]


def test_a_cnn_run_as_model_name_is_refused_and_leaves_nothing(tmp_path) -> None:
    from PIL import Image

    for label in range(2):
        folder = tmp_path / "images" / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (200 * label, 30, 30 + 10 * i)).save(folder / f"{i}.png")
    common = ["model.name=tests.tiny_models:tiny_cnn", "model.task=image-classification",
              f"data.name={tmp_path / 'images'}", "method.name=full", "train.max_steps=1"]
    cnn = tiny_run(tmp_path, "cnn", common)
    with pytest.raises(UserError, match=r"not a transformers model.*model\.init_from="):
        tiny_run(tmp_path, "on-cnn", [*common[1:], f"model.name={cnn}"])
    assert not [path.name for path in cnn.iterdir() if path.name.startswith("merged")]
