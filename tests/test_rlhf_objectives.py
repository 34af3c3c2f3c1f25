"""The pieces of the reward, DPO and PPO objectives below the runner: the score read at the last real token (right
when pad == eos), text scorers, rollout layout, DPO's precomputed reference, and choosing the objective choosing the
task. The end-to-end promises (metric improves, exact resume, reference == frozen copy) are in
test_objective_contracts.py; the one-line errors in test_bad_inputs_preference.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from deltatune.config.loader import load_config
from deltatune.errors import UserError
from deltatune.objectives.pairs import last_real_positions, sequence_scores
from deltatune.objectives.rollouts import response_mask, right_padded
from deltatune.objectives.scorers import FunctionScorer, TextScorer
from deltatune.preparation import run_task
from deltatune.runner import train
from tests.bad_input import write_jsonl
from tests.tiny_models import tiny_bert, tiny_bert_processor

EOS = 2


def decoder_reward_model() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=EOS,
                         eos_token_id=EOS)
    return LlamaForSequenceClassification(config).eval()


def test_last_real_positions_for_right_and_left_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_real_positions(mask).tolist() == [2, 4, 4]


def test_decoder_reward_is_read_at_the_last_real_token_when_pad_equals_eos() -> None:
    model = decoder_reward_model()
    rows = [[5, 6, 7, EOS], [8, 9, EOS]]  # both texts end in eos, which is also the pad token
    batch = {"input_ids": torch.tensor([rows[0], rows[1] + [EOS]]), "attention_mask": torch.tensor([[1] * 4, [1, 1, 1, 0]])}
    with torch.no_grad():
        per_position = [model.model(input_ids=torch.tensor([row])).last_hidden_state for row in rows]
        expected = torch.stack([model.score(states)[0, -1, 0] for states in per_position])
        got = sequence_scores(model, batch)
        transformers_pooled = model(**batch).logits[:, 0]
    torch.testing.assert_close(got, expected)
    # transformers keeps the last token that is not pad_token_id: here the one before eos, a different score.
    assert not torch.allclose(transformers_pooled, expected)


def test_a_prompt_tuned_decoder_reward_is_read_at_the_last_real_token() -> None:
    """Prompt tuning puts n virtual tokens first: the head sees each real token n positions later, so the score is
    read there, as the same row alone (no padding: its last position) gives it."""
    import deltatune

    model = decoder_reward_model()
    deltatune.apply(model, {"name": "prompt", "num_virtual_tokens": 3})
    model.eval()
    rows = [[5, 6, 7, 8], [8, 9, 10]]
    batch = {"input_ids": torch.tensor([rows[0], rows[1] + [EOS]]), "attention_mask": torch.tensor([[1] * 4, [1, 1, 1, 0]])}
    captured = []
    handle = model.score.register_forward_hook(lambda _m, _i, output: captured.append(output))
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor([row]))
        handle.remove()
        expected = torch.stack([output[0, -1, 0] for output in captured])
        torch.testing.assert_close(sequence_scores(model, batch), expected)


def test_encoder_reward_uses_the_pooled_score() -> None:
    torch.manual_seed(0)
    model = tiny_bert(num_labels=1).eval()
    batch = {"input_ids": torch.tensor([[101, 2204, 102, 0], [101, 2919, 3185, 102]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(model, batch), model(**batch).logits[:, 0])


def test_text_scorer_scores_each_pair_as_alone() -> None:
    torch.manual_seed(0)
    scorer = TextScorer(tiny_bert(num_labels=1).eval(), tiny_bert_processor(), max_length=32, batch_size=2)
    prompts, responses = ["Review Alpha.", "Review Beta.", "Review Gamma."], ["great", "a long and dull film", "ok"]
    together = scorer(prompts, responses)
    alone = torch.cat([scorer([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_function_scorer_checks_what_the_function_returns() -> None:
    assert FunctionScorer(lambda p, r: [len(x) for x in r], "lengths")(["a", "b"], ["xy", "z"]).tolist() == [2.0, 1.0]
    with pytest.raises(UserError, match=r"returned 1 scores for 2 responses"):
        FunctionScorer(lambda p, r: [1.0], "short")(["a", "b"], ["x", "y"])
    with pytest.raises(UserError, match=r"non-finite"):
        FunctionScorer(lambda p, r: [float("nan")] * 2, "nan")(["a", "b"], ["x", "y"])
    with pytest.raises(UserError, match=r"returned str"):
        FunctionScorer(lambda p, r: "good", "text")(["a"], ["x"])


def test_responses_end_at_their_first_eos_and_are_laid_out_right_padded() -> None:
    responses = torch.tensor([[5, EOS, 7, 7], [5, 6, 7, 8], [EOS, 0, 0, 0]])
    assert response_mask(responses, EOS).tolist() == [[True, True, False, False], [True] * 4,
                                                      [True, False, False, False]]
    inputs = right_padded([(torch.tensor([1, 2]), torch.tensor([5, EOS])), (torch.tensor([3]), torch.tensor([5, 6, 7]))],
                          pad=0)
    assert inputs["input_ids"].tolist() == [[1, 2, 5, EOS], [3, 5, 6, 7]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert inputs["labels"].tolist() == [[-100, -100, 5, EOS], [-100, 5, 6, 7]]


def test_naming_the_objective_picks_its_task(tmp_path) -> None:
    def task_of(*overrides: str) -> str:
        return run_task(load_config(None, ["model.name=smollm2-135m", *overrides])).name

    assert task_of() == "causal-lm"
    assert task_of("objective.name=dpo") == "preference"
    assert task_of("objective.name=ppo") == "prompts"
    assert run_task(load_config(None, ["model.name=minilm-l6", "objective.name=reward"])).name == "reward-pairs"
    with pytest.raises(UserError, match=r"objective 'dpo' reads 'preference' rows but model\.task is 'causal-lm'"):
        task_of("objective.name=dpo", "model.task=causal-lm")
    with pytest.raises(UserError, match=r"cannot be loaded for task 'preference'"):
        run_task(load_config(None, ["model.name=minilm-l6", "objective.name=dpo"]))


def test_precomputed_reference_matches_the_live_one_and_is_saved(tmp_path) -> None:
    rows = [{"prompt": f"Review film {i % 6}.", "chosen": "great moving film", "rejected": "dull " * (1 + i % 3)}
            for i in range(24)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    common = ["model.name=tests.tiny_models:tiny_llama", "objective.name=dpo", f"data.name={data}",
              "method.name=lora", "train.max_steps=4", "train.batch_size=4", "train.lr=1e-2", "train.log_every=1",
              "train.progress=false", "train.num_threads=1", f"output_dir={tmp_path / 'runs'}"]
    live = train(load_config(None, [*common, "run_name=live"]), echo=lambda *_: None)
    stored = train(load_config(None, [*common, "run_name=stored", "objective.precompute_reference=true"]),
                   echo=lambda *_: None)
    saved = Path(stored["run_dir"]) / "precomputed"
    assert sorted(path.name for path in saved.glob("*.safetensors")) == ["test.safetensors", "train.safetensors",
                                                                         "validation.safetensors"]
    losses = [[json.loads(line)["loss"] for line in open(Path(run["run_dir"]) / "metrics.jsonl")
               if '"train"' in line] for run in (live, stored)]
    assert losses[0][0] == pytest.approx(0.6931471805599453, abs=1e-6)  # a LoRA policy starts equal to its reference
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_a_finished_run_directory_is_a_model_name(tmp_path) -> None:
    rows = [{"prompt": f"Review film {i % 6}.", "response": "a fine film", "chosen": "great moving film",
             "rejected": "dull " * (1 + i % 3)} for i in range(24)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = [f"data.name={data}", "train.max_steps=2", "train.batch_size=4", "train.progress=false",
              "train.num_threads=1", f"output_dir={tmp_path / 'runs'}"]
    sft = train(load_config(None, ["model.name=tests.tiny_models:tiny_llama", "model.task=causal-lm",
                                   "method.name=lora", "run_name=sft", *common]), echo=lambda *_: None)
    dpo = train(load_config(None, [f"model.name={sft['run_dir']}", "objective.name=dpo", "method.name=lora",
                                   "run_name=dpo", *common]), echo=lambda *_: None)
    merged = Path(sft["run_dir"]) / "merged"
    assert (merged / "config.json").is_file() and dpo["task"] == "preference"
    assert json.loads((merged / "deltatune-source.json").read_text())["weights_sha256"]  # refolded if it changes
    assert load_config(Path(dpo["run_dir"]) / "config.yaml").model.name == str(merged)
    first_fold = (merged / "model.safetensors").read_bytes()
    sft_config = ["model.name=tests.tiny_models:tiny_llama", "model.task=causal-lm", "method.name=lora",
                  "run_name=sft", *common]
    train(load_config(None, [*sft_config, "train.max_steps=3"]), resume=True, echo=lambda *_: None)
    again = train(load_config(None, [f"model.name={sft['run_dir']}", "objective.name=dpo", "method.name=lora",
                                     "run_name=dpo-again", *common]), echo=lambda *_: None)
    refolded = Path(load_config(Path(again["run_dir"]) / "config.yaml").model.name)
    assert refolded.parent == merged.parent and refolded.name.startswith("merged-")
    assert (merged / "model.safetensors").read_bytes() == first_fold  # the dpo run's base stays what it trained on
    prompt = train(load_config(None, ["model.name=tests.tiny_models:tiny_llama", "model.task=causal-lm",
                                      "method.name=prompt", "run_name=prompt", *common]), echo=lambda *_: None)
    with pytest.raises(UserError, match=r"virtual tokens\) cannot be merged into weights"):
        train(load_config(None, [f"model.name={prompt['run_dir']}", "objective.name=dpo", "method.name=lora",
                                 "run_name=on-prompt", *common]), echo=lambda *_: None)
    assert not (Path(prompt["run_dir"]) / "merged").exists()


def test_prompts_are_kept_once_per_split_and_left_padded(tmp_path) -> None:
    from deltatune.config.schema import DataConfig, SplitConfig
    from deltatune.tasks import build_datasets
    from tests.tiny_models import tiny_chat_llama_processor

    rows = [{"prompt": f"Review film {i % 4}.", "other": i} for i in range(40)]
    data = build_datasets(DataConfig(name=str(write_jsonl(tmp_path / "p.jsonl", rows)),
                                     split=SplitConfig(validation=0.25, test=0.25)), "prompts",
                          tiny_chat_llama_processor())
    for examples in (data.train, data.validation, data.test):
        texts = [example["prompt"] for example in examples]
        assert len(texts) == len(set(texts)) and texts
    batch = data.collate(data.train[:2] + [{"input_ids": [7], "prompt": "x"}])
    assert batch["attention_mask"][-1].tolist()[-1] == 1 and batch["attention_mask"][-1].tolist()[0] == 0
    assert batch["prompt"][-1] == "x"


def test_rollouts_sample_from_softmax_alone_whatever_the_checkpoint_generation_config_says() -> None:
    """A checkpoint's generation_config.json (repetition_penalty, no_repeat_ngram_size) must not shape PPO's samples:
    the ratios and KL assume softmax(logits / T)."""
    import types

    from transformers import GPT2Config, GPT2LMHeadModel

    from deltatune.objectives.rollouts import generate_responses

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=8, n_positions=64,
                                       bos_token_id=0, eos_token_id=7)).eval()
    tokenizer = types.SimpleNamespace(eos_token_id=7, pad_token_id=7, decode=lambda ids, **_: str(ids.tolist()))
    options = types.SimpleNamespace(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0)
    batch = {"input_ids": torch.tensor([[1, 2]] * 32), "attention_mask": torch.ones(32, 2, dtype=torch.long)}

    def sampled() -> torch.Tensor:
        torch.manual_seed(1)
        return generate_responses(model, batch, tokenizer, options).inputs["input_ids"]

    plain = sampled()
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1e4, 1
    assert torch.equal(sampled(), plain)


def test_disable_dropout_also_turns_off_the_dropout_on_lora_inputs() -> None:
    """LoRA's dropout is functional, not an nn.Dropout: a policy compared with its reference (DPO, PPO) must compute
    the same log-probabilities twice in train mode."""
    import deltatune
    from deltatune.objectives.base import disable_dropout
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    deltatune.apply(model, {"name": "lora", "r": 4, "lora_dropout": 0.5})
    with torch.no_grad():  # B starts at zero, which would hide any dropout on the LoRA branch
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.train()
    ids = torch.randint(0, 50, (2, 6))
    disable_dropout(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    layer = next(module for module in model.modules() if hasattr(type(module), "disable_dropout"))
    assert layer.settings["default"].lora_dropout == 0.5  # what a saved adapter says it was configured with


def test_dpo_from_an_init_from_run_takes_that_start_as_its_reference(tmp_path) -> None:
    """The policy starts with the SFT run's adapters: the reference is that start, so the first DPO loss is ln 2
    (policy = reference), not a comparison with the model before SFT."""
    rows = [{"prompt": f"Review film {i % 6}.", "response": "a fine film", "chosen": "great moving film",
             "rejected": "dull " * (1 + i % 3)} for i in range(24)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = ["model.name=tests.tiny_models:tiny_llama", "method.name=lora", f"data.name={data}", "train.batch_size=4",
              "train.progress=false", "train.num_threads=1", "train.log_every=1", f"output_dir={tmp_path / 'runs'}"]
    sft = train(load_config(None, [*common, "model.task=causal-lm", "run_name=sft", "train.max_steps=3",
                                   "train.lr=5e-2"]), echo=lambda *_: None)
    dpo = train(load_config(None, [*common, "objective.name=dpo", "run_name=dpo", "train.max_steps=1",
                                   f"model.init_from={sft['run_dir']}"]), echo=lambda *_: None)
    first = next(json.loads(line) for line in open(Path(dpo["run_dir"]) / "metrics.jsonl") if '"train"' in line)
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-5)
    with pytest.raises(UserError, match=r"policy-disabled switches the adapters off, which leaves the model before "
                                        r"model\.init_from"):
        train(load_config(None, [*common, "objective.name=dpo", "run_name=dpo2", "train.max_steps=1",
                                 f"model.init_from={sft['run_dir']}", "objective.reference_model=policy-disabled"]),
              echo=lambda *_: None)


def test_ppo_values_stay_float32_under_bf16_autocast() -> None:
    from deltatune.objectives.ppo import ProximalPolicyOptimisation

    objective = ProximalPolicyOptimisation()
    objective.value_head = torch.nn.Linear(8, 1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        values = objective._values(torch.randn(2, 5, 8))
    assert values.dtype == torch.float32 and values.shape == (2, 4)
