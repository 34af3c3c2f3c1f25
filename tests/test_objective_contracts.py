"""Contract tests generated from the objective registry (issue 12): every registered objective, on tiny random
models through the real runner, must
- improve its main metric on held-out data in a few steps (the loss for most; PPO's mean reward);
- resume from a checkpoint to bit-identical weights (PPO included, with the checkpoint taken inside a rollout);
and objectives with a reference must get the same log-probabilities from the adapter-disabled policy as from a
separate frozen copy of the base. A new objective fails `test_every_objective_has_a_case` until it gets a line in
CASES (its tiny model, data and options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune.runner import train
from deltatune.adapters import AdaptersDisabled
from deltatune.config.loader import load_config
from deltatune.objectives import BASE, available_objectives, get_objective
from deltatune.objectives.base import model_logits
from deltatune.objectives.losses import sequence_logprobs
from deltatune.preparation import prepare
from deltatune.runs import setup_objective
from deltatune.training.loop import TrainingLoop
from tests.bad_input import write_jsonl
from tests.helpers import perturb_trainable, token_batch

TINY_BERT, TINY_LLAMA = "tests.tiny_models:tiny_bert", "tests.tiny_models:tiny_llama"


def longer_responses(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward a tiny random policy can learn within a few steps: longer text (top-k sampling picks among a few
    word pieces of different lengths at each position)."""
    return [len(response) / 50 for response in responses]


def classification_rows(count: int = 48) -> list[dict]:
    return [{"text": f"{'good fine' if i % 2 else 'bad awful'} film {i % 7}", "label": i % 2} for i in range(count)]


def sft_rows() -> list[dict]:
    return [{"prompt": f"Name a colour {i % 5}.", "response": "blue and green" if i % 2 else "red"} for i in range(48)]


def pair_rows() -> list[dict]:
    return [{"prompt": f"Review film {i % 8}.", "chosen": "great moving film " * (1 + i % 2),
             "rejected": "dull boring " * (1 + i % 3)} for i in range(48)]


def topic_rows(classes: int = 6, per_class: int = 16) -> list[dict]:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return [{"text": f"{words[label]} {words[(label + k) % 8]} item {k}", "label": label}
            for label in range(classes) for k in range(per_class)]


def band_rows(count: int = 48) -> list[dict]:
    """16x16 images with a bright band at the top, middle or bottom (the label) over seeded noise."""
    noise = torch.randint(0, 60, (count, 16, 16), generator=torch.Generator().manual_seed(0))
    return [{"image": (noise[i] + 180 * (torch.arange(16)[:, None] // 6 == i % 3)).clamp(max=255).tolist(),
             "label": ["top", "middle", "bottom"][i % 3]} for i in range(count)]


def prompt_rows() -> list[dict]:
    return [{"prompt": f"Tell me about film {i}."} for i in range(60)]


@dataclass
class Case:
    model: str
    rows: list[dict]
    options: list[str] = field(default_factory=list)
    steps: int = 8
    crash_at: int = 3  # the resume contract interrupts the run after this step's checkpoint


CASES = {
    "classification": Case(TINY_BERT, classification_rows(), ["model.task=classification", "train.lr=1e-2"], steps=24),
    "sft": Case(TINY_LLAMA, sft_rows(), ["model.task=causal-lm", "train.lr=3e-3"]),
    "reward": Case(TINY_BERT, pair_rows(), ["train.lr=1e-2"]),
    "dpo": Case(TINY_LLAMA, pair_rows(), ["method.name=lora", "train.lr=1e-2"]),
    # 2 epochs x 2 mini-batches = 4 steps per rollout: step 3 is inside the first rollout.
    "ppo": Case(TINY_LLAMA, prompt_rows(), [
        "method.name=lora", "train.lr=3e-3", f"objective.reward_model={__name__}:longer_responses",
        "objective.rollout_size=16", "objective.ppo_epochs=2", "objective.max_new_tokens=8", "objective.top_k=5"],
        steps=24),
    # A one-block student of the tiny Llama, distilled from a two-block one; half the steps on-policy (the student
    # samples its own responses), so resuming must also restore the sampling and the on-policy coin flips.
    "distill": Case(TINY_LLAMA, sft_rows(), [
        "model.task=causal-lm", "model.student.keep_layers=[1]", f"objective.teacher_model={TINY_LLAMA}",
        "objective.lmbda=0.5", "objective.max_new_tokens=4", "objective.alpha_cos=0.5", "objective.input_noise=0.1",
        "train.lr=3e-3"]),
    # Half the labels hidden; 3 rounds of 8 micro-batches, the consistency term on: the crash at step 10 falls inside
    # round 1, after its pseudo-labels were chosen, which the resumed run must restore rather than choose again; the
    # input noise must be drawn again the same.
    "self_training": Case(TINY_BERT, classification_rows(96), [
        "model.task=classification", "data.labelled_fraction=0.5", "objective.rounds=3",
        "objective.batches_per_round=8", "objective.confidence=0.5", "objective.patience=3",
        "objective.consistency_weight=0.5", "objective.p_cutoff=0.5", "objective.input_noise=0.2", "train.lr=1e-2"],
        steps=24, crash_at=10),
    # 6 topics of 16 rows, 2 of them the meta-test pool; 2-way 2-shot episodes, 3 inner steps (Reptile).
    "meta_learning": Case(TINY_BERT, topic_rows(), [
        "model.task=classification", "data.split.validation=0.3", "objective.ways=2", "objective.shots=2",
        "objective.queries=1", "objective.meta_test_count=2", "objective.inner_steps=3", "objective.inner_lr=0.5",
        "objective.validation_episodes=6", "train.lr=1e-2"], steps=16, crash_at=5),
    # A dual encoder of the tiny CNN and the tiny BERT; captions made from the labels with two templates, drawn at
    # random per row and step, which the resumed run must draw again the same.
    "contrastive": Case("dual-encoder", band_rows(), [
        "model.image=tests.tiny_models:tiny_cnn", "model.text=tests.tiny_models:tiny_bert", "model.projection_dim=8",
        "data.columns={label: label}", "objective.templates=['a {label} band', 'the {label} picture']",
        "train.lr=3e-3"], steps=16, crash_at=5),
}
OBJECTIVES = sorted(available_objectives())


def run_config(tmp_path: Path, name: str, run_name: str, *extra: str):
    case = CASES[name]
    data = write_jsonl(tmp_path / f"{name}.jsonl", case.rows)
    return load_config(None, [f"model.name={case.model}", f"objective.name={name}", f"data.name={data}",
                              f"train.max_steps={case.steps}", "train.batch_size=8", "train.schedule=constant",
                              "train.warmup_steps=0", "train.log_every=1", "train.progress=false",
                              "train.num_threads=1", f"output_dir={tmp_path / 'runs'}", f"run_name={run_name}",
                              *case.options, *extra])


def test_every_objective_has_a_case() -> None:
    assert set(CASES) == set(OBJECTIVES), "add a tiny contract case for each new objective to CASES"


@pytest.mark.parametrize("name", OBJECTIVES)
def test_a_few_steps_improve_the_main_metric(tmp_path, name) -> None:
    summary = train(run_config(tmp_path, name, "run"), echo=lambda *_: None)
    objective = get_objective(name, None)()
    metric = "loss" if "loss" in objective.metrics else objective.main_metric  # accuracy saturates on tiny data
    before, after = summary["before"]["validation"][metric], summary["after"]["validation"][metric]
    assert (after > before) if objective.higher_is_better(metric) else (after < before), (metric, before, after)


class SimulatedCrash(Exception):
    pass


@pytest.mark.parametrize("name", OBJECTIVES)
def test_resume_gives_bit_identical_weights(tmp_path, monkeypatch, name) -> None:
    train(run_config(tmp_path, name, "reference", "train.save_every=1"), echo=lambda *_: None)
    real_after_step = TrainingLoop._after_step

    def crash(self: TrainingLoop, loss: float, stats: dict) -> None:
        real_after_step(self, loss, stats)
        if self.state.step == CASES[name].crash_at:
            raise SimulatedCrash

    monkeypatch.setattr(TrainingLoop, "_after_step", crash)
    with pytest.raises(SimulatedCrash):
        train(run_config(tmp_path, name, "victim", "train.save_every=1"), echo=lambda *_: None)
    monkeypatch.setattr(TrainingLoop, "_after_step", real_after_step)
    train(run_config(tmp_path, name, "victim", "train.save_every=1"), resume=True, echo=lambda *_: None)
    expected = load_file(tmp_path / "runs" / "reference" / "weights" / "model.safetensors")
    got = load_file(tmp_path / "runs" / "victim" / "weights" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


REFERENCE_OBJECTIVES = sorted(name for name, objective in available_objectives().items()
                              if any(role.default == BASE for role in objective.models.values()))


@pytest.mark.parametrize("name", REFERENCE_OBJECTIVES)
def test_adapter_disabled_reference_equals_a_frozen_copy_of_the_base(tmp_path, name) -> None:
    prepared = prepare(run_config(tmp_path, name, "lora", "method.name=lora"))
    given: dict[str, nn.Module] = {}
    prepared.objective.setup = lambda models, policy, method: given.update(models)  # keep what the runner hands over
    setup_objective(prepared.config, prepared.objective, prepared.model, prepared.method, prepared.device,
                    prepared.num_labels, prepared.processor)
    perturb_trainable(prepared.model, seed=0)  # the policy now differs from its base, as after training
    frozen_copy = prepare(run_config(tmp_path, name, "full", "method.name=full")).model.eval()
    ids = token_batch(3, 12)["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        expected = sequence_logprobs(model_logits(frozen_copy, batch), ids)
        policy = sequence_logprobs(model_logits(prepared.model.eval(), batch), ids)
        for role, spec in type(prepared.objective).models.items():
            if spec.default == BASE:
                assert isinstance(given[role], AdaptersDisabled)
                got = sequence_logprobs(model_logits(given[role], batch), ids)
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(policy, expected), "the perturbed policy should differ from its base"
