"""PEFT interoperability of the prompt-side methods (peft 0.21 is a test-only dependency): PROMPT_TUNING, P_TUNING
and PREFIX_TUNING files in both directions on a tiny causal LM (Llama) and a tiny BERT classifier, compared by
logits (max abs diff <= 1e-5), plus trainable-parameter counts equal to PEFT's for the same settings."""

import json

import pytest

import deltatune
from deltatune.errors import UserError
from deltatune.runner import count_parameters
from tests import helpers
from tests.peft_interop import TOLERANCE, load_base, peft_reads_ours, save_base, we_read_peft

peft = pytest.importorskip("peft")

N = 4

OURS = [
    ("llama", {"name": "prompt"}, "PROMPT_TUNING"),
    ("llama", {"name": "ptuning", "encoder_hidden_size": 16}, "P_TUNING"),
    ("llama", {"name": "ptuning", "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}, "P_TUNING"),
    ("llama", {"name": "prefix", "encoder_hidden_size": 16}, "PREFIX_TUNING"),
    ("llama", {"name": "ptuning_v2"}, "PREFIX_TUNING"),
    # PEFT puts prompts before [CLS]; keep_first_token: false trains an adapter with PEFT's placement.
    ("bert", {"name": "prompt", "keep_first_token": False}, "PROMPT_TUNING"),
    ("bert", {"name": "ptuning", "keep_first_token": False}, "P_TUNING"),
    ("bert", {"name": "prefix"}, "PREFIX_TUNING"),
    ("bert", {"name": "ptuning_v2"}, "PREFIX_TUNING"),
]


def batch(kind: str):
    inputs = helpers.token_batch(2, 9, seed=3)
    inputs["attention_mask"][1, -3:] = 0  # right padding: masks must account for the virtual tokens in both libraries
    return inputs


def logits(model, inputs):
    out = helpers.logits(model, inputs)
    # PEFT's causal LMs return logits for the virtual positions too; ours are aligned with the input.
    return out[:, -inputs["input_ids"].shape[1]:] if out.dim() == 3 else out


def peft_config(kind: str, options: dict):
    task = "CAUSAL_LM" if kind == "llama" else "SEQ_CLS"
    settings = {key: value for key, value in options.items() if key != "name"}
    config_class = {"prompt": peft.PromptTuningConfig, "ptuning": peft.PromptEncoderConfig,
                    "prefix": peft.PrefixTuningConfig}[options["name"]]
    return config_class(task_type=task, num_virtual_tokens=N, **settings)


@pytest.mark.parametrize("kind, options, peft_type", OURS)
def test_peft_loads_our_adapter(tmp_path, kind, options, peft_type):
    # The new head's trained copy (perturbed) must travel too.
    config, keys = peft_reads_ours(tmp_path, kind, {"num_virtual_tokens": N, **options}, batch(kind), logits)
    assert config["peft_type"] == peft_type and config["num_virtual_tokens"] == N
    head = {f"base_model.{module}.{part}"
            for module in ("classifier", "bert.pooler.dense") for part in ("weight", "bias")}
    assert keys == {"prompt_embeddings"} | (head if kind == "bert" else set())


THEIRS = [
    ("llama", {"name": "prompt", "prompt_tuning_init": "SAMPLE_VOCAB"}),
    ("llama", {"name": "ptuning", "encoder_hidden_size": 16}),
    ("llama", {"name": "ptuning", "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}),
    ("llama", {"name": "prefix", "prefix_projection": True, "encoder_hidden_size": 16}),
    ("llama", {"name": "prefix"}),
    ("bert", {"name": "prompt"}),  # classifier in modules_to_save
    ("bert", {"name": "ptuning", "encoder_hidden_size": 16}),
    ("bert", {"name": "prefix", "prefix_projection": True, "encoder_hidden_size": 16}),
]


@pytest.mark.parametrize("kind, options", THEIRS)
def test_we_load_peft_adapter(tmp_path, kind, options):
    ours, expected = we_read_peft(tmp_path, kind, peft_config(kind, options), batch(kind), logits)
    deltatune.save_adapter(ours, tmp_path / "again", name="from_peft")  # and it goes back out unchanged
    again = peft.PeftModel.from_pretrained(load_base(kind, tmp_path / "base"), tmp_path / "again")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    original = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(written) <= set(original)  # no field PEFT's config class for this type lacks
    assert (logits(again, batch(kind)) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("kind, options", [
    ("llama", {"name": "prompt"}),
    ("llama", {"name": "ptuning", "encoder_hidden_size": 16}),
    ("llama", {"name": "ptuning", "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}),
    ("llama", {"name": "prefix", "prefix_projection": True, "encoder_hidden_size": 16}),
    ("llama", {"name": "prefix", "prefix_projection": False}),
    ("bert", {"name": "prompt", "modules_to_save": ["classifier"]}),
    ("bert", {"name": "prefix", "prefix_projection": True, "encoder_hidden_size": 16,
              "modules_to_save": ["classifier"]}),
])
def test_trainable_parameter_counts_match_peft(tmp_path, kind, options):
    save_base(kind, tmp_path / "base")
    ours = load_base(kind, tmp_path / "base")
    deltatune.apply(ours, {"num_virtual_tokens": N, **options})
    peft_options = {key: value for key, value in options.items() if key != "modules_to_save"}
    theirs = peft.get_peft_model(load_base(kind, tmp_path / "base"), peft_config(kind, peft_options))
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def test_encoder_adapter_with_cls_first_is_not_saved_for_peft(tmp_path):
    save_base("bert", tmp_path / "base")
    ours = load_base("bert", tmp_path / "base")
    deltatune.apply(ours, {"name": "prompt", "num_virtual_tokens": N})  # keeps [CLS] first by default
    with pytest.raises(UserError, match="keep_first_token: false"):
        deltatune.save_adapter(ours, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_prefix_file_for_another_layout_of_the_same_width_is_refused(tmp_path):
    """A prefix file stores (layers × 2 × kv width) per token: another model can share that product. The saved
    layer count, width and head count must match this model's, not only the product."""
    save_base("llama", tmp_path / "base")
    ours = load_base("llama", tmp_path / "base")
    deltatune.apply(ours, {"name": "prefix", "num_virtual_tokens": N})
    deltatune.save_adapter(ours, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_layers": config["num_layers"] * 2,
                                       "token_dim": config["token_dim"] // 2}))
    fresh = load_base("llama", tmp_path / "base")
    with pytest.raises(UserError, match=r"saved for a model with token_dim=16, this one has token_dim=32; it was"):
        deltatune.load_adapter(fresh, tmp_path / "adapter")
