"""Distillation (issue 13) on tiny random models: students cut from a teacher's blocks, the teacher-logit cache, and
the bad-input cases (exit 2, one line naming the fix, earlier files unchanged). The losses are checked in
tests/test_distillation_losses.py; learning and bit-identical resume by the objective contract suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.config.loader import load_config
from deltatune.config.schema import ModelConfig, StudentConfig
from deltatune.models import load_model
from deltatune.runner import train
from tests.bad_input import assert_refused, config_file, make_workspace, write_jsonl
from tests.test_objective_contracts import sft_rows
from tests.tiny_models import task, tiny_bert, tiny_llama

TINY_LLAMA = "tests.tiny_models:tiny_llama"


def other_vocabulary_llama():
    """A teacher whose tokenizer would differ: 1,000 outputs instead of the MiniLM vocabulary's 30,522."""
    return tiny_llama(vocab_size=1000)


def wider_bert(num_labels: int = 2):
    """A teacher twice the student's width (64 against tiny_bert's 32), same vocabulary and labels."""
    return tiny_bert(num_labels=num_labels, hidden_size=64)


def three_label_bert(num_labels: int = 2):
    """A teacher trained for three classes, whatever the student's data has."""
    return tiny_bert(num_labels=3)


def student_of(keep: list[int] | None = None, every_other: bool = False, layers: int = 4):
    config = ModelConfig(name=f"{__name__}:four_block_llama", task="causal-lm",
                         student=StudentConfig(keep_layers=keep, every_other=every_other))
    return load_model(config, task("causal-lm"), None)


def four_block_llama():
    torch.manual_seed(0)
    return tiny_llama(num_hidden_layers=4)


def test_a_student_keeps_the_chosen_blocks_with_their_weights_and_saves_as_a_plain_model(tmp_path) -> None:
    teacher = four_block_llama()
    student = student_of([0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for new, old in ((0, 0), (1, 3)):
        for (name, value), (_, expected) in zip(student.model.layers[new].state_dict().items(),
                                                teacher.model.layers[old].state_dict().items()):
            assert torch.equal(value, expected), name
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = torch.randint(5, 1000, (2, 6))
    cached = student.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=True)
    uncached = student.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)  # the KV cache is indexed by the kept blocks' new positions
    student.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 2
    assert torch.allclose(reloaded(ids).logits, student(ids).logits, atol=1e-6)
    assert student_of(every_other=True).config.num_hidden_layers == 2


def distill_config(tmp_path: Path, run_name: str, *extra: str):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    return load_config(None, [f"model.name={TINY_LLAMA}", "model.task=causal-lm", "model.student.keep_layers=[1]",
                              "objective.name=distill", f"objective.teacher_model={TINY_LLAMA}", f"data.name={data}",
                              "train.max_steps=3", "train.batch_size=8", "train.lr=3e-3", "train.log_every=1",
                              "train.progress=false", "train.num_threads=1", f"output_dir={tmp_path / 'runs'}",
                              f"run_name={run_name}", *extra])


def first_loss(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_precomputed_teacher_logits_match_the_live_teacher_and_are_reused(tmp_path, monkeypatch) -> None:
    live = train(distill_config(tmp_path, "live"), echo=lambda *_: None)
    cached = train(distill_config(tmp_path, "cached", "objective.precompute_teacher=true"), echo=lambda *_: None)
    assert first_loss(tmp_path / "runs" / "cached") == pytest.approx(first_loss(tmp_path / "runs" / "live"), abs=1e-5)
    assert cached["after"]["validation"]["divergence"] == pytest.approx(live["after"]["validation"]["divergence"],
                                                                        abs=1e-5)
    caches = list((tmp_path / "runs" / "cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "index.json").is_file()
    from deltatune.objectives.teacher_cache import TeacherLogitCache

    monkeypatch.setattr(TeacherLogitCache, "write", lambda *_: pytest.fail("a complete cache was computed again"))
    train(distill_config(tmp_path, "again", "objective.precompute_teacher=true"), echo=lambda *_: None)
    assert first_loss(tmp_path / "runs" / "again") == first_loss(tmp_path / "runs" / "cached")


RUN = (f"model: {{name: '{TINY_LLAMA}', task: causal-lm}}\noutput_dir: runs\ndata: {{name: sft.jsonl}}\n"
       "train: {max_steps: 2, batch_size: 4, progress: false, num_threads: 1}\n")
BERT_RUN = ("model: {name: 'tests.tiny_models:tiny_bert', task: classification}\noutput_dir: runs\n"
            "data: {name: good.jsonl}\ntrain: {max_steps: 2, batch_size: 4, progress: false, num_threads: 1}\n")
DISTILL = ["objective.name=distill", f"objective.teacher_model={TINY_LLAMA}"]

CASES = {
    "teacher with another vocabulary": (
        RUN, ["objective.name=distill", f"objective.teacher_model={__name__}:other_vocabulary_llama"],
        r"has 1000 outputs but the student has 30522; a teacher must share the student's vocabulary"),
    "teacher with another label count": (
        BERT_RUN, ["objective.name=distill", f"objective.teacher_model={__name__}:three_label_bert"],
        r"has 3 outputs but the student has 2; .* label count"),
    "keep_layers out of range": (RUN, [*DISTILL, "model.student.keep_layers=[0,5]"],
                                 r"keep_layers has \[5\], outside this model's 2 blocks; use indices 0 to 1"),
    "keep_layers empty": (RUN, [*DISTILL, "model.student.keep_layers=[]"], r"keep_layers is empty; list the blocks"),
    "no teacher": (RUN, ["objective.name=distill"], r"needs a teacher model; set objective\.teacher_model"),
    "on-policy with a cached teacher": (RUN, [*DISTILL, "objective.lmbda=0.5", "objective.precompute_teacher=true"],
                                        r"need the live teacher; set one of them to 0"),
    "on-policy for a classifier": (BERT_RUN, ["objective.name=distill", "objective.teacher_model=tests.tiny_models"
                                              ":tiny_bert", "objective.lmbda=0.5"], r"set objective\.lmbda=0"),
    "layer map outside the blocks": (RUN, [*DISTILL, "objective.alpha_cos=1", "objective.layer_map={0: 7}"],
                                     r"teacher block 7, but .* teacher 2; map blocks"),
    "cosine to a wider teacher": (BERT_RUN, ["objective.name=distill", f"objective.teacher_model={__name__}:wider_bert",
                                             "objective.alpha_cos=1"],
                                  r"the student's are 32 wide and the teacher's 64; set objective\.alpha_cos=0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_distillation_mistakes(case, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    make_workspace(tmp_path)
    write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    text, overrides, message = CASES[case]
    config_file(tmp_path, text)
    assert_refused(["train", "config.yaml", *overrides], message, capsys, tmp_path)


def test_a_classifier_distils_from_soft_labels_and_rows_without_labels_count_in_the_soft_term(tmp_path) -> None:
    data = write_jsonl(tmp_path / "reviews.jsonl", [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": i % 2}
                                                     for i in range(40)])
    config = load_config(None, ["model.name=tests.tiny_models:tiny_bert", "model.task=classification",
                                "model.student.keep_layers=[0]", "objective.name=distill",
                                "objective.teacher_model=tests.tiny_models:tiny_bert", "data.labelled_fraction=0.5",
                                f"data.name={data}", "train.max_steps=2", "train.batch_size=8", "train.progress=false",
                                "train.num_threads=1", f"output_dir={tmp_path / 'runs'}", "run_name=student"])
    summary = train(config, echo=lambda *_: None)
    assert set(summary["after"]["validation"]) == {"loss", "accuracy", "divergence"}
    saved = json.loads((tmp_path / "runs" / "student" / "summary.json").read_text())
    assert saved["total_parameters"] < 999_138  # one block of the two-block tiny BERT is gone
    from transformers import AutoModelForSequenceClassification

    from deltatune.runs import load_run, write_plain_model

    write_plain_model(load_run(tmp_path / "runs" / "student", with_data=True), tmp_path / "exported")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported")
    assert exported.config.num_hidden_layers == 1 and len(exported.bert.encoder.layer) == 1


def test_input_noise_reaches_the_student_and_not_the_teacher() -> None:
    from deltatune.objectives.distill import DistillConfig, Distillation

    torch.manual_seed(0)
    objective = Distillation(DistillConfig(name="distill", input_noise=0.5))
    objective.labelled = True
    seen: dict[str, torch.Tensor] = {}

    def recorder(role: str, logits: torch.Tensor):
        def model(**inputs):
            seen[role] = inputs["attention_mask"].clone()
            return logits
        return model

    objective.teacher = recorder("teacher", torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    batch = {"input_ids": torch.ones(2, 50, dtype=torch.long), "attention_mask": torch.ones(2, 50, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    objective.loss(recorder("student", torch.zeros(2, 2, requires_grad=True)), batch)
    assert bool((seen["teacher"] == 1).all())
    assert 30 < int(seen["student"].sum()) < 70  # about half of the 96 inner tokens hidden


def test_an_on_policy_step_learns_the_teacher_s_view_of_the_student_s_samples_only() -> None:
    """GKD: on the student's own samples the loss is the divergence alone; cross-entropy on them would teach the
    student to repeat itself. Off-policy steps mix in the labels as α says."""
    from deltatune.objectives.distill import DistillConfig, Distillation

    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(1, 5, 7, requires_grad=True), torch.randn(1, 5, 7)
    sampled = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
               "labels": torch.tensor([[-100, -100, 3, 4, 5]])}
    losses = {}
    for lmbda in (1.0, 0.0):
        objective = Distillation(DistillConfig(name="distill", lmbda=lmbda, alpha=0.5))
        objective.teacher = lambda **inputs: teacher_logits
        objective._on_policy = lambda model, batch: sampled  # the student's rollout, without generating
        losses[lmbda] = objective.loss(lambda **inputs: student_logits, sampled)
    (on_policy, on_stats), (mixed, mixed_stats) = losses[1.0], losses[0.0]
    assert "hard" not in on_stats and float(on_policy.detach()) == pytest.approx(on_stats["soft"])
    assert float(mixed.detach()) == pytest.approx(0.5 * mixed_stats["soft"] + 0.5 * mixed_stats["hard"])
    assert mixed_stats["soft"] == pytest.approx(on_stats["soft"])


def test_divergence_and_kl_are_lower_is_better_for_best_checkpoints_and_early_stopping() -> None:
    from deltatune.objectives.distill import Distillation
    from deltatune.objectives.ppo import ProximalPolicyOptimisation

    assert not Distillation().higher_is_better("divergence") and Distillation().higher_is_better("accuracy")
    assert not ProximalPolicyOptimisation().higher_is_better("kl")
