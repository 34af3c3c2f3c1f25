"""Adaptive layer selection (`method.layers`, issue 14) and layer-wise learning-rate decay on tiny models: listed
blocks only, scores checked by hand, the choice saved with the run, and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import deltatune
from deltatune.config.schema import TrainConfig
from deltatune.errors import UserError
from deltatune.methods.shared.layer_selection import block_scores
from deltatune.models.families import family_of
from deltatune.runs import load_run
from deltatune.training.loop import make_optimizer
from tests.bad_input import write_jsonl
from tests.test_runs import tiny_run
from tests.tiny_models import tiny_bert, tiny_llama


def trainable_blocks(model: torch.nn.Module) -> set[int]:
    family = family_of(model)
    return {family.block_index(name) for name, param in model.named_parameters()
            if param.requires_grad and family.block_index(name) is not None}


@pytest.mark.parametrize("method", [{"name": "lora", "r": 2}, {"name": "adapter"}, {"name": "freeze"}])
def test_listed_layers_are_the_only_blocks_adapted(method) -> None:
    model = tiny_bert()
    deltatune.apply(model, {**method, "layers": [1]})
    assert trainable_blocks(model) == {1}


def only_block_one_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Σ θ² over block 1: its gradient is 2θ there and 0 elsewhere."""
    family = family_of(model)
    return sum(param.square().sum() for name, param in model.named_parameters() if family.block_index(name) == 1)


def test_block_scores_by_hand() -> None:
    model = tiny_llama()
    batches = [{}] * 3
    gradient = block_scores(model, family_of(model), batches, only_block_one_loss, "gradient")
    assert gradient[0] == 0.0 and gradient[1] == pytest.approx(2.0)  # ‖2θ‖ / ‖θ‖
    fisher = block_scores(model, family_of(model), batches, only_block_one_loss, "fisher")
    block_one = [p for n, p in model.named_parameters() if family_of(model).block_index(n) == 1]
    expected = sum(float((2 * p.detach()).square().sum()) for p in block_one) / sum(p.numel() for p in block_one)
    assert fisher[0] == 0.0 and fisher[1] == pytest.approx(expected, rel=1e-5)


def test_auto_keeps_the_best_scoring_share_of_blocks_and_writes_the_choice_back() -> None:
    model = tiny_llama()
    method = deltatune.apply(model, {"name": "lora", "r": 2, "layers": "auto", "layer_budget": 0.5},
                             calibration=[{}] * 2, loss_fn=only_block_one_loss)
    assert method.config.layers == [1] and trainable_blocks(model) == {1}
    assert method.layer_scores[1] > method.layer_scores[0]
    assert math.ceil(0.5 * 2) == len(method.config.layers)


def test_a_run_with_auto_layers_saves_the_chosen_list_and_reloads(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "reviews.jsonl", [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": i % 2}
                                                    for i in range(40)])
    run_dir = tiny_run(tmp_path, "auto", ["model.name=tests.tiny_models:tiny_bert", "model.task=classification",
                                          f"data.name={data}", "method.name=lora", "method.layers=auto",
                                          "method.layer_budget=0.5", "train.max_steps=2"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["method"]["layers"]
    assert isinstance(saved, list) and len(saved) == 1
    choices = json.loads((run_dir / "summary.json").read_text())["method_choices"]
    assert choices["layers"] == saved and len(choices["layer_scores"]) == 2  # which blocks, and why
    reloaded = load_run(run_dir).model  # built from the saved list, without choosing again
    lora_blocks = {family_of(reloaded).block_index(name) for name, _ in reloaded.named_modules()
                   if name.endswith("lora_A")}
    assert lora_blocks == set(saved) == trainable_blocks(reloaded)


@pytest.mark.parametrize("layers, message", [([5], r"outside this model's 2 blocks"), ("first", r"auto or a non")])
def test_layer_mistakes(layers, message) -> None:
    with pytest.raises(UserError, match=message):
        deltatune.apply(tiny_bert(), {"name": "lora", "layers": layers})
    with pytest.raises(UserError, match=r"scores the blocks on training batches"):
        deltatune.apply(tiny_bert(), {"name": "lora", "layers": "auto"})


def test_layer_lr_decay_gives_each_depth_its_rate() -> None:
    model = tiny_bert()
    optimizer = make_optimizer(model, TrainConfig(lr=1.0, layer_lr_decay=0.5))
    rate = {id(param): group["lr"] for group in optimizer.param_groups for param in group["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == 1.0
    assert rate[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == 0.5
    assert rate[id(named["bert.embeddings.word_embeddings.weight"])] == 0.25
    assert rate[id(named["classifier.weight"])] == 1.0
    plain = make_optimizer(model, TrainConfig(lr=1.0))
    assert [group["weight_decay"] for group in plain.param_groups] == [0.01, 0.0]  # the old two groups, in order
    with pytest.raises(UserError, match=r"layer_lr_decay needs a model whose blocks deltatune recognises"):
        make_optimizer(torch.nn.Linear(3, 2), TrainConfig(lr=1.0, layer_lr_decay=0.5))  # not silently no decay


def test_sgd_optimizer_takes_plain_steps() -> None:
    """train.optimizer=sgd: θ ← θ − lr·(g + decay·θ) with momentum 0, the groups and rates as AdamW's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, TrainConfig(lr=0.5, optimizer="sgd", weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.0
    before = model.weight.detach().clone()
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
    optimizer.step()
    torch.testing.assert_close(model.weight.detach(), before - 0.5 * (1 + 0.1 * before))
