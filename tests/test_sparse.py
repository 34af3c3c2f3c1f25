"""Sparse fine-tuning (`deltatune.methods.selective.sparse`): how many entries train and which, the W + Δ maths,
gradients and optimizer state only for the k values, exact save/load, merge/unmerge, gradient/Fisher calibration
against a direct torch computation, the runner's calibration hook, and one-line errors."""

import json
from collections import OrderedDict
from fractions import Fraction
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune.errors import UserError
from deltatune.methods.selective.sparse import Sparse, SparseConfig, entries_for
from deltatune.methods.selective.sparse_layer import SparseDeltaLayer
from deltatune.models.families import family_of
from tests.helpers import assert_loss_falls, assert_merge_round_trip, logits, seeded, train_steps
from tests.tiny_models import tiny_bert, tiny_cnn


def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseDeltaLayer)}


def bert_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 100, (4, 10), generator=generator),
             "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=generator)} for _ in range(count)]


def fresh_bert() -> nn.Module:
    return seeded(tiny_bert, num_labels=3).eval()


def randomise_values(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sparse_layers(model).values():
            for delta in layer.sparse_deltas.values():
                delta.values.copy_(torch.randn(delta.values.shape, generator=generator) * 0.1)


def dense_delta(layer: SparseDeltaLayer, name: str = "default") -> torch.Tensor:
    """Δ written out entry by entry, independent of the layer's index_add."""
    delta = layer.sparse_deltas[name]
    dense = torch.zeros(layer.base_layer.weight.numel())
    for position, value in zip(delta.indices.tolist(), delta.values.detach().tolist()):
        dense[position] = value
    return dense.view_as(layer.base_layer.weight)


# ---- how many, which ------------------------------------------------------------------------------------------
def test_entries_per_tensor_is_density_rounded_up():
    assert entries_for(0.07, 100) == 7  # not 8: the density is taken as written, not as 0.07000000000000001
    assert entries_for(0.01, 1024) == 11 and entries_for(1e-9, 10) == 1 and entries_for(1, 37) == 37
    model = fresh_bert()
    deltatune.apply(model, {"name": "sparse", "density": 0.07})
    layers = sparse_layers(model)
    assert len(layers) == 12  # q, k, v, attention output, intermediate, output - in each of 2 blocks
    for layer in layers.values():
        numel = layer.base_layer.weight.numel()
        delta = layer.sparse_deltas["default"]
        assert delta.values.numel() == delta.indices.numel() == math.ceil(Fraction("0.07") * numel)
        assert delta.indices.unique().numel() == delta.indices.numel()
        assert torch.equal(delta.indices, delta.indices.sort().values)


def test_magnitude_selection_picks_the_smallest_entries():
    model = nn.Sequential(OrderedDict(proj=nn.Linear(4, 3)))
    with torch.no_grad():
        model.proj.weight.copy_(torch.tensor([[0.5, -0.01, 2.0, -3.0], [0.2, -0.3, 0.05, 1.0],
                                              [-0.02, 4.0, -5.0, 0.6]]))
    deltatune.apply(model, {"name": "sparse", "density": 0.25, "target_modules": ["proj"], "modules_to_save": []})
    # |w| flat: 0.5 .01 2 3 | .2 .3 .05 1 | .02 4 5 .6 -> the three smallest are at 1 (.01), 8 (.02) and 6 (.05).
    assert model.proj.sparse_deltas["default"].indices.tolist() == [1, 6, 8]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["proj.sparse_deltas.default.values"]


# ---- the maths ------------------------------------------------------------------------------------------------
def test_forward_equals_dense_reference_for_linear_conv_and_embedding():
    model = fresh_bert()
    deltatune.apply(model, {"name": "sparse", "density": 0.2})
    randomise_values(model)
    layer = model.bert.encoder.layer[0].intermediate.dense
    x = torch.randn(2, 5, 32)
    reference = F.linear(x, layer.base_layer.weight + dense_delta(layer), layer.base_layer.bias)
    assert torch.allclose(layer(x), reference, atol=1e-6)

    cnn = tiny_cnn(num_labels=4).eval()
    deltatune.apply(cnn, {"name": "sparse", "density": 0.2}, family="generic")
    randomise_values(cnn)
    conv = cnn.stages[1][0]
    images = torch.randn(2, 8, 16, 16)
    base = conv.base_layer
    reference = F.conv2d(images, base.weight + dense_delta(conv), base.bias, base.stride, base.padding)
    assert torch.allclose(conv(images), reference, atol=1e-5)

    # Any other module type runs its own forward with W + Δ swapped in (here an Embedding).
    table = nn.Sequential(OrderedDict(embed=nn.Embedding(20, 6)))
    deltatune.apply(table, {"name": "sparse", "density": 0.3, "target_modules": ["embed"], "modules_to_save": []})
    randomise_values(table)
    ids = torch.randint(0, 20, (3, 4))
    expected = F.embedding(ids, table.embed.base_layer.weight + dense_delta(table.embed))
    assert torch.equal(table(ids), expected)


def test_gradients_reach_only_the_values_and_equal_the_dense_gradient_there():
    model = fresh_bert()
    deltatune.apply(model, {"name": "sparse", "density": 0.1, "modules_to_save": []})
    randomise_values(model)
    layer = model.bert.encoder.layer[1].attention.self.value
    x = torch.randn(3, 4, 32, requires_grad=False)
    layer(x).square().sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    dense_weight = (layer.base_layer.weight + dense_delta(layer)).detach().requires_grad_(True)
    F.linear(x, dense_weight, layer.base_layer.bias).square().sum().backward()
    delta = layer.sparse_deltas["default"]
    assert torch.allclose(delta.values.grad, dense_weight.grad.reshape(-1)[delta.indices], atol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.ndim == 1 for p in trainable)  # only the k-entry value vectors train


def test_optimizer_state_holds_k_entries_per_weight():
    from deltatune.config.schema import TrainConfig
    from deltatune.training.loop import make_optimizer

    model = fresh_bert()
    deltatune.apply(model, {"name": "sparse", "density": 0.05, "modules_to_save": []})
    optimizer = make_optimizer(model, TrainConfig())
    loss = model(**bert_batches(1)[0]).loss
    loss.backward()
    optimizer.step()
    k_total = sum(d.values.numel() for layer in sparse_layers(model).values() for d in layer.sparse_deltas.values())
    state_entries = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer.state.values())
    assert state_entries == 2 * k_total
    assert k_total < 0.06 * sum(layer.base_layer.weight.numel() for layer in sparse_layers(model).values())


# ---- saving, merging, composing -----------------------------------------------------------------------------
def test_save_load_round_trip_restores_indices_and_values_exactly(tmp_path):
    from safetensors.torch import load_file, save_file

    config = {"name": "sparse", "density": 0.05, "selection": "gradient", "calibration_batches": 2}
    model = fresh_bert()
    method = deltatune.apply(model, config, calibration=bert_batches(2))
    randomise_values(model)
    state = method.trainable_state(model)
    assert any(key.endswith(".indices") for key in state) and any(key.endswith(".values") for key in state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")

    # A fresh model whose positions were never chosen: the file says where the values go.
    fresh = fresh_bert()
    fresh_method = Sparse(deltatune.method_config(config))
    fresh_method.apply(fresh, family_of(fresh))
    fresh_method.load_trainable_state(fresh, load_file(tmp_path / "w.safetensors"))
    batch = bert_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)
    with pytest.raises(UserError, match="density they were trained with"):
        smaller = fresh_bert()
        Sparse(SparseConfig(density=0.01)).apply(smaller, family_of(smaller))
        Sparse(SparseConfig(density=0.01)).load_trainable_state(smaller, state)


def test_merge_and_unmerge_are_exact_and_unload_keeps_the_output():
    model = fresh_bert()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    deltatune.apply(model, {"name": "sparse", "density": 0.1})
    randomise_values(model)
    batch = bert_batches(1)[0]
    with torch.no_grad():
        unmerged = model(**batch).logits
    # Entries are replaced, not added to and subtracted from: no rounding at all (other methods: within tolerance).
    assert_merge_round_trip(model, lambda: logits(model, batch), atol=0.0, restore_atol=0.0)
    for name, layer in sparse_layers(model).items():
        assert torch.equal(layer.base_layer.weight, original[f"{name}.weight"])
    deltatune.merge(model)
    plain = deltatune.adapters.merge_and_unload(model)
    assert not sparse_layers(plain)
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, unmerged)


def test_weighted_combination_adds_the_sparse_deltas():
    model = fresh_bert()
    deltatune.apply(model, {"name": "sparse", "density": 0.05, "selection": "gradient"}, calibration=bert_batches(2))
    second = Sparse(SparseConfig(density=0.05), adapter_name="other")
    second.apply(model, family_of(model))  # magnitude: other positions, partly overlapping
    randomise_values(model)
    deltatune.add_weighted_adapter(model, ["default", "other"], [0.7, -0.3], "mix")
    for layer in sparse_layers(model).values():
        expected = 0.7 * dense_delta(layer, "default") - 0.3 * dense_delta(layer, "other")
        assert torch.allclose(dense_delta(layer, "mix"), expected, atol=1e-7)
        assert not layer.sparse_deltas["mix"].values.requires_grad


# ---- calibration ----------------------------------------------------------------------------------------------
def reference_scores(selection: str, batches: list[dict]) -> dict[str, torch.Tensor]:
    """The score of every default target weight, computed directly with torch on an untouched model."""
    model = fresh_bert()
    family = family_of(model)
    weights = {name: module.weight for name, module in model.named_modules()
               if family.is_attention(name) or family.is_mlp(name)}
    totals = {name: torch.zeros_like(w) for name, w in weights.items()}
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, list(weights.values()))
        for name, grad in zip(weights, grads):
            totals[name] += grad.square() if selection == "fisher" else grad
    return {name: (t.abs() if selection == "gradient" else t) / len(batches) for name, t in totals.items()}


@pytest.mark.parametrize("selection", ["gradient", "fisher"])
def test_gradient_and_fisher_selection_pick_the_top_entries(selection):
    batches = bert_batches(5)
    model = fresh_bert()
    config = {"name": "sparse", "density": 0.03, "selection": selection, "calibration_batches": 3}
    deltatune.apply(model, config, calibration=iter(batches))
    expected_scores = reference_scores(selection, batches[:3])  # only the first calibration_batches count
    for name, layer in sparse_layers(model).items():
        delta = layer.sparse_deltas["default"]
        expected = torch.topk(expected_scores[name].reshape(-1), delta.indices.numel()).indices
        assert set(delta.indices.tolist()) == set(expected.tolist()), name
    assert all(p.grad is None for p in model.parameters())  # calibration leaves nothing behind
    assert not model.training  # the mode it was in
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {  # what apply left trainable, still
        n for n, p in model.named_parameters() if "sparse_deltas" in n or "modules_to_save" in n}


def test_runner_calibrates_before_training_and_the_run_reloads_exactly(tmp_path):
    from deltatune import load_config, train
    from deltatune.runs import evaluate_run

    rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful dull'} film {i}", "label": i % 2}
            for i in range(48)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config(None, [f"output_dir={tmp_path / 'runs'}", "train.progress=false", "train.num_threads=1",
                                "model.name=tests.tiny_models:tiny_bert", "model.task=classification",
                                f"data.name={data}", "method.name=sparse", "method.selection=fisher",
                                "method.density=0.05", "method.calibration_batches=2", "train.epochs=3",
                                "train.lr=1e-2", "train.batch_size=8", "run_name=sparse"])
    summary = train(config)
    from safetensors.torch import load_file

    weights = load_file(Path(summary["run_dir"]) / "weights" / "model.safetensors")
    indices = [tensor for key, tensor in weights.items() if key.endswith(".indices")]
    assert len(indices) == 12 and all(bool((t >= 0).all()) for t in indices)  # chosen by calibration, saved
    again = evaluate_run(summary["run_dir"], echo=lambda *_: None)
    assert again["test"]["loss"] == pytest.approx(summary["after"]["test"]["loss"], abs=1e-6)


def test_loss_falls_when_only_sparse_entries_train():
    model = fresh_bert()
    deltatune.apply(model, {"name": "sparse", "density": 0.1, "target_modules": "all-linear", "modules_to_save": []})
    assert all("sparse_deltas" in n for n, p in model.named_parameters() if p.requires_grad)
    assert_loss_falls(train_steps(model, bert_batches(1, seed=3)[0]), below=0.3)


# ---- errors (each option's invalid values: Sparse.contract_bad_options, checked in test_method_contracts.py) ----
@pytest.mark.parametrize("settings, message", [
    ({"density": 0}, r"method.density must be in \(0, 1\]"),
    ({"target_modules": ["attention"]}, "no floating-point weight of its own"),
])
def test_bad_settings_are_one_line_user_errors(settings, message):
    model = fresh_bert()
    with pytest.raises(UserError, match=message) as error:
        deltatune.apply(model, {"name": "sparse", **settings})
    assert "\n" not in str(error.value)


def test_data_driven_selection_without_data_is_refused_clearly():
    model = fresh_bert()
    with pytest.raises(UserError, match="selection='fisher'.*pass calibration="):
        deltatune.apply(model, {"name": "sparse", "selection": "fisher"})
    assert not sparse_layers(model)  # refused before the model was touched

    method = Sparse(SparseConfig(selection="gradient"))
    method.apply(model, family_of(model))
    model.train()
    with pytest.raises(UserError, match="not chosen yet"):
        model(**bert_batches(1)[0]).loss.backward()
    method.calibrate(model, bert_batches(2), lambda m, batch: m(**batch).loss)
    with pytest.raises(UserError, match="already chosen"):
        method.calibrate(model, bert_batches(2), lambda m, batch: m(**batch).loss)
    with pytest.raises(UserError, match="no calibration batches"):
        other = fresh_bert()
        Sparse(SparseConfig(selection="fisher")).apply(other, family_of(other))
        Sparse(SparseConfig(selection="fisher")).calibrate(other, [], lambda m, batch: m(**batch).loss)
