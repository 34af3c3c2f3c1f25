"""PEFT interoperability in both directions (peft 0.21 is a test-only dependency).

Each test saves a tiny random base with save_pretrained, builds the adapter with one library and loads it with the
other onto a fresh copy of that base, and compares logits (max abs diff <= 1e-5)."""

import json

import pytest
import torch

import deltatune
from tests.tiny_models import tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

TOLERANCE = 1e-5


def save_base(kind: str, directory):
    torch.manual_seed(0)
    model = tiny_llama() if kind == "llama" else tiny_bert(num_labels=3)
    model.save_pretrained(directory)


def load_base(kind: str, directory):
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    model_class = LlamaForCausalLM if kind == "llama" else BertForSequenceClassification
    return model_class.from_pretrained(directory).eval()


def batch(kind: str):
    ids = torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids} if kind == "llama" else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def perturb(model, words: tuple[str, ...]):
    """Move parameters whose names contain any of `words` away from their init, so they matter in the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(word in name for word in words):
                param.mul_(1 + 0.2 * torch.randn_like(param))


# ---- deltatune writes, peft reads ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, options", [
    ("llama", {"r": 4, "lora_alpha": 8}),
    ("llama", {"r": 4, "use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    ("llama", {"name": "dora", "r": 4}),
    ("bert", {"r": 4}),  # the new head (classifier + pooler) in modules_to_save
])
def test_peft_loads_our_adapter(tmp_path, kind, options):
    save_base(kind, tmp_path / "base")
    ours = load_base(kind, tmp_path / "base")
    deltatune.apply(ours, {"name": "lora", "init_lora_weights": False, **options})
    perturb(ours, ("lora_magnitude_vector", "modules_to_save"))
    expected = logits(ours, batch(kind))
    deltatune.save_adapter(ours, tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (options.get("name") == "dora")
    if kind == "bert":
        assert sorted(config["modules_to_save"]) == ["bert.pooler.dense", "classifier"]
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    layer = "base_model.model.model.layers.0.self_attn.q_proj" if kind == "llama" else \
        "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert {f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"} <= keys

    theirs = peft.PeftModel.from_pretrained(load_base(kind, tmp_path / "base"), tmp_path / "adapter")
    assert (logits(theirs, batch(kind)) - expected).abs().max() <= TOLERANCE


# ---- peft writes, deltatune reads ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, options", [
    ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("llama", {"target_modules": ["q_proj", "k_proj"], "use_rslora": True, "r": 6,
               "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"q_proj": 5}}),
    ("llama", {"target_modules": ["q_proj", "o_proj", "up_proj"], "use_dora": True}),
    ("bert", {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),  # classifier in modules_to_save
])
def test_we_load_peft_adapter(tmp_path, kind, options):
    save_base(kind, tmp_path / "base")
    settings = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **options}
    theirs = peft.get_peft_model(load_base(kind, tmp_path / "base"), peft.LoraConfig(**settings))
    perturb(theirs, ("lora_magnitude_vector", "modules_to_save"))
    expected = logits(theirs, batch(kind))
    theirs.save_pretrained(tmp_path / "adapter")

    ours = load_base(kind, tmp_path / "base")
    base = logits(ours, batch(kind))
    deltatune.load_adapter(ours, tmp_path / "adapter", name="from_peft")
    assert (logits(ours, batch(kind)) - expected).abs().max() <= TOLERANCE
    assert (expected - base).abs().max() > 1e-3  # the adapter does change the output
    with deltatune.disabled(ours):
        assert (logits(ours, batch(kind)) - base).abs().max() <= TOLERANCE


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
