"""The fast-path options of issue 15 on tiny models: the chunked cross-entropy through the output layer against
plain F.cross_entropy on the same tensors (value and every gradient, ignored positions, chunks that do not divide
the rows) and the SFT objective's chunked_loss against its plain loss; gradient checkpointing and torch.compile
train as the eager, uncheckpointed run does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deltatune.errors import UserError
from deltatune.objectives.causal_lm import SupervisedFineTuning, SupervisedFineTuningConfig
from deltatune.objectives.losses.linear_cross_entropy import linear_cross_entropy
from tests.tiny_models import tiny_llama


@pytest.mark.parametrize("with_bias, reduction, frozen_layer", [(True, "mean", False), (False, "sum", False),
                                                                 (True, "mean", True), (False, "sum", True)])
def test_value_and_gradients_equal_the_plain_loss(with_bias, reduction, frozen_layer) -> None:
    """A frozen output layer takes the other path (∂h computed in forward, scaled in backward)."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=not frozen_layer)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=not frozen_layer) if with_bias else None
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :4] = -100  # prompt positions
    ours = linear_cross_entropy(hidden, weight, bias, targets, chunk_size=4, reduction=reduction)
    wanted = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    ours_grads = torch.autograd.grad(ours * 1.7, wanted)  # an upstream gradient other than 1
    plain = F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, 50), targets.reshape(-1), ignore_index=-100,
                            reduction=reduction)
    plain_grads = torch.autograd.grad(plain * 1.7, wanted)
    assert float(ours.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    for mine, theirs in zip(ours_grads, plain_grads):
        assert torch.allclose(mine, theirs, atol=1e-6)
    assert not ours_grads[0][0, :4].any()  # an ignored position gets no gradient


def test_the_sft_objective_gives_the_same_loss_and_gradients_either_way() -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    batch = {"input_ids": torch.randint(0, 100, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :4] = -100
    results = []
    for chunked in (False, True):
        model.zero_grad()
        objective = SupervisedFineTuning(SupervisedFineTuningConfig(name="sft", chunked_loss=chunked,
                                                                    loss_chunk_size=3))
        loss, _ = objective.loss(model, batch)
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results
    assert chunked_loss == pytest.approx(plain_loss, rel=1e-5)
    assert len(plain_grads) == len(chunked_grads)
    for plain, chunked in zip(plain_grads, chunked_grads):
        assert torch.allclose(plain, chunked, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_trains_the_same_and_refuses_models_without_it(tmp_path) -> None:
    import json

    from deltatune.errors import UserError
    from deltatune.runner import enable_gradient_checkpointing
    from tests.test_runs import sft_run
    from tests.tiny_models import tiny_cnn

    losses = []
    for checkpointing in (False, True):
        root = tmp_path / str(checkpointing)
        root.mkdir()
        run = sft_run(root, "lora", ["method.r=4", "train.max_steps=3", "train.lr=1e-2",
                                                                f"train.gradient_checkpointing={checkpointing}"])
        losses.append(json.loads((run / "summary.json").read_text())["after"]["validation"]["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    with pytest.raises(UserError, match="train.gradient_checkpointing needs a transformers model"):
        enable_gradient_checkpointing(tiny_cnn(), True)


@pytest.mark.slow
def test_a_compiled_run_trains_like_an_eager_one(tmp_path) -> None:
    import json

    from tests.test_runs import sft_run

    losses = []
    for compiled in (False, True):
        root = tmp_path / str(compiled)
        root.mkdir()
        run = sft_run(root, "lora", ["method.r=4", "train.max_steps=2", "train.lr=1e-2", f"train.compile={compiled}"])
        losses.append(json.loads((run / "summary.json").read_text())["after"]["validation"]["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


FREED_MEMORY_PROBE = """
import sys, torch
from pathlib import Path
def rss():
    line = next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS:'))
    return int(line.split()[1]) / 1024
if sys.argv[1] == '1':
    from deltatune.training.device import return_freed_memory_to_os
    assert return_freed_memory_to_os()
torch.ones(16).sum()  # torch's own first-use allocations, before the measurement
before = rss()
for _ in range(3):  # glibc raises its mmap threshold at the first free; later blocks then come from the heap
    block = torch.ones(2 * 1024 * 1024)  # 8 MiB, written
    del block
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_return_freed_memory_gives_freed_blocks_back_to_the_os():
    def kept_mib(flag: str) -> float:
        done = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE, flag], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        return float(done.stdout.strip().splitlines()[-1])

    assert kept_mib("0") > 4.0  # glibc's default keeps the freed 8 MiB block in the heap
    assert kept_mib("1") < 2.0  # unmapped when freed


def test_the_chunked_loss_is_on_by_default_where_the_model_allows_it() -> None:
    """chunked_loss None (the default) takes the chunked path on a transformers causal LM and the plain one when a
    method has wrapped the output layer; true there is a one-line error."""
    from deltatune.errors import UserError

    torch.manual_seed(0)
    model = tiny_llama()
    batch = {"input_ids": torch.randint(0, 100, (2, 6)), "labels": torch.randint(0, 100, (2, 6))}
    default = SupervisedFineTuning(SupervisedFineTuningConfig(name="sft"))
    assert default._chunked(model)
    model.lm_head = torch.nn.Sequential(model.lm_head)  # as LoRA on lm_head would leave it
    assert not default._chunked(model)
    loss, _ = default.loss(model, batch)
    assert torch.isfinite(loss)
    insisting = SupervisedFineTuning(SupervisedFineTuningConfig(name="sft", chunked_loss=True))
    with pytest.raises(UserError, match="plain Linear"):
        insisting.loss(model, batch)


def test_a_model_that_caps_its_logits_after_the_output_layer_trains_on_its_own_logits() -> None:
    """Gemma 2 caps its logits with tanh after lm_head: a loss through the output layer's weight alone would train
    on other logits than the model gives, so chunking steps aside by default and an explicit request is refused."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from deltatune.errors import UserError
    from deltatune.objectives.causal_lm import lm_logits, next_token_loss

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=0.5))
    batch = {"input_ids": torch.randint(0, 100, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    auto = SupervisedFineTuning(SupervisedFineTuningConfig(name="sft"))
    with torch.no_grad():
        loss, _ = auto.loss(model, batch)
        expected = next_token_loss(lm_logits(model, batch), batch["labels"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    insisted = SupervisedFineTuning(SupervisedFineTuningConfig(name="sft", chunked_loss=True))
    with pytest.raises(UserError, match=r"changes its logits after the output layer \(config\.final_logit_softcapping"):
        insisted.loss(model, batch)


@pytest.mark.parametrize("build, kept_apart", [("llama", True), ("llama-large-logits", True), ("llama-bf16", True),
                                               ("opt", False)])
def test_packing_is_refused_for_a_model_that_lets_packed_examples_attend_to_each_other(build, kept_apart) -> None:
    """OPT builds its causal mask without position_ids: packed examples would see each other, silently. A model that
    keeps them apart passes however large its logits and whatever its dtype: SmolLM2's logits of ±20 carry 1e-4 of
    rounding between two packings, which a comparison of logits once took for a leak."""
    from transformers import OPTConfig, OPTForCausalLM

    from deltatune.data.sft import check_packing_keeps_examples_apart
    from tests.tiny_models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama() if build.startswith("llama") else OPTForCausalLM(OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        word_embed_proj_dim=16, max_position_embeddings=32))
    if build == "llama-large-logits":
        model.model.norm.weight.data.mul_(1e3)  # logits ×1000: their rounding noise reaches ~1e-4
    if build == "llama-bf16":
        model.to(torch.bfloat16)
    if kept_apart:
        check_packing_keeps_examples_apart(model)
        assert all(parameter.grad is None for parameter in model.parameters())  # the probe trained nothing
    else:
        with pytest.raises(UserError, match=r"OPTForCausalLM lets packed examples attend to each other .*set "
                                            r"data\.packing=false"):
            check_packing_keeps_examples_apart(model)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["smollm2_chatterbot_lora.yaml", "smollm2_chatterbot_sft.yaml", "rlhf/1_sft.yaml"])
def test_the_packed_smollm2_examples_pass_the_packing_probe_on_the_real_model(example) -> None:
    """The examples that pack SmolLM2's rows get through preparation, probe included, on the real model: a probe
    that compared logits took SmolLM2's rounding (1e-4 in logits of ±20) for a leak and refused all three."""
    from deltatune.config.loader import load_config
    from deltatune.preparation import prepare

    config = load_config(str(Path(__file__).resolve().parents[1] / "examples" / example), [])
    assert config.data.packing
    prepared = prepare(config)
    assert prepared.data.packed
