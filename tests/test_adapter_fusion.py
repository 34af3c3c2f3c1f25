"""AdapterFusion: the fusion maths, fusing stage-1 adapters saved to disk, what trains, and bad input (tiny models)."""

import pytest
import torch

import deltatune
from deltatune.adapters import adapter_layers, adapter_names
from deltatune.config.loader import config_to_dict
from deltatune.errors import UserError
from deltatune.methods.adapters.adapter import Adapter, AdapterConfig
from deltatune.methods.adapters.adapter_fusion import AdapterFusion, AdapterFusionConfig, FusionAttention
from deltatune.methods.adapters.bottleneck_layers import BottleneckLayer
from deltatune.models.families import family_of
from deltatune.training.checkpoint import write_checkpoint_dir
from deltatune.training.state import weights_to_save
from tests.helpers import assert_loss_falls, class_labels, encoder_output, seeded, token_batch, train_steps
from tests.tiny_models import tiny_bert


def batch_and_labels(seed: int, num_labels: int):
    return token_batch(8, 10, seed=seed), class_labels(8, num_labels, seed=seed)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Two adapters trained a few steps on 2-label tasks: one saved with save_adapter, one as a run's weights/."""
    root = tmp_path_factory.mktemp("stage1")
    for seed, name in ((1, "sentiment"), (2, "topic")):
        torch.manual_seed(seed)
        model = tiny_bert(2)
        method = deltatune.apply(model, {"name": "adapter", "reduction_factor": 8})
        train_steps(model, *batch_and_labels(seed, 2), steps=5)
        if name == "sentiment":
            deltatune.save_adapter(model, root / name)
        else:
            write_checkpoint_dir(root / name / "weights", {"model": weights_to_save(model, method)},
                                 {"method": config_to_dict(method.config)})
    return root


def fused_model(stage1):
    model = seeded(tiny_bert, 3)  # a 3-label target task: the stage-1 heads (2 labels) must not be loaded
    method = deltatune.apply(model, {"name": "adapter_fusion",
                                     "adapters": [str(stage1 / "sentiment"), str(stage1 / "topic")]})
    return model, method


# ---- maths -----------------------------------------------------------------------------------------------------
def test_fusion_attention_is_hand_computed():
    fusion = FusionAttention(2, ["a", "b"])
    with torch.no_grad():
        fusion.query.weight.copy_(torch.eye(2))
        fusion.query.bias.zero_()
        fusion.key.weight.copy_(torch.eye(2))
        fusion.key.bias.zero_()
        fusion.value.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    h = torch.tensor([[1.0, 0.0]])
    updates = torch.tensor([[[1.0, 2.0], [0.0, 3.0]]])  # scores h·a: 1 and 0
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    mixed = p[0] * updates[0, 0] + p[1] * updates[0, 1]
    assert torch.allclose(fusion(h, updates), torch.tensor([[2.0 * mixed[0], mixed[1]]]))


def test_fusion_starts_as_the_average_of_the_adapters():
    fusion = FusionAttention(16, ["a", "b", "c"])
    assert torch.allclose(fusion.value.weight, torch.eye(16), atol=1e-6)
    h, updates = torch.randn(5, 16), torch.randn(5, 3, 16)
    with torch.no_grad():
        fusion.query.weight.zero_()  # exactly equal scores; the 0.02-scale init only perturbs them slightly
    assert torch.allclose(fusion(h, updates), updates.mean(dim=1), atol=1e-4)


# ---- fusing saved adapters ----------------------------------------------------------------------------------------
def test_fused_model_loads_both_sources_frozen_and_starts_at_their_average(stage1):
    model, _ = fused_model(stage1)
    assert adapter_names(model) == ["sentiment", "topic", "default"]
    batch, _ = batch_and_labels(3, 3)
    fused = encoder_output(model, batch)
    with deltatune.disabled(model):
        base = encoder_output(model, batch)
    assert not torch.allclose(fused, base, atol=1e-4)  # trained adapters: the fusion is not the base at init
    for name, source in (("sentiment", stage1 / "sentiment"), ("topic", None)):
        deltatune.set_adapter(model, name)
        alone = encoder_output(model, batch)
        assert not torch.allclose(alone, base, atol=1e-4)
        if source is not None:  # running one fused adapter alone equals loading its file
            reference = seeded(tiny_bert, 2)  # the same base weights; 2 labels as the file's head copy has
            deltatune.load_adapter(reference, source)
            assert torch.allclose(encoder_output(reference, batch), alone, atol=1e-5)
    sites = [layer for layer in adapter_layers(model).values() if isinstance(layer, BottleneckLayer)]
    assert len(sites) == 4 and all(layer.compositions["default"].fused == ["sentiment", "topic"] for layer in sites)


def test_only_fusion_and_head_train_and_loss_falls(stage1):
    model, method = fused_model(stage1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".compositions.default." in n or ".modules_to_save.default." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".bottlenecks." in n}
    fusion = {n: p.detach().clone() for n, p in model.named_parameters() if ".compositions." in n}
    batch, labels = batch_and_labels(4, 3)
    model.train()
    torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".compositions." in n)
    model.zero_grad()
    assert_loss_falls(train_steps(model, batch, labels, steps=40))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    assert all(not torch.equal(params[n], value) for n, value in fusion.items())
    assert set(method.trainable_state(model)) == trainable


def test_trainable_state_round_trip(stage1):
    model, method = fused_model(stage1)
    batch, labels = batch_and_labels(5, 3)
    train_steps(model, batch, labels, steps=3)
    state = {n: t.clone() for n, t in method.trainable_state(model).items()}
    fresh, fresh_method = fused_model(stage1)
    fresh_method.load_trainable_state(fresh, state)
    assert torch.allclose(encoder_output(fresh, batch), encoder_output(model, batch), atol=1e-6)


def test_new_adapters_train_with_the_fusion_and_start_at_the_base():
    model = seeded(tiny_bert, 3)
    batch, _ = batch_and_labels(6, 3)
    base = encoder_output(model, batch)
    AdapterFusion(AdapterFusionConfig(num_new_adapters=2), adapter_name="mix").apply(model, family_of(model))
    assert adapter_names(model) == ["new_0", "new_1", "mix"]
    assert torch.equal(encoder_output(model, batch), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".bottlenecks.new_0." in n for n in trainable) and any(".compositions.mix." in n for n in trainable)


# ---- refusals ------------------------------------------------------------------------------------------------------
def test_save_adapter_and_deleting_a_fused_adapter_are_refused(stage1, tmp_path):
    model, _ = fused_model(stage1)
    with pytest.raises(UserError, match="is a fusion of .*save_adapter cannot write"):
        deltatune.save_adapter(model, tmp_path / "fusion")
    with pytest.raises(UserError, match="adapter 'topic' is fused by 'default'; delete_adapter 'default' first"):
        deltatune.delete_adapter(model, "topic")
    deltatune.delete_adapter(model, "default")
    deltatune.delete_adapter(model, "topic")
    assert adapter_names(model) == ["sentiment"]


@pytest.mark.parametrize("adapters, message", [
    (["missing"], r"method.adapters: .*missing does not exist; give a directory written by save_adapter"),
    ([], r"method.adapters lists 0 adapter\(s\), but fusion needs at least 2"),
    (["lora"], r"holds a LORA adapter; fusion combines bottleneck adapters trained with method adapter"),
])
def test_bad_adapters_are_one_line_user_errors(stage1, tmp_path, adapters, message):
    model = tiny_bert(2)
    lora = tiny_bert(2)
    deltatune.apply(lora, {"name": "lora"})
    deltatune.save_adapter(lora, tmp_path / "lora")
    paths = [str(tmp_path / name) for name in adapters] + ([str(stage1 / "sentiment")] if adapters else [])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=message) as error:
        deltatune.apply(model, {"name": "adapter_fusion", "adapters": paths})
    assert "\n" not in str(error.value)
    assert not adapter_layers(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_stage1_for_another_base_leaves_the_model_unchanged(stage1, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    Adapter(AdapterConfig()).apply(other, family_of(other))
    deltatune.save_adapter(other, tmp_path / "wide")
    model = tiny_bert(2)
    with pytest.raises(UserError, match=r"shape \(3, 48\) does not fit the model's \(3, 32\)"):
        deltatune.apply(model, {"name": "adapter_fusion",
                                "adapters": [str(stage1 / "sentiment"), str(tmp_path / "wide")]})
    assert not adapter_layers(model)


def test_fusing_one_pfeiffer_adapter_twice_equals_it_alone(tmp_path):
    # Pfeiffer adapters wrap the post-FFN norm (y = N(s + a(N(s)))); the fusion composes there too. Two copies of
    # one adapter fuse to its own update (equal updates average to it; W_V starts at identity).
    model = seeded(tiny_bert, 2)
    deltatune.apply(model, {"name": "adapter", "placement": "pfeiffer", "reduction_factor": 8})
    train_steps(model, *batch_and_labels(1, 2), steps=5)
    batch, _ = batch_and_labels(7, 2)
    alone = encoder_output(model, batch)
    for copy in ("first", "second"):
        deltatune.save_adapter(model, tmp_path / copy)
    fused = seeded(tiny_bert, 2)
    with deltatune.disabled(model):
        assert not torch.allclose(encoder_output(model, batch), alone, atol=1e-3)  # the adapter does change the output
    deltatune.apply(fused, {"name": "adapter_fusion", "adapters": [str(tmp_path / "first"), str(tmp_path / "second")]})
    sites = [layer for layer in adapter_layers(fused).values() if isinstance(layer, BottleneckLayer)]
    assert len(sites) == 2 and all(type(layer).__name__ == "NormBottleneckLayer" for layer in sites)
    assert torch.allclose(encoder_output(fused, batch), alone, atol=1e-4)


@pytest.fixture(scope="module")
def pfeiffer_stage1(tmp_path_factory):
    """Two Pfeiffer-placed adapters (feed-forward, post-norm) saved with save_adapter."""
    root = tmp_path_factory.mktemp("pfeiffer")
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = tiny_bert(2)
        deltatune.apply(model, {"name": "adapter", "placement": "pfeiffer", "reduction_factor": 8})
        train_steps(model, *batch_and_labels(seed, 2), steps=2)
        deltatune.save_adapter(model, root / f"pfeiffer{seed}")
    return root


def test_new_adapters_sit_where_the_loaded_ones_do_and_every_fusion_weighs_them_all(pfeiffer_stage1):
    model = seeded(tiny_bert, 3)
    deltatune.apply(model, {"name": "adapter_fusion", "num_new_adapters": 1,
                            "adapters": [str(pfeiffer_stage1 / "pfeiffer1"), str(pfeiffer_stage1 / "pfeiffer2")]})
    fusions = [layer for layer in adapter_layers(model).values() if isinstance(layer, BottleneckLayer)]
    assert fusions and all(sorted(layer.bottlenecks) == ["new_0", "pfeiffer1", "pfeiffer2"] for layer in fusions)
    assert all(layer.bottlenecks["new_0"].adapter_down.out_features ==
               layer.bottlenecks["pfeiffer1"].adapter_down.out_features for layer in fusions)


def test_adapters_of_different_placements_are_refused_before_anything_changes(stage1, pfeiffer_stage1):
    model = seeded(tiny_bert, 3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(UserError, match=r"sentiment, pfeiffer1 adapt no module in common, so nothing would be "
                                        r"fused; fuse adapters trained with the same placement"):
        deltatune.apply(model, {"name": "adapter_fusion",
                                "adapters": [str(stage1 / "sentiment"), str(pfeiffer_stage1 / "pfeiffer1")]})
    assert model.state_dict().keys() == before.keys() and not adapter_layers(model)


def test_adapters_on_different_layers_fuse_where_they_overlap(stage1, tmp_path):
    torch.manual_seed(3)
    model = tiny_bert(2)
    deltatune.apply(model, {"name": "adapter", "reduction_factor": 8, "layers": [1]})
    deltatune.save_adapter(model, tmp_path / "upper")
    fused = seeded(tiny_bert, 3)
    deltatune.apply(fused, {"name": "adapter_fusion", "adapters": [str(stage1 / "sentiment"), str(tmp_path / "upper")]})
    fusions = {name: sorted(layer.bottlenecks) for name, layer in adapter_layers(fused).items()
               if isinstance(layer, BottleneckLayer)}
    assert any(names == ["sentiment", "upper"] for names in fusions.values())
    assert any(names == ["sentiment"] for names in fusions.values())
