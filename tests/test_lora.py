"""LoRA / DoRA maths, merge, adapters API and bad input, on tiny models (fast)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.errors import UserError
from deltatune.methods.lora.fused_linear import keep_mask
from deltatune.methods.lora.layers_per_type import LoRAConv2d, LoRAEmbedding, LoRALinear
from deltatune.methods.lora.lora import LoRA, LoRAConfig
from deltatune.methods.lora.lora_layer import MAGNITUDE_KEY, LoRALayer, LoRASettings
from deltatune.models import ImageClassifier
from deltatune.models.families import family_of
from tests.helpers import (
    assert_disabled_gives,
    assert_merge_round_trip,
    assert_switches,
    logits,
    seeded,
    token_batch,
)
from tests.tiny_models import tiny_bert, tiny_cnn, tiny_llama

W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
BIAS = torch.tensor([0.5, -0.5])
A = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # r=2
B = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X = torch.tensor([[1.0, 1.0, 1.0]])


def known_linear(**options) -> nn.Sequential:
    """A 2×3 Linear with known W, b, A, B (r=2) inside a container."""
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(W)
        model[0].bias.copy_(BIAS)
    deltatune.apply(model, {"name": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["0"], "modules_to_save": [],
                            **options})
    layer = model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return model


def llama_batch():
    return token_batch(2, 9, attention_mask=False)


def bert_batch():
    return token_batch(3, 8)


# ---- maths -----------------------------------------------------------------------------------------------------
def test_lora_output_is_hand_computed():
    # Wx + b = [6.5, 14.5]; A x = [2, 1]; B A x = [4, 10]; alpha/r = 2  ->  [14.5, 34.5]
    assert torch.allclose(known_linear()(X), torch.tensor([[14.5, 34.5]]))


def test_rslora_scales_by_alpha_over_sqrt_r():
    scale = 4 / math.sqrt(2)
    expected = torch.tensor([[6.5 + 4 * scale, 14.5 + 10 * scale]])
    assert torch.allclose(known_linear(use_rslora=True)(X), expected)


@pytest.mark.parametrize("p, draws", [(0.0, False), (0.5, True)])
def test_dropout_is_skipped_entirely_at_zero(p, draws):
    """At p = 0 no mask is drawn at all (the random generator is untouched), at p > 0 one is."""
    model = known_linear(lora_dropout=p)
    model.train()
    before = torch.get_rng_state()
    model(X)
    assert (not torch.equal(torch.get_rng_state(), before)) == draws


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_dropout_applies_to_the_adapter_path_only(use_dora):
    model = known_linear(lora_dropout=0.5, use_dora=use_dora)
    model.train()
    x = torch.randn(6, 3)
    torch.manual_seed(5)
    output = model(x)
    torch.manual_seed(5)
    if use_dora:  # DoRA takes the composed path (torch's dropout); plain LoRA the fused one (its own mask)
        dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    else:
        keep, keep_probability = keep_mask(x.shape, 0.5, x.device)
        dropped = x * keep / keep_probability
    expected = x @ W.T + BIAS + 2.0 * dropped @ A.T @ B.T
    if use_dora:  # PEFT's form: base(x) + (m/n - 1)·W·d + (m/n)·s·B·A·d  (here m = ‖W‖, n = ‖W + s·B·A‖)
        ratio = W.norm(dim=1) / (W + 2.0 * B @ A).norm(dim=1)
        expected = x @ W.T + BIAS + (ratio - 1) * (dropped @ W.T) + ratio * (2.0 * dropped @ A.T @ B.T)
    assert torch.allclose(output, expected, atol=1e-5)


def test_linear_subclass_takes_the_generic_path_with_the_same_result():
    class CustomLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    plain, custom = nn.Linear(4, 3), CustomLinear(4, 3)
    custom.load_state_dict(plain.state_dict())
    layers = [LoRALinear(plain), LoRALinear(custom)]
    assert layers[0]._fused and not layers[1]._fused
    for layer in layers:
        layer.add_adapter("default", LoRASettings(r=2, lora_alpha=3, init_lora_weights=False))
        layer.set_active("default")
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 5, 4)
    assert torch.allclose(layers[0](x), layers[1](x), atol=1e-6)


def test_dora_matches_direct_computation():
    model = known_linear(use_dora=True)
    layer: LoRALinear = model[0]
    magnitude = torch.tensor([3.0, 7.0])
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].copy_(magnitude)
    x = torch.randn(4, 3)
    adapted = W + 2.0 * B @ A
    direct = (magnitude[:, None] * adapted / adapted.norm(dim=1, keepdim=True)) @ x.T + BIAS[:, None]
    assert torch.allclose(model(x), direct.T, atol=1e-5)


def test_dora_magnitude_starts_at_weight_norm_and_output_is_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    x = torch.randn(3, 5)
    before = model(x)
    deltatune.apply(model, {"name": "dora", "target_modules": ["0"], "modules_to_save": []})
    assert torch.allclose(model[0].lora_magnitude_vector["default"], model[0].base_layer.weight.norm(dim=1))
    assert torch.equal(model(x), before)


def test_dora_magnitude_from_a_file_takes_the_layer_dtype():
    layer = LoRALinear(nn.Linear(6, 4))  # fp32: A and B are copied into fp32 factors, the magnitude must follow
    tensors = {"lora_A.weight": torch.randn(2, 6, dtype=torch.float16),
               "lora_B.weight": torch.randn(4, 2, dtype=torch.float16), MAGNITUDE_KEY: torch.rand(4).half() + 1}
    layer.add_adapter("loaded", LoRASettings(r=2, lora_alpha=4, use_dora=True), tensors)
    assert layer.lora_magnitude_vector["loaded"].dtype == torch.float32


def test_dora_merge_ratio_follows_the_model_and_stays_out_of_its_files():
    """The ratio kept to unmerge exactly moves with `.to()` (a merge on GPU, `.cpu()`, unmerge) and is never saved."""
    model = known_linear(use_dora=True)
    keys = set(model.state_dict())
    deltatune.merge(model)
    assert set(model.state_dict()) == keys
    model.to(torch.float64)
    assert model[0]._merged_ratio.dtype == torch.float64
    deltatune.unmerge(model)
    assert torch.allclose(model[0].base_layer.weight, W.double(), atol=1e-6)


# ---- merge / multi-adapter (the contract suites check every method's defaults: tests/test_adapter_contracts.py) --
def test_rslora_merge_uses_its_scaling():
    model = seeded(tiny_llama)
    deltatune.apply(model, {"name": "lora", "r": 3, "use_rslora": True, "init_lora_weights": False})
    assert_merge_round_trip(model, lambda: logits(model, llama_batch()))


def test_a_second_adapter_on_fewer_modules_switches_cleanly():
    """Layers that lack the active adapter contribute nothing: the second adapter adapts q_proj only."""
    model = seeded(tiny_llama)
    family = family_of(model)
    LoRA(LoRAConfig(init_lora_weights=False)).apply(model, family)
    LoRA(LoRAConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]), adapter_name="second").apply(
        model, family)
    assert deltatune.adapters.adapter_names(model) == ["default", "second"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    assert_switches(model, lambda: logits(model, llama_batch()))


def test_weighted_combination_is_weighted_sum_of_deltas():
    model = seeded(tiny_llama)
    family = family_of(model)
    LoRA(LoRAConfig(r=2, init_lora_weights=False)).apply(model, family)
    LoRA(LoRAConfig(r=4, lora_alpha=3, use_rslora=True, init_lora_weights=False,
                    target_modules=["q_proj", "v_proj"]), adapter_name="other").apply(model, family)
    deltatune.add_weighted_adapter(model, ["default", "other"], [0.7, -0.3], "mix")
    for name, layer in deltatune.adapters.adapter_layers(model).items():
        expected = 0.7 * layer._delta("default")
        if "other" in layer.adapter_names():
            expected = expected - 0.3 * layer._delta("other")
        assert torch.allclose(layer._delta("mix"), expected, atol=1e-6), name
    # On a single layer the output is linear in the update, so the combined output is the weighted sum too.
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 64)
    outputs = {}
    for name in ("default", "other", "mix"):
        layer.set_active(name)
        outputs[name] = layer(x)
    layer.set_active(None)
    base = layer(x)
    assert torch.allclose(outputs["mix"], base + 0.7 * (outputs["default"] - base) - 0.3 * (outputs["other"] - base),
                          atol=1e-5)


def test_merging_into_a_tied_weight_is_refused():
    model = seeded(tiny_llama)  # embed_tokens and lm_head share one matrix
    deltatune.apply(model, {"name": "lora", "target_modules": ["embed_tokens", "q_proj"], "init_lora_weights": False})
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError, match="cannot merge into model.embed_tokens: its weight is tied to lm_head.weight"):
        deltatune.merge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_combining_dora_adapters_is_refused():
    model = seeded(tiny_llama)
    deltatune.apply(model, {"name": "dora"})
    with pytest.raises(UserError, match="DoRA adapters cannot be combined"):
        deltatune.add_weighted_adapter(model, ["default"], [1.0], "mix")


# ---- base types ------------------------------------------------------------------------------------------------
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=120, n_positions=32))


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "embedding"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_base_types_merge_and_disable(kind, use_dora):
    torch.manual_seed(0)
    if kind == "conv1d":
        model, batch, layer_class, targets = tiny_gpt2(), llama_batch(), LoRALinear, ["c_attn", "c_fc"]
    elif kind == "conv2d":
        model = ImageClassifier(tiny_cnn(4))
        batch, layer_class, targets = {"pixel_values": torch.randn(2, 3, 32, 32)}, LoRAConv2d, None
    else:
        model, batch, layer_class, targets = tiny_bert(3), bert_batch(), LoRAEmbedding, ["word_embeddings"]
    base = logits(model, batch)
    deltatune.apply(model, {"name": "lora", "r": 4, "target_modules": targets, "use_dora": use_dora,
                            "init_lora_weights": False})
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    assert layers and all(type(m) is layer_class for m in layers)
    assert_disabled_gives(model, lambda: logits(model, batch), base, atol=1e-6)
    assert_merge_round_trip(model, lambda: logits(model, batch), restore_atol=1e-5)  # large random updates


def test_conv1d_lora_equals_linear_lora_on_the_same_weights():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # in 4, out 6, weight stored (4, 6)
    linear = nn.Linear(4, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    pair = [LoRALinear(conv), LoRALinear(linear)]
    for layer in pair:
        layer.add_adapter("default", LoRASettings(r=2, lora_alpha=4))
        layer.set_active("default")
    with torch.no_grad():
        for param_a, param_b in zip(pair[0].adapter_parameters("default"), pair[1].adapter_parameters("default")):
            param_a.normal_()
            param_b.copy_(param_a)
    x = torch.randn(3, 5, 4)
    assert torch.allclose(pair[0](x), pair[1](x), atol=1e-6)


def test_default_targets_and_head_per_family():
    bert = seeded(tiny_bert, 2)
    deltatune.apply(bert, {"name": "lora"})
    adapted = set(deltatune.adapters.adapter_layers(bert))
    assert "bert.encoder.layer.0.attention.self.query" in adapted
    assert "bert.encoder.layer.1.output.dense" in adapted
    assert {"classifier", "bert.pooler.dense"} <= adapted  # the new head trains in full
    cnn = ImageClassifier(seeded(tiny_cnn, 4))
    deltatune.apply(cnn, {"name": "lora"})
    assert set(deltatune.adapters.adapter_layers(cnn)) == {
        "backbone.stages.0.0", "backbone.stages.1.0", "backbone.stages.2.0", "backbone.fc"}
    llama = seeded(tiny_llama)
    deltatune.apply(llama, {"name": "lora", "target_modules": "all-linear"})
    names = set(deltatune.adapters.adapter_layers(llama))
    assert "lm_head" not in names and len(names) == 14


def test_bias_modes_train_biases_in_place():
    model = seeded(tiny_bert, 2)
    deltatune.apply(model, {"name": "lora", "bias": "lora_only", "target_modules": ["query"]})
    trained_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trained_biases
    assert not any("key" in n for n in trained_biases)


# ---- files -----------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = seeded(tiny_bert, 3)
    batch = bert_batch()
    deltatune.apply(model, {"name": "lora", "r": 4, "init_lora_weights": False, "rank_pattern": {"query": 2}})
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.normal_()
    expected = logits(model, batch)
    deltatune.save_adapter(model, tmp_path / "adapter")
    fresh = seeded(tiny_bert, 3)
    deltatune.load_adapter(fresh, tmp_path / "adapter", name="mine")
    assert torch.allclose(logits(fresh, batch), expected, atol=1e-6)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".mine" in n)
    assert not any(p.requires_grad for p in fresh.parameters())  # the base is frozen too, as PEFT loads it
    deltatune.save_adapter(fresh, tmp_path / "again", name="mine")  # and a re-save claims no base bias as trained
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["bias"] == "none"
    copies = tuple(f".{module}." for module in again["modules_to_save"])  # full copies keep their biases
    assert not [key for key in load_file(tmp_path / "again" / "adapter_model.safetensors") if key.endswith(".bias")
                and not any(copy in key for copy in copies)]


@pytest.mark.parametrize("option, value, message", [
    ("alora_invocation_tokens", [5, 6], r"uses PEFT's alora_invocation_tokens, which deltatune does not support"),
    ("trainable_token_indices", [1, 2], r"uses PEFT's trainable_token_indices"),
    ("init_lora_weights", "pissa_niter_4", r"init_lora_weights='pissa_niter_4', which also changed the base"),
    ("lora_dropout", 0.999999, r"the adapter's lora_dropout must be in \[0, 1\) with 1 - p at least 2\^-17"),
])
def test_peft_options_that_change_the_computation_are_refused(tmp_path, option, value, message):
    model = seeded(tiny_bert, 3)
    deltatune.apply(model, {"name": "lora", "r": 2})
    deltatune.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    fresh = seeded(tiny_bert, 3)
    with pytest.raises(UserError, match=message):
        deltatune.load_adapter(fresh, tmp_path)
    assert deltatune.adapters.adapter_names(fresh) == []


def test_a_combination_that_fails_leaves_no_half_made_adapter():
    """DoRA layers cannot combine linearly: the refusal leaves the model's adapters as they were, so the same name
    can be used once the inputs are fixed."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    deltatune.apply(model, {"name": "lora", "r": 2, "use_dora": True, "target_modules": ["1"],
                            "modules_to_save": ["0"]})
    with pytest.raises(UserError, match="DoRA adapters cannot be combined"):
        deltatune.add_weighted_adapter(model, ["default"], [0.5], "mix")
    assert deltatune.adapters.adapter_names(model) == ["default"]


def test_pickled_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="convert it to safetensors"):
        deltatune.load_adapter(seeded(tiny_llama), tmp_path)


# ---- bad input (each option's invalid values: LoRA.contract_bad_options, checked in test_method_contracts.py) ---
@pytest.mark.parametrize("options, message", [
    ({"target_modules": ["q_prj"]}, r"'q_prj' matches no module of this model; closest names: q_proj"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive whole number"),
    ({"target_modules": ["input_layernorm"]}, r"'model.layers.0.input_layernorm', a LlamaRMSNorm, .*supports "
                                              r"torch.nn.Linear, transformers' Conv1D"),
])
def test_bad_input_is_one_line_user_error(options, message):
    model = seeded(tiny_llama)
    with pytest.raises(UserError, match=message) as error:
        deltatune.apply(model, {"name": "lora", **options})
    assert "\n" not in str(error.value)
    assert not deltatune.adapters.adapter_layers(model)


def test_grouped_conv_target_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(UserError, match="Conv2d with groups=4, which LoRA cannot adapt"):
        deltatune.apply(model, {"name": "lora", "target_modules": ["0"], "modules_to_save": []})


def test_config_from_yaml_overrides():
    config = deltatune.load_config(None, ["method.name=lora", "method.init_lora_weights=gaussian",
                                          "method.target_modules=all-linear", "method.rank_pattern={q_proj: 4}"])
    assert config.method.init_lora_weights == "gaussian"
    assert config.method.target_modules == "all-linear"
    assert config.method.rank_pattern == {"q_proj": 4}
    config = deltatune.load_config(None, ["method.name=dora", "method.target_modules=[q_proj, v_proj]"])
    assert config.method.use_dora is True and config.method.target_modules == ["q_proj", "v_proj"]
    config = deltatune.load_config(None, ["method.name=lora", "method.init_lora_weights=false"])
    assert config.method.init_lora_weights is False


def test_a_dilated_conv_adapter_is_not_saved_for_peft(tmp_path):
    """PEFT's LoRA conv drops the base's dilation (and padding mode): such a file would compute something else."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    deltatune.apply(model, {"name": "lora", "r": 2, "target_modules": ["0"], "modules_to_save": []})
    with pytest.raises(UserError, match=r"0 is a convolution with dilation \(2, 2\) .*leave it out"):
        deltatune.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
