"""Bottleneck adapters: maths, placement per family, named adapters, files and bad input, on tiny models (fast)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune.adapters import adapter_layers, adapter_names
from deltatune.errors import UserError
from deltatune.methods.adapters.adapter import Adapter, AdapterConfig
from deltatune.methods.adapters.bottleneck_layers import BottleneckLayer, NormBottleneckLayer
from deltatune.models import ImageClassifier
from deltatune.models.families import family_of
from tests.helpers import (
    assert_disabled_gives,
    assert_loss_falls,
    assert_switches,
    encoder_output,
    logits,
    seeded,
    token_batch,
    train_steps,
)
from tests.tiny_models import tiny_bert, tiny_cnn, tiny_llama

W = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
BIAS = torch.tensor([0.5, -1.0])
X = torch.tensor([[1.0, 2.0]])


def known_layer(non_linearity: str) -> BottleneckLayer:
    """A 2→2 Linear with known W, b and one bottleneck (m=1) with known weights."""
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(BIAS)
    layer = BottleneckLayer(base)
    layer.add_bottleneck("a", 1, non_linearity)
    bottleneck = layer.bottlenecks["a"]
    with torch.no_grad():
        bottleneck.adapter_down.weight.copy_(torch.tensor([[1.0, 1.0]]))
        bottleneck.adapter_down.bias.copy_(torch.tensor([-1.0]))
        bottleneck.adapter_up.weight.copy_(torch.tensor([[2.0], [-3.0]]))
        bottleneck.adapter_up.bias.copy_(torch.tensor([0.25, 0.0]))
    layer.set_active("a")
    return layer


def bert_batch():
    return token_batch(3, 8)


def randomise(model, name):
    """Give adapter `name` non-zero up-projections, as training would."""
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if isinstance(layer, BottleneckLayer) and name in layer.bottlenecks:
                layer.bottlenecks[name].adapter_up.weight.normal_(std=0.5)


# ---- maths -----------------------------------------------------------------------------------------------------
def test_output_is_hand_computed():
    # h = Wx + b = [-0.5, 2.0]; down: -0.5 + 2.0 - 1 = 0.5; relu 0.5; up: [1.0 + 0.25, -1.5]  ->  [0.75, 0.5]
    assert torch.allclose(known_layer("relu")(X), torch.tensor([[0.75, 0.5]]))


@pytest.mark.parametrize("non_linearity, function", [("gelu", F.gelu), ("silu", F.silu), ("tanh", torch.tanh)])
def test_non_linearities(non_linearity, function):
    z = function(torch.tensor(0.5))
    expected = torch.tensor([[-0.5 + 2.0 * z + 0.25, 2.0 - 3.0 * z]])
    assert torch.allclose(known_layer(non_linearity)(X), expected)


def test_negative_pre_activation_gives_only_the_up_bias():
    layer = known_layer("relu")
    x = torch.tensor([[-1.0, -1.0]])  # h = [0.5, -3.5]; down: -3 - 1 < 0, relu 0
    assert torch.allclose(layer(x), torch.tensor([[0.75, -3.5]]))


def test_pfeiffer_norm_layer_is_hand_computed():
    # s = [1, 2, 3]: mean 2, variance 2/3, so z = N(s) = [-√1.5, 0, √1.5]. The bottleneck reads z[2] = √1.5 (relu
    # keeps it) and adds 3·√1.5 to s[2] before the norm: y = N([1, 2, 3 + 3·√1.5]).
    layer = NormBottleneckLayer(nn.LayerNorm(3, eps=0.0, elementwise_affine=False))
    layer.add_bottleneck("a", 1, "relu")
    with torch.no_grad():
        layer.bottlenecks["a"].adapter_down.weight.copy_(torch.tensor([[0.0, 0.0, 1.0]]))
        layer.bottlenecks["a"].adapter_up.weight.copy_(torch.tensor([[0.0], [0.0], [3.0]]))
    s = torch.tensor([[1.0, 2.0, 3.0]])
    root = 1.5 ** 0.5
    assert torch.allclose(layer(s), torch.tensor([[-root, 0.0, root]]))  # no adapter active: the norm alone
    layer.set_active("a")
    summed = torch.tensor([1.0, 2.0, 3.0 + 3.0 * root])
    expected = (summed - summed.mean()) / summed.var(unbiased=False).sqrt()
    assert torch.allclose(layer(s), expected.unsqueeze(0), atol=1e-6)
    assert torch.allclose(layer(s).mean(), torch.tensor(0.0), atol=1e-6)  # the output stays normalised


def test_pfeiffer_on_bert_starts_as_base_and_disables_to_base():
    model = seeded(tiny_bert, 3)
    batch = bert_batch()
    base = encoder_output(model, batch)
    deltatune.apply(model, {"name": "adapter", "placement": "pfeiffer"})
    assert all(isinstance(layer, NormBottleneckLayer)
               for layer in adapter_layers(model).values() if isinstance(layer, BottleneckLayer))
    assert torch.allclose(encoder_output(model, batch), base, atol=1e-6)
    randomise(model, "default")
    assert_disabled_gives(model, lambda: encoder_output(model, batch), base)


def test_pfeiffer_on_bert_gives_gradients_only_to_its_parameters_and_learns():
    model = seeded(tiny_bert, 3)
    method = deltatune.apply(model, {"name": "adapter", "placement": "pfeiffer"})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(method.trainable_state(model))
    batch, labels = bert_batch(), torch.tensor([0, 1, 2])
    losses = train_steps(model, batch, labels, steps=1)
    # Step 0 leaves W_down without gradient (W_up = 0); from then on every bottleneck gets one.
    F.cross_entropy(model(**batch).logits, labels).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".bottlenecks." in n)
    model.zero_grad()
    assert_loss_falls(losses + train_steps(model, batch, labels, steps=59))


def test_pfeiffer_trains_the_other_layer_norms_but_not_the_wrapped_ones():
    model = seeded(tiny_bert, 3)
    with pytest.raises(UserError, match=r"modules_to_save trains '.*\.output\.LayerNorm' in full, but the pfeiffer "
                                        r"adapter wraps '.*\.output\.LayerNorm'; leave it out of modules_to_save"):
        deltatune.apply(model, {"name": "adapter", "placement": "pfeiffer",
                                "modules_to_save": ["classifier", "LayerNorm"]})
    assert not adapter_layers(model)
    method = deltatune.apply(model, {"name": "adapter", "placement": "pfeiffer",
                                     "modules_to_save": ["classifier", "attention.output.LayerNorm"]})
    trained = set(method.trainable_state(model))
    assert any("attention.output.LayerNorm.modules_to_save.default." in name for name in trained)
    assert any(".output.LayerNorm.bottlenecks.default." in name for name in trained)


def test_pfeiffer_adapter_round_trips_through_a_file(tmp_path):
    model = seeded(tiny_bert, 3)
    deltatune.apply(model, {"name": "adapter", "placement": "pfeiffer"})
    randomise(model, "default")
    expected = logits(model, bert_batch())
    deltatune.save_adapter(model, tmp_path / "adapter")
    fresh = seeded(tiny_bert, 3)
    deltatune.load_adapter(fresh, tmp_path / "adapter")
    assert any(isinstance(layer, NormBottleneckLayer) for layer in adapter_layers(fresh).values())
    assert torch.allclose(logits(fresh, bert_batch()), expected, atol=1e-6)


def test_initialisation_is_identity_with_small_random_down_projection():
    model = seeded(tiny_llama)
    batch = token_batch(2, 9, attention_mask=False)
    before = logits(model, batch)
    deltatune.apply(model, {"name": "adapter"})
    assert torch.equal(logits(model, batch), before)
    for layer in adapter_layers(model).values():
        bottleneck = layer.bottlenecks["default"]
        assert not bottleneck.adapter_up.weight.any() and not bottleneck.adapter_up.bias.any()
        down = bottleneck.adapter_down.weight
        assert down.abs().max() <= 2e-2 and down.std() > 1e-3


# ---- placement ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, placement, suffixes", [
    (tiny_bert, "houlsby", {"attention.output.dense", "output.dense"}),
    (tiny_bert, "pfeiffer", {"output.LayerNorm"}),  # post-norm block: Pfeiffer's position, around the norm
    (tiny_llama, "houlsby", {"self_attn.o_proj", "mlp.down_proj"}),
    (tiny_llama, "pfeiffer", {"mlp.down_proj"}),
])
def test_placement_per_family(build, placement, suffixes):
    model = seeded(build)
    deltatune.apply(model, {"name": "adapter", "placement": placement})
    layers = adapter_layers(model)
    bottlenecks = {name: layer for name, layer in layers.items() if isinstance(layer, BottleneckLayer)}
    blocks = family_of(model).num_blocks(model)
    assert len(bottlenecks) == len(suffixes) * blocks
    for block in range(blocks):
        in_block = [name for name in bottlenecks if f".{block}." in name]
        assert {name.split(f".{block}.", 1)[1] for name in in_block} == suffixes


def test_pfeiffer_falls_back_to_the_feed_forward_output_where_the_model_has_no_norm_after_it():
    from deltatune.models.families import FAMILIES

    model = seeded(tiny_llama)  # pre-norm; the generic family also knows BERT-like post-FFN norms, which it lacks
    Adapter(AdapterConfig(placement="pfeiffer", modules_to_save=[])).apply(model, FAMILIES["generic"])
    assert {".".join(name.split(".")[-2:]) for name in adapter_layers(model)} == {"mlp.down_proj"}


@pytest.mark.parametrize("build, width, sites_per_block", [(tiny_bert, 32, 2), (tiny_llama, 64, 2)])
@pytest.mark.parametrize("reduction_factor", [4, 16, 100])
def test_parameter_count_is_the_formula(build, width, sites_per_block, reduction_factor):
    model = seeded(build)
    method = deltatune.apply(model, {"name": "adapter", "reduction_factor": reduction_factor})
    m = max(1, width // reduction_factor)
    blocks = family_of(model).num_blocks(model)
    counted = sum(p.numel() for n, p in method.trainable_state(model).items() if ".bottlenecks." in n)
    assert counted == blocks * sites_per_block * (2 * width * m + width + m)


def test_new_head_trains_in_full_and_only_adapter_and_head_train():
    model = seeded(tiny_bert, 3)
    method = deltatune.apply(model, {"name": "adapter"})
    trained = set(method.trainable_state(model))
    assert all(".bottlenecks.default." in n or ".modules_to_save.default." in n for n in trained)
    assert any(n.startswith("classifier.modules_to_save.default.") for n in trained)
    method = Adapter(AdapterConfig(modules_to_save=[]), adapter_name="bare")
    method.apply(model, family_of(model))
    assert all(".bottlenecks.bare." in n for n in method.trainable_state(model))


# ---- named adapters (every method's defaults: tests/test_adapter_contracts.py) -------------------------------------
def test_houlsby_and_pfeiffer_adapters_sit_side_by_side():
    model = seeded(tiny_bert, 3)
    batch = bert_batch()
    base = logits(model, batch)
    family = family_of(model)
    Adapter(AdapterConfig()).apply(model, family)
    randomise(model, "default")
    Adapter(AdapterConfig(placement="pfeiffer", reduction_factor=8, non_linearity="tanh"),
            adapter_name="second").apply(model, family)
    randomise(model, "second")
    assert adapter_names(model) == ["default", "second"]
    assert all(".second." in n for n, p in model.named_parameters() if p.requires_grad)
    assert_disabled_gives(model, lambda: logits(model, batch), base)
    assert_switches(model, lambda: logits(model, batch))


def test_combination_is_refused_and_merging_nothing_active_is_not():
    model = seeded(tiny_bert, 3)
    deltatune.apply(model, {"name": "adapter"})
    with pytest.raises(UserError, match="fuse them with method adapter_fusion"):
        deltatune.add_weighted_adapter(model, ["default"], [0.5], "half")
    with deltatune.disabled(model):
        deltatune.merge(model)  # nothing active: nothing to merge, no error
    assert all(not layer.weights_changed_by_merge() for layer in adapter_layers(model).values())


# ---- files -------------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = seeded(tiny_bert, 3)
    batch = bert_batch()
    deltatune.apply(model, {"name": "adapter", "reduction_factor": 8, "non_linearity": "gelu"})
    randomise(model, "default")
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.normal_()
    expected = logits(model, batch)
    deltatune.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "DELTATUNE_ADAPTER" and config["non_linearity"] == "gelu"
    assert config["reduction_factor"] == 8 and config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    fresh = seeded(tiny_bert, 3)
    deltatune.load_adapter(fresh, tmp_path / "adapter", name="mine")
    assert torch.allclose(logits(fresh, batch), expected, atol=1e-6)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".mine" in n)


# ---- bad input (each option's invalid values: Adapter.contract_bad_options, checked in test_method_contracts.py) --
def test_misspelt_head_gets_the_closest_name():
    with pytest.raises(UserError, match=r"'clasifier' matches no module of this model; closest names: classifier"):
        deltatune.apply(seeded(tiny_bert, 2), {"name": "adapter", "modules_to_save": ["clasifier"]})


def test_cnn_is_refused_and_family_without_sites_names_the_fix():
    with pytest.raises(UserError, match="works on transformer models, not on this cnn"):
        deltatune.apply(ImageClassifier(tiny_cnn(4)), {"name": "adapter"})
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UserError, match=r"no attention output module in this generic model; add its name pattern "
                                        r"to Family.attention_output"):
        Adapter(AdapterConfig(modules_to_save=[])).apply(model, family_of(model))


def test_config_from_overrides():
    config = deltatune.load_config(None, ["method.name=adapter", "method.reduction_factor=8",
                                          "method.placement=pfeiffer", "method.non_linearity=silu"])
    assert (config.method.reduction_factor, config.method.placement, config.method.non_linearity) == (
        8, "pfeiffer", "silu")
