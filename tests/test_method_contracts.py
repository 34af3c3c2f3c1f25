"""Contract tests generated from the method registry: every registered method, on tiny random models, must
keep the model's output at init, give gradients only to its own parameters, save and reload exactly, make the
loss fall on a tiny task, and refuse the option values its class declares invalid (`contract_bad_options`) and
unknown options with a one-line UserError that leaves the model as it was. The adapter API's promises (switch,
disable, merge, files) are generated in test_adapter_contracts.py. A new method file gets these tests without
touching either file."""

import dataclasses

import pytest
import torch

import deltatune
from deltatune.errors import UserError
from deltatune.methods import available_methods, get_method
from deltatune.models.families import family_of
from tests.helpers import (
    KINDS,
    assert_loss_falls,
    assert_unchanged,
    has_no_adapters,
    logits,
    snapshot,
    tiny_case,
    train_steps,
)
from tests.tiny_models import tiny_bert, tiny_llama

METHODS = list(available_methods())
build = tiny_case  # the name tests/test_extending_examples.py runs these contracts through


def apply_default(name: str, model):
    method_class = get_method(name)
    method = method_class(method_class.contract_config())
    method.apply(model, family_of(model))
    return method


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_output_unchanged_at_init(name, kind):
    model, batch, pick, _ = tiny_case(kind, name)
    before = logits(model, batch, pick)
    apply_default(name, model)
    after = logits(model, batch, pick)
    if get_method(name).preserves_output_at_init:
        assert torch.allclose(after, before, atol=1e-6)
        return
    with deltatune.disabled(model):
        base = logits(model, batch, pick)
    if get_method(name).init_change_from == "adapter":
        # Adapters without a neutral init (prompt tuning's virtual tokens) leave the base untouched: disabling
        # them gives back the original output exactly, and enabled they do change it.
        assert torch.allclose(base, before, atol=1e-6)
        assert not torch.equal(after, before)
        return
    # Methods that change the frozen base itself (qlora quantises it) promise that their adapters add nothing at
    # init: the output equals the adapted model's own base (adapters disabled), and that base stays close to the
    # original (NF4 gives ~10% relative error on these random tiny models; a broken base gives ~100%).
    assert torch.allclose(after, base, atol=1e-6)
    assert (after - before).norm() / before.norm() < 0.25


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_only_trainable_parameters_get_gradients(name, kind):
    model, batch, pick, labels = tiny_case(kind, name)
    method = apply_default(name, model)
    model.train()
    torch.nn.functional.cross_entropy(pick(model(**batch)), labels).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "a method must leave something to train"
    for param_name, param in model.named_parameters():
        if param_name not in trainable:
            assert param.grad is None, f"{name}: frozen {param_name} got a gradient"
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= trainable
    # Everything that trains is saved; besides, only buffers that say where trained values go (sparse's indices),
    # never a frozen parameter.
    saved = set(method.trainable_state(model))
    assert trainable <= saved and saved - trainable <= {n for n, _ in model.named_buffers()}


@pytest.mark.parametrize("kind", ["bert", "cnn", "dual"])
@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip_and_loss_falls(name, kind, tmp_path):
    from safetensors.torch import load_file, save_file

    model, batch, pick, labels = tiny_case(kind, name)
    method = apply_default(name, model)
    assert_loss_falls(train_steps(model, batch, labels, pick=pick), what=f"{name} on {kind}:")

    save_file({k: v.contiguous() for k, v in method.trainable_state(model).items()}, tmp_path / "w.safetensors")
    fresh, _, _, _ = tiny_case(kind)
    fresh_method = apply_default(name, fresh)
    fresh_method.load_trainable_state(fresh, load_file(tmp_path / "w.safetensors"))
    # Running statistics are buffers, saved by the loop beside the method's state; compare in train-free mode.
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k},
                          strict=False)
    assert torch.allclose(logits(fresh, batch, pick), logits(model, batch, pick), atol=1e-5)


# ---- bad options: what each method class declares it refuses -----------------------------------------------------
BAD_OPTIONS = [pytest.param(name, option, value, id=f"{name}-{option}={value!r}")
               for name, method in available_methods().items() for option, value in method.contract_bad_options()]


@pytest.fixture(scope="module")
def untouched():
    """kind -> one tiny model for every bad-option case, with its tensors and trainable flags as built: each case
    must leave the model as it was, which the test checks, so they can share it."""
    models = {}

    def model_of(kind: str):
        if kind not in models:
            model = tiny_case(kind).model
            models[kind] = model, snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
        return models[kind]

    return model_of


def refused_on_untouched(untouched, name: str, options: dict) -> str:
    """The one-line UserError `deltatune.apply` raises for `options` on a tiny model, which stays as it was."""
    kinds = get_method(name).model_kinds
    kind = "llama" if "transformer" in kinds else "cnn" if "cnn" in kinds else "dual"
    model, tensors, trainable = untouched(kind)
    with pytest.raises(UserError) as error:
        deltatune.apply(model, {"name": name, **options})
    assert has_no_adapters(model)
    assert_unchanged(model, tensors)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    assert "\n" not in str(error.value)
    return str(error.value)


def shown_as(value) -> list[str]:
    """How a message may show a bad value: the value itself or, for a list or mapping, one of its entries."""
    entries = [*value, *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else [value]
    return [str(entry).lower() for entry in entries]


@pytest.mark.parametrize("name, option, value", BAD_OPTIONS)
def test_bad_option_is_refused_naming_it_and_its_value(name, option, value, untouched):
    assert option in {field.name for field in dataclasses.fields(get_method(name).config_class)}
    message = refused_on_untouched(untouched, name, {option: value})
    assert f"method.{option}" in message
    assert any(shown in message.lower() for shown in shown_as(value)), message


@pytest.mark.parametrize("name", METHODS)
def test_unknown_option_is_refused_with_the_valid_ones(name, untouched):
    message = refused_on_untouched(untouched, name, {"no_such_option": 1})
    assert "unknown key 'no_such_option' in method" in message and "valid keys: name" in message


def test_bitfit_trains_biases_and_head_only():
    model = tiny_bert(num_labels=3)
    apply_default("bitfit", model)
    family = family_of(model)
    for name, param in model.named_parameters():
        assert param.requires_grad == (name.endswith(".bias") or family.is_head(name)), name


def test_bitfit_refuses_a_model_without_biases_rather_than_training_only_the_new_head():
    """A Llama classifier has no bias at all, only its new `score` head would train: a linear probe, not BitFit."""
    from transformers import LlamaForSequenceClassification

    config = tiny_llama().config  # attention_bias and mlp_bias are off, as in Llama
    config.num_labels = 3
    model = LlamaForSequenceClassification(config)
    tensors, trainable = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(UserError, match="bitfit found no bias parameters outside the task head") as error:
        apply_default("bitfit", model)
    assert "\n" not in str(error.value)
    assert_unchanged(model, tensors)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable


def test_freeze_last_blocks_and_patterns():
    from deltatune.methods.selective.freeze import Freeze, FreezeConfig

    model = tiny_llama()
    family = family_of(model)
    Freeze(FreezeConfig(last_n_blocks=1, train_head=False, patterns=[r"embed_tokens"])).apply(model, family)
    last = family.num_blocks(model) - 1
    for name, param in model.named_parameters():
        expected = family.block_index(name) == last or family.is_after_blocks(name) or "embed_tokens" in name
        assert param.requires_grad == expected, name


def test_freeze_last_blocks_trains_a_gpt2_final_norm_with_them():
    """GPT-2 falls to the generic family, whose final pre-norm (transformer.ln_f) trains with the last blocks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from deltatune.methods.selective.freeze import Freeze, FreezeConfig

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=120, n_positions=32))
    Freeze(FreezeConfig(last_n_blocks=1, train_head=False)).apply(model, family_of(model))
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias"} <= trained
    assert all(name.startswith(("transformer.h.1.", "transformer.ln_f.")) for name in trained)


def test_freeze_rejects_bad_choices():
    from deltatune.methods.selective.freeze import Freeze, FreezeConfig

    model = tiny_bert(num_labels=2)
    with pytest.raises(UserError, match="last_n_blocks=9 but the model has 2 bert blocks"):
        Freeze(FreezeConfig(last_n_blocks=9)).apply(model, family_of(model))
    with pytest.raises(UserError, match="selected no parameter"):
        Freeze(FreezeConfig(train_head=False)).apply(model, family_of(model))
    with pytest.raises(UserError, match="not a valid regular expression"):
        Freeze(FreezeConfig(patterns=["("])).apply(model, family_of(model))
