"""The prompt-side methods (prompt, ptuning, prefix, ptuning_v2) on tiny random BERT and Llama models: what the
frozen model is called with, outputs aligned with the input, KV-cached generation, gradients, training and
one-line errors. Switching, disabling, saving and refusing to merge are checked for every method by
test_adapter_contracts.py, PEFT interoperability in test_prompt_peft.py."""

import pytest
import torch

import deltatune
from deltatune.errors import UserError
from deltatune.objectives.causal_lm import next_token_loss
from deltatune.runner import count_parameters
from tests.helpers import assert_loss_falls, seeded, token_batch, train_steps
from tests.tiny_models import tiny_bert, tiny_cnn, tiny_llama

METHODS = ["prompt", "ptuning", "prefix", "ptuning_v2"]
N = 4  # virtual tokens


def llama_with(name: str, initializer_range: float = 0.02, **options):
    model = seeded(tiny_llama, initializer_range=initializer_range)
    method = deltatune.apply(model, {"name": name, "num_virtual_tokens": N, **options})
    return model.eval(), method


def llama_batch():
    batch = token_batch(2, 7)
    batch["attention_mask"][1, -2:] = 0  # right padding, as the SFT collate does
    return batch


def capture_inner_call(model, inner):
    """Record the keyword arguments `inner` (a submodule) is called with."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
        if "past_key_values" in kwargs and kwargs["past_key_values"] is not None:
            seen["cache_length"] = kwargs["past_key_values"].get_seq_length()

    handle = inner.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def prompt_table(model, peft_type="prompt_tuning"):
    return getattr(model, f"deltatune_{peft_type}").encoders["default"]()


# ---- what the frozen model sees --------------------------------------------------------------------------------
def test_prompt_tuning_prepends_embeddings_mask_and_keeps_logits_aligned():
    model, _ = llama_with("prompt")
    batch = llama_batch()
    seen, handle = capture_inner_call(model, model.model)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    handle.remove()
    embeds, table = seen["inputs_embeds"], prompt_table(model)
    assert seen["input_ids"] is None and embeds.shape == (2, N + 7, 64)
    assert torch.equal(embeds[:, :N], table.expand(2, -1, -1))
    assert torch.equal(embeds[:, N:], model.get_input_embeddings()(batch["input_ids"]))
    assert seen["attention_mask"].tolist() == [[1] * N + row for row in batch["attention_mask"].tolist()]
    assert out.logits.shape == (2, 7, model.config.vocab_size)
    assert all(hidden.shape[1] == 7 for hidden in out.hidden_states)


def test_soft_prompt_equals_real_tokens_with_the_same_embeddings():
    """A prompt holding the embeddings of tokens t gives exactly the base model's output on [t ; x] — masks and
    positions included — in a forward pass and in greedy generation."""
    model, _ = llama_with("prompt", prompt_tuning_init="sample_vocab")
    table, vocabulary = prompt_table(model), model.get_input_embeddings().weight
    tokens = torch.cdist(table, vocabulary).argmin(-1)  # which vocabulary rows the prompt was sampled from
    assert torch.equal(vocabulary[tokens], table)
    ids = llama_batch()["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        ours_generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with deltatune.disabled(model):
            prefixed = torch.cat([tokens.expand(2, -1), ids], dim=1)
            theirs = model(input_ids=prefixed).logits[:, N:]
            theirs_generated = model.generate(prefixed, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert (ours - theirs).abs().max() < 1e-5
    assert torch.equal(ours_generated[:, 7:], theirs_generated[:, N + 7:])


def test_prefix_equals_the_cached_keys_and_values_of_real_tokens():
    """A prefix holding the base model's own keys/values of tokens t gives the base output on [t ; x]: checks the
    cache layout, the mask and that the real tokens sit at positions n, n+1, ..."""
    model, _ = llama_with("ptuning_v2")
    tokens = torch.randint(5, 100, (1, N), generator=torch.Generator().manual_seed(5))
    ids = llama_batch()["input_ids"]
    with torch.no_grad(), deltatune.disabled(model):
        cache = model(input_ids=tokens, use_cache=True).past_key_values
        expected = model(input_ids=torch.cat([tokens.expand(2, -1), ids], dim=1)).logits[:, N:]
    # (n, layers·2·kv_width) in PEFT's order: per layer, keys then values, each (kv_heads, n, head_dim).
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
    flat = torch.stack(layers).permute(3, 0, 1, 2, 4).reshape(N, -1)
    with torch.no_grad():
        model.deltatune_prefix_tuning.encoders["default"].embedding.weight.copy_(flat)
        seen, handle = capture_inner_call(model, model.model)
        got = model(**llama_batch()).logits
    handle.remove()
    assert seen["cache_length"] == N and seen["attention_mask"].shape == (2, N + 7)
    assert (got - expected).abs()[llama_batch()["attention_mask"].bool()].max() < 1e-5


def test_bert_keeps_cls_first_and_inserts_token_types():
    model = seeded(tiny_bert, num_labels=3)
    deltatune.apply(model, {"name": "prompt", "num_virtual_tokens": N})
    ids = torch.randint(5, 100, (2, 6))
    types, mask = torch.ones_like(ids), torch.ones_like(ids)
    seen, handle = capture_inner_call(model, model.bert)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    handle.remove()
    embeds, table = seen["inputs_embeds"], prompt_table(model)
    assert torch.equal(embeds[:, 0], model.get_input_embeddings()(ids[:, 0]))  # [CLS] still first: the pooler reads it
    assert torch.equal(embeds[:, 1:1 + N], table.expand(2, -1, -1))
    assert seen["token_type_ids"][0].tolist() == [1] + [0] * N + [1] * 5
    assert seen["attention_mask"].shape == (2, N + 6) and logits.shape == (2, 3)


def test_positional_call_and_given_position_ids():
    model, _ = llama_with("prompt")
    ids = llama_batch()["input_ids"]
    positions = torch.arange(7).expand(2, -1)
    seen, handle = capture_inner_call(model, model.model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(input_ids=ids, position_ids=positions).logits)
    handle.remove()
    assert seen["position_ids"][0].tolist() == list(range(N + 7))


def test_labels_get_no_loss_on_virtual_tokens():
    model, _ = llama_with("ptuning")
    batch = llama_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, 0] = -100  # the first token has nothing before it without the method
    out = model(**batch, labels=labels)
    assert torch.allclose(out.loss, next_token_loss(out.logits, labels), atol=1e-6)


def test_the_lm_head_computes_only_the_real_positions_unless_the_model_computes_the_loss():
    model, _ = llama_with("prompt")
    batch = llama_batch()
    head_inputs = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0].shape[1]))
    with torch.no_grad():
        logits = model(**batch).logits
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with_loss = model(**batch, labels=labels).logits  # the model's own loss needs every position
        last = model(**batch, logits_to_keep=1).logits  # a caller's own choice (generation) is kept
    handle.remove()
    assert head_inputs == [7, N + 7, 1]
    assert logits.shape == with_loss.shape == (2, 7, model.config.vocab_size)
    assert torch.allclose(logits, with_loss, atol=1e-6) and torch.allclose(last[:, -1], logits[:, -1], atol=1e-6)


# ---- generation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_cached_generation_equals_uncached(name):
    model, _ = llama_with(name)
    ids = llama_batch()["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as batched generation uses
    runs = [model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=cache,
                           pad_token_id=0, output_scores=True, return_dict_in_generate=True) for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].scores, runs[1].scores):
        assert (cached - uncached).abs().max() < 1e-4
    with deltatune.disabled(model):
        base = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
    assert (base.scores[0] - runs[0].scores[0]).abs().max() > 1e-3  # the virtual tokens do take part


# ---- training side ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_only_the_method_trains_and_counts(name):
    model, method = llama_with(name)
    own = "deltatune_"  # the method's layer; the causal LM has no new head to train beside it
    batch = llama_batch()
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for param_name, param in model.named_parameters():
        assert param.requires_grad == param_name.startswith(own), param_name
        assert (param.grad is not None) == param.requires_grad, param_name
    trainable, _ = count_parameters(model)
    assert trainable == sum(t.numel() for t in method.trainable_state(model).values())


@pytest.mark.parametrize("name", METHODS)
def test_loss_falls_on_a_tiny_task(name):
    # Weights of std 0.2: at the default 0.02 the tied 30522-word head cannot move far from uniform in 30 steps.
    model, _ = llama_with(name, initializer_range=0.2)
    ids = torch.randint(5, 100, (4, 6), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 7  # always answer token 7
    assert_loss_falls(train_steps(model, {"input_ids": ids, "labels": labels}, steps=30, lr=3e-2), below=0.5)


def test_text_init_and_weighted_combination():
    from deltatune.methods.virtual_tokens.prompt import PromptTuning, PromptTuningConfig
    from deltatune.models.families import family_of
    from tests.tiny_models import _minilm_dir, tiny_bert_processor

    model, _ = llama_with("prompt", prompt_tuning_init="text", prompt_tuning_init_text="great movie",
                          tokenizer_name_or_path=str(_minilm_dir()))
    ids = tiny_bert_processor()("great movie")["input_ids"]  # [CLS] great movie [SEP]: repeated to N
    assert torch.equal(prompt_table(model), model.get_input_embeddings().weight[torch.tensor((ids * 2)[:N])])
    second = PromptTuning(PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="random"), "second")
    second.apply(model, family_of(model))
    deltatune.add_weighted_adapter(model, ["default", "second"], [0.5, 2.0], "mix")
    layer = model.deltatune_prompt_tuning
    expected = 0.5 * layer.encoders["default"]() + 2.0 * layer.encoders["second"]()
    assert torch.allclose(layer.encoders["mix"](), expected)
    batch = llama_batch()
    with torch.no_grad():
        second_logits = model(**batch).logits  # apply made "second" the active adapter
        deltatune.set_adapter(model, "default")
        assert (model(**batch).logits - second_logits).abs().max() > 1e-3


# ---- errors (each option's invalid values: the classes' contract_bad_options, checked in test_method_contracts.py)
def test_packed_rows_are_refused():
    model, _ = llama_with("prefix")
    ids = torch.randint(5, 100, (1, 6))
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(UserError, match="set data.packing: false"):
        model(input_ids=ids, position_ids=packed, use_cache=False)


@pytest.mark.parametrize("options, message", [
    ({"name": "prompt", "prompt_tuning_init": "text"}, "needs method.prompt_tuning_init_text"),
    ({"name": "prompt", "keep_first_token": True}, "keep_first_token: true is for encoders"),  # only on a generator
])
def test_bad_settings_are_one_line_errors(options, message):
    model = tiny_llama()
    with pytest.raises(UserError, match=message) as error:
        deltatune.apply(model, options)
    assert "\n" not in str(error.value)
    assert not any(name.startswith("deltatune_") for name, _ in model.named_children())


def test_models_without_attention_layout_or_embeddings_are_refused():
    from types import SimpleNamespace

    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="opaque")
            self.body = torch.nn.Linear(4, 4)

    with pytest.raises(UserError, match="needs the attention layout"):
        deltatune.apply(Opaque(), {"name": "prefix"})
    with pytest.raises(UserError, match="get_input_embeddings"):
        deltatune.apply(Opaque(), {"name": "ptuning"})
    with pytest.raises(UserError, match="works on transformer models"):
        deltatune.apply(tiny_cnn(), {"name": "prompt"})


# ---- whole runs ------------------------------------------------------------------------------------------------
def sft_run(tmp_path, method: str, packing: bool):
    import json

    from deltatune import load_config, train

    pairs = [{"prompt": f"what is {a} plus {b}", "response": f"{a + b}"} for a in range(5) for b in range(5)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    config = load_config(None, [f"output_dir={tmp_path / 'runs'}", "train.progress=false", "train.num_threads=1",
                                "model.name=tests.tiny_models:tiny_llama", "model.task=causal-lm", f"data.name={data}",
                                f"data.packing={str(packing).lower()}", "data.max_length=32", "train.max_steps=3",
                                "train.batch_size=4", f"method.name={method}", f"method.num_virtual_tokens={N}",
                                f"run_name={method}-{packing}"])
    return train(config)


def test_packed_sft_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="set data.packing: false"):
        sft_run(tmp_path, "prompt", packing=True)


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_sft_run_counts_saves_and_generates(tmp_path, name):
    from deltatune.generate import generate_from_run

    summary = sft_run(tmp_path, name, packing=False)
    model, method = llama_with(name)
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name == "prompt":
        assert summary["trainable_parameters"] == N * 64  # the soft prompt only: N vectors of the hidden size
    results = generate_from_run(summary["run_dir"], ["what is 1 plus 2"], compare=True, max_new_tokens=4,
                                echo=lambda *_: None)
    assert "tuned" in results[0] and "base" in results[0]


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_a_decoder_classifier_reads_each_rows_last_real_token_under_a_prompt(method) -> None:
    """LlamaForSequenceClassification pools the last non-pad token, found from input_ids: the prompt goes into the
    inner model, so a right-padded row scores as it does unpadded (hooked on the outer model it read a pad)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    deltatune.apply(model, {"name": method, "num_virtual_tokens": 4})
    ids, padded = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[5, 6, 7, 8, 9, 10, 0, 0]])
    with torch.no_grad():
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        in_a_batch = model(input_ids=padded, attention_mask=(padded != 0).long()).logits
        with deltatune.disabled(model):
            plain = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(alone, in_a_batch, atol=1e-5)
    assert not torch.allclose(alone, plain, atol=1e-4)  # the prompt is in effect


def test_prompts_inserted_at_different_places_do_not_combine() -> None:
    from deltatune.methods.virtual_tokens.prompt import PromptTuning
    from deltatune.models.families import family_of

    model = seeded(tiny_bert, 2)
    deltatune.apply(model, {"name": "prompt", "num_virtual_tokens": 4, "keep_first_token": True})
    first = PromptTuning(PromptTuning.config_class(num_virtual_tokens=4, keep_first_token=False), adapter_name="first")
    first.apply(model, family_of(model))
    with pytest.raises(UserError, match=r"inserted at different places \[0, 1\]; train them with the same "
                                        r"method\.keep_first_token"):
        deltatune.add_weighted_adapter(model, ["default", "first"], [0.5, 0.5], "mix")
