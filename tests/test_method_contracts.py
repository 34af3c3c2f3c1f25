"""Contract tests generated from the method registry: every registered method, on tiny random models, must
keep the model's output at init, give gradients only to its own parameters, save and reload exactly, and make the
loss fall on a tiny task. A new method file gets these tests without touching this one."""

import pytest
import torch

import deltatune
from deltatune.methods import available_methods, get_method
from deltatune.models import ImageClassifier
from deltatune.models.families import family_of
from tests.tiny_models import tiny_bert, tiny_cnn, tiny_llama

METHODS = list(available_methods())


def build(kind: str, name: str | None = None):
    """Tiny model `kind` ("bert", "llama" or "cnn") with a batch, an output picker and labels; skips the test when
    method `name` does not support that kind of model."""
    if name is not None and ("cnn" if kind == "cnn" else "transformer") not in get_method(name).model_kinds:
        pytest.skip(f"{name} does not support {kind} models")
    torch.manual_seed(0)
    if kind == "bert":
        model = tiny_bert(num_labels=3)
        batch = {"input_ids": torch.randint(5, 100, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
        return model, batch, lambda out: out.logits, torch.randint(0, 3, (8,))
    if kind == "llama":
        # With biases (as in Qwen2-style Llamas) so every method, BitFit included, has something to train.
        model = tiny_llama(attention_bias=True, mlp_bias=True)
        batch = {"input_ids": torch.randint(5, 100, (4, 16))}
        return model, batch, lambda out: out.logits[:, -1], torch.randint(0, 100, (4,))
    model = ImageClassifier(tiny_cnn(num_labels=4))
    batch = {"pixel_values": torch.randn(8, 3, 32, 32)}
    return model, batch, lambda out: out if torch.is_tensor(out) else out.logits, torch.randint(0, 4, (8,))


def apply_default(name: str, model):
    method_class = get_method(name)
    method = method_class(method_class.contract_config())
    method.apply(model, family_of(model))
    return method


def outputs(model, batch, pick):
    model.eval()
    with torch.no_grad():
        return pick(model(**batch))


@pytest.mark.parametrize("kind", ["bert", "llama", "cnn"])
@pytest.mark.parametrize("name", METHODS)
def test_output_unchanged_at_init(name, kind):
    model, batch, pick, _ = build(kind, name)
    before = outputs(model, batch, pick)
    apply_default(name, model)
    after = outputs(model, batch, pick)
    if get_method(name).preserves_output_at_init:
        assert torch.allclose(after, before, atol=1e-6)
        return
    with deltatune.disabled(model):
        base = outputs(model, batch, pick)
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


@pytest.mark.parametrize("kind", ["bert", "llama", "cnn"])
@pytest.mark.parametrize("name", METHODS)
def test_only_trainable_parameters_get_gradients(name, kind):
    model, batch, pick, labels = build(kind, name)
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


@pytest.mark.parametrize("kind", ["bert", "cnn"])
@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip_and_loss_falls(name, kind, tmp_path):
    from safetensors.torch import load_file, save_file

    model, batch, pick, labels = build(kind, name)
    method = apply_default(name, model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(pick(model(**batch)), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], f"{name} on {kind}: loss went {losses[0]:.3f} -> {losses[-1]:.3f}"

    save_file({k: v.contiguous() for k, v in method.trainable_state(model).items()}, tmp_path / "w.safetensors")
    fresh, _, _, _ = build(kind)
    fresh_method = apply_default(name, fresh)
    fresh_method.load_trainable_state(fresh, load_file(tmp_path / "w.safetensors"))
    # Running statistics are buffers, saved by the loop beside the method's state; compare in train-free mode.
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k},
                          strict=False)
    assert torch.allclose(outputs(fresh, batch, pick), outputs(model, batch, pick), atol=1e-5)


def test_bitfit_trains_biases_and_head_only():
    model = tiny_bert(num_labels=3)
    apply_default("bitfit", model)
    family = family_of(model)
    for name, param in model.named_parameters():
        assert param.requires_grad == (name.endswith(".bias") or family.is_head(name)), name


def test_freeze_last_blocks_and_patterns():
    from deltatune.methods.selective.freeze import Freeze, FreezeConfig

    model = tiny_llama()
    family = family_of(model)
    Freeze(FreezeConfig(last_n_blocks=1, train_head=False, patterns=[r"embed_tokens"])).apply(model, family)
    last = family.num_blocks(model) - 1
    for name, param in model.named_parameters():
        expected = family.block_index(name) == last or family.is_after_blocks(name) or "embed_tokens" in name
        assert param.requires_grad == expected, name


def test_freeze_rejects_bad_choices():
    from deltatune.errors import UserError
    from deltatune.methods.selective.freeze import Freeze, FreezeConfig

    model = tiny_bert(num_labels=2)
    with pytest.raises(UserError, match="last_n_blocks=9 but the model has 2 bert blocks"):
        Freeze(FreezeConfig(last_n_blocks=9)).apply(model, family_of(model))
    with pytest.raises(UserError, match="selected no parameter"):
        Freeze(FreezeConfig(train_head=False)).apply(model, family_of(model))
    with pytest.raises(UserError, match="not a valid regular expression"):
        Freeze(FreezeConfig(patterns=["("])).apply(model, family_of(model))
