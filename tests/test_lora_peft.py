"""LoRA's PEFT interoperability in both directions (the shared checks: tests/peft_interop.py)."""

import pytest
import torch

import deltatune
from tests.helpers import logits, token_batch
from tests.peft_interop import TOLERANCE, peft_reads_ours, we_read_peft

peft = pytest.importorskip("peft")


def batch(kind: str):
    return token_batch(2, 10, seed=3, attention_mask=kind != "llama")


# ---- deltatune writes, peft reads ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, options", [
    ("llama", {"r": 4, "lora_alpha": 8}),
    ("llama", {"r": 4, "use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    ("llama", {"name": "dora", "r": 4}),
    ("bert", {"r": 4}),  # the new head (classifier + pooler) in modules_to_save
])
def test_peft_loads_our_adapter(tmp_path, kind, options):
    config, keys = peft_reads_ours(tmp_path, kind, {"name": "lora", "init_lora_weights": False, **options},
                                   batch(kind), logits)
    assert config["peft_type"] == "LORA" and config["use_dora"] == (options.get("name") == "dora")
    if kind == "bert":
        assert sorted(config["modules_to_save"]) == ["bert.pooler.dense", "classifier"]
    layer = "base_model.model.model.layers.0.self_attn.q_proj" if kind == "llama" else \
        "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert {f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"} <= keys


# ---- peft writes, deltatune reads ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, options", [
    ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("llama", {"target_modules": ["q_proj", "k_proj"], "use_rslora": True, "r": 6,
               "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"q_proj": 5}}),
    ("llama", {"target_modules": ["q_proj", "o_proj", "up_proj"], "use_dora": True}),
    ("bert", {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),  # classifier in modules_to_save
])
def test_we_load_peft_adapter(tmp_path, kind, options):
    settings = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **options}
    we_read_peft(tmp_path, kind, peft.LoraConfig(**settings), batch(kind), logits)


def test_peft_gpt2_conv1d_adapter_round_trips(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=120, n_positions=32)).save_pretrained(
        tmp_path / "base")
    inputs = {"input_ids": torch.randint(0, 120, (2, 10))}
    theirs = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), peft.LoraConfig(
        r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    expected = logits(theirs, inputs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    deltatune.load_adapter(ours, tmp_path / "peft")
    assert (logits(ours, inputs) - expected).abs().max() <= TOLERANCE
    deltatune.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "ours")
    assert (logits(again, inputs) - expected).abs().max() <= TOLERANCE
