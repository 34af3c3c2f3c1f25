"""Checks deltatune.models makes once a model is built, so a model that would fail (or silently be wrong) mid-training
is refused up front: tensors re-initialised outside the task head, students whose kept blocks do not chain, and
data.max_length against the position table (dual encoders' text towers, methods' virtual tokens)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deltatune.config.loader import load_config
from deltatune.config.schema import ModelConfig, StudentConfig
from deltatune.errors import UserError
from deltatune.models import load_model
from deltatune.models.dual_encoder import DualProcessor
from deltatune.models.positions import check_max_length, virtual_token_count
from tests.bad_input import write_jsonl
from tests.helpers import image_batch, tiny_dual_encoder
from tests.tiny_models import task, tiny_bert, tiny_bert_processor, tiny_cnn_processor


# ---- finding: ignore_mismatched_sizes only for the head ------------------------------------------------------
def _saved_bert(tmp_path: Path, **config_changes: object) -> str:
    """tiny_bert (2 labels, 128 positions) saved, with `config_changes` written into its config.json afterwards."""
    torch.manual_seed(0)
    tiny_bert(num_labels=2).save_pretrained(tmp_path / "bert")
    path = tmp_path / "bert" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return str(tmp_path / "bert")


def test_a_head_of_another_label_count_is_replaced_and_the_rest_loaded(tmp_path: Path) -> None:
    name = _saved_bert(tmp_path)
    model = load_model(ModelConfig(name=name, task="classification"), task("classification"), 3)
    assert model.classifier.out_features == 3
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in _state(name).items() if "classifier" not in key)


def test_heads_the_family_table_does_not_name_are_replaced_too(tmp_path: Path) -> None:
    """BART's classification_head and XLNet's logits_proj lie outside the inner transformer: a head of another
    label count there is new, as transformers makes it, not a refused checkpoint."""
    from transformers import BartConfig, BartForSequenceClassification, XLNetConfig, XLNetForSequenceClassification

    models = {"bart": BartForSequenceClassification(BartConfig(
                  vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_labels=3,
                  max_position_embeddings=64)),
              "xlnet": XLNetForSequenceClassification(XLNetConfig(vocab_size=100, d_model=16, n_layer=1, n_head=2,
                                                                  d_inner=32, num_labels=3))}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        loaded = load_model(ModelConfig(name=str(tmp_path / name), task="classification"), task("classification"), 2)
        assert loaded.config.num_labels == 2, name


def _state(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


def test_a_config_resizing_a_pretrained_tensor_is_refused_not_reinitialised(tmp_path: Path) -> None:
    # Raising max_position_embeddings to allow a longer data.max_length would silently give random positions.
    name = _saved_bert(tmp_path, max_position_embeddings=256)
    with pytest.raises(UserError, match=r"bert\.embeddings\.position_embeddings\.weight has shape \(128, 32\) in the "
                                        r"checkpoint .* but \(256, 32\) under its config\.json") as caught:
        load_model(ModelConfig(name=name, task="classification"), task("classification"), 3)
    assert "\n" not in str(caught.value)


# ---- finding: students whose kept blocks do not chain ----------------------------------------------------------
def _cnn_student(**student: object) -> torch.nn.Module:
    config = ModelConfig(name="tests.tiny_models:tiny_cnn", task="image-classification",
                         student=StudentConfig(**student))
    return load_model(config, task("image-classification"), 4)


@pytest.mark.parametrize("student, message", [
    ({"every_other": True}, r"block 0 would give width 8 to block 2, which takes 16"),
    ({"keep_layers": [1, 2]}, r"the layers before the blocks would give width 3 to block 1, which takes 8"),
    ({"keep_layers": [0, 1]}, r"block 1 would give width 16 to the layers after the blocks, which takes 32"),
])
def test_a_student_whose_kept_blocks_change_width_is_refused(student: dict, message: str) -> None:
    # tiny_cnn's three stages widen 3 -> 8 -> 16 -> 32 channels: any cut breaks the chain.
    with pytest.raises(UserError, match=r"model\.student keeps blocks .*" + message):
        _cnn_student(**student)


def test_a_student_whose_kept_blocks_chain_is_built_and_runs() -> None:
    student = _cnn_student(keep_layers=[0, 1, 2])
    assert student(**image_batch(2)).shape == (2, 4)


def test_efficientnet_students_are_refused_across_stages_and_built_within_them() -> None:
    # Lite0's blocks widen 16 -> 24 -> 40 -> 80 -> 112 -> 192 -> 320; every_other skips a widening block.
    config = ModelConfig(name="efficientnet-lite0", student=StudentConfig(every_other=True))
    with pytest.raises(UserError, match=r"block 0 would give width 16 to block 2, which takes 24"):
        load_model(config, task("image-classification"), 4)
    within = StudentConfig(keep_layers=[0, 1, 3, 5, 6, 8, 9, 11, 12, 15])  # drops only blocks that keep their width
    student = load_model(ModelConfig(name="efficientnet-lite0", student=within), task("image-classification"), 4)
    assert student(pixel_values=torch.randn(1, 3, 64, 64)).shape == (1, 4)


class _RoutedBlock(torch.nn.Module):
    """A block whose last Linear is a side branch (a router), not its output: its widths cannot be read."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.router = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + 0 * self.router(x).sum()


def test_blocks_whose_widths_cannot_be_read_are_not_refused() -> None:
    from deltatune.models.families import FAMILIES
    from deltatune.models.student import keep_blocks

    # Dense and routed blocks interleaved, as in MoE models with dense layers between: all 8 wide, yet the routed
    # blocks' last Linear says 3.
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8), _RoutedBlock(), torch.nn.Linear(8, 8), _RoutedBlock()])
    keep_blocks(model, FAMILIES["generic"], StudentConfig(every_other=True))
    assert len(model.layers) == 2


# ---- finding: data.max_length of a dual encoder's text tower ----------------------------------------------------
def test_a_dual_encoder_is_checked_against_its_text_tower() -> None:
    model = tiny_dual_encoder()  # text tower: tiny_bert, 128 positions
    processor = DualProcessor(image=tiny_cnn_processor(), text=tiny_bert_processor())
    check_max_length(model, 128, processor)
    with pytest.raises(UserError, match=r"data\.max_length=1024 .*config\.max_position_embeddings = 128"):
        check_max_length(model, 1024, processor)
    with pytest.raises(UserError, match=r"tokenizer\.model_max_length = 64"):
        check_max_length(model, 100, DualProcessor(image=None, text=SimpleNamespace(model_max_length=64)))


# ---- finding: virtual tokens take positions too -----------------------------------------------------------------
def test_virtual_tokens_count_against_the_position_table() -> None:
    model = tiny_bert()  # 128 positions
    check_max_length(model, 124, None, virtual_tokens=4)
    with pytest.raises(UserError, match=r"data\.max_length=128 plus method\.num_virtual_tokens=4 .* at most 124"):
        check_max_length(model, 128, None, virtual_tokens=4)
    assert virtual_token_count(SimpleNamespace(num_virtual_tokens=20)) == 20
    assert virtual_token_count(SimpleNamespace(r=8)) == 0  # methods without virtual tokens


def _prompt_run(tmp_path: Path, max_length: int, method: str):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"example {i}", "label": i % 2} for i in range(8)])
    return load_config(None, ["model.name=tests.tiny_models:tiny_bert", "model.task=classification",
                              f"data.name={data}", f"data.max_length={max_length}", f"method.name={method}",
                              "method.num_virtual_tokens=4", f"output_dir={tmp_path / 'runs'}"])


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_run_with_virtual_tokens_is_refused_when_they_do_not_fit(tmp_path: Path, method: str) -> None:
    from deltatune.preparation import prepare

    assert prepare(_prompt_run(tmp_path, 124, method)).model is not None
    with pytest.raises(UserError, match=r"method\.num_virtual_tokens=4"):
        prepare(_prompt_run(tmp_path, 128, method))


def test_a_decoder_classifier_reads_padding_as_its_tokenizer_pads() -> None:
    """A config without pad_token_id gets eos from transformers' defaults; a tokenizer padding with its own token
    would then be read as content: the config takes the tokenizer's pad id."""
    import types

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from deltatune.models.hf import align_padding

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=1, num_labels=2, eos_token_id=2)).eval()
    model.config.pad_token_id = 2  # what pad_with_eos sets when the config has none
    align_padding(model, types.SimpleNamespace(pad_token_id=0))
    alone, padded = torch.tensor([[5, 6, 7]]), torch.tensor([[5, 6, 7, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=alone).logits,
                              model(input_ids=padded, attention_mask=(padded != 0).long()).logits, atol=1e-6)
