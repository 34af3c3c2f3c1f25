"""Objectives with their own config section and their own models (issue 12, item 1): the `objective:` section parses
strictly into the objective's dataclass, the old `train.objective` key is refused with the new spelling (and saved
runs that have it still load), `deltatune objectives` lists every objective, and a toy objective that declares a
reference and a teacher gets them loaded, frozen, and trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from deltatune import load_config, train
from deltatune.adapters import AdaptersDisabled
from deltatune.cli import main
from deltatune.config.constraints import between
from deltatune.config.loader import objective_config, parse_config
from deltatune.config.schema import ObjectiveConfig
from deltatune.errors import UserError
from deltatune.objectives import BASE, OBJECTIVES, ModelRole, Objective, build_objective
from deltatune.objectives.base import model_logits
from deltatune.runs import evaluate_run, open_run
from deltatune.tasks import get_task
from tests.bad_input import write_jsonl


@dataclass
class ToyTeacherConfig(ObjectiveConfig):
    weight: float = field(default=0.5, metadata=between(0, 1))  # how much the teacher's logits pull
    reference_model: str | None = None
    teacher_model: str | None = None


class ToyTeacher(Objective):
    """Cross-entropy plus `weight` times the squared distance to a teacher's logits; keeps a reference."""

    config_class = ToyTeacherConfig
    models = {"reference": ModelRole(default=BASE), "teacher": ModelRole(task="classification", num_labels=2)}
    main_metric, greater_is_better, metrics = "accuracy", True, ("loss", "accuracy")
    seen: list[ToyTeacher] = []  # every instance set up, for the tests to inspect

    def setup(self, models: dict[str, nn.Module], policy_model: nn.Module, method: object) -> None:
        self.reference, self.teacher, self.policy = models["reference"], models["teacher"], policy_model
        ToyTeacher.seen.append(self)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model_logits(model, batch)
        with torch.no_grad():
            teacher = model_logits(self.teacher, batch)
        pull = (logits.float() - teacher.float()).pow(2).mean()
        return F.cross_entropy(logits.float(), batch["labels"]) + self.config.weight * pull, {"pull": float(pull.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        correct = count = 0
        loss = 0.0
        for batch in batches:
            logits = model_logits(model, batch)
            loss += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
        return {"loss": loss / count, "accuracy": correct / count} if count else {}


@pytest.fixture(scope="module", autouse=True)
def toy_teacher() -> Iterator[type[ToyTeacher]]:
    """Registered only while this module runs, so the other tests (which list every objective) never see it."""
    OBJECTIVES.register("toy_teacher")(ToyTeacher)
    try:
        yield ToyTeacher
    finally:
        OBJECTIVES._entries.pop("toy_teacher", None)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reviews")
    return write_jsonl(root / "reviews.jsonl", [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": i % 2}
                                                for i in range(40)])


def run_overrides(root: Path, name: str, reviews: Path, *extra: str) -> list[str]:
    return [f"output_dir={root}", f"run_name={name}", "train.progress=false", "train.num_threads=1",
            "model.name=tests.tiny_models:tiny_bert", "model.task=classification", f"data.name={reviews}",
            "train.max_steps=3", "train.lr=1e-2", *extra]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, reviews) -> Path:
    root = tmp_path_factory.mktemp("runs")
    config = load_config(None, run_overrides(root, "teacher", reviews, "method.name=lora", "method.r=4"))
    return Path(train(config)["run_dir"])


# --- strict parsing ---------------------------------------------------------------------------------------------

def test_the_objective_section_parses_into_the_objectives_own_dataclass() -> None:
    config = parse_config({"objective": {"name": "toy_teacher", "weight": 0.25}})
    assert type(config.objective) is ToyTeacherConfig and config.objective.weight == 0.25
    assert load_config(None, ["objective.name=toy_teacher", "objective.weight=0.75"]).objective.weight == 0.75
    assert objective_config({"name": "sft"}).name == "sft"
    # "auto" is the bare section; the objective it resolves to is built with its own defaults.
    assert type(parse_config({}).objective) is ObjectiveConfig
    built = build_objective(parse_config({}).objective, get_task("classification")())
    assert built.name == "classification" and type(built.config) is type(built).config_class


@pytest.mark.parametrize("raw, message", [
    ({"name": "toy_teacher", "wieght": 0.1},
     r"^unknown key 'wieght' in objective \(did you mean 'weight'\?\); valid keys: name, weight, reference_model, "
     r"teacher_model$"),
    ({"name": "sft", "beta": 0.1}, r"^unknown key 'beta' in objective .*valid keys: name, chunked_loss, "
     r"loss_chunk_size$"),
    ({"name": "toy_teacher", "weight": 2}, r"^objective\.weight .*2"),
    ({"name": "toy_teacher", "weight": "much"}, r"^objective\.weight must be a number"),
    ({"beta": 0.1}, r"^objective\.beta needs a named objective: objective\.name is 'auto'"),
    ({"name": "dop"}, r"^unknown objective\.name 'dop' \(did you mean 'dpo'\?\); valid: classification, contrastive, distill, dpo, "
                      r"meta_learning, ppo, reward, self_training, sft, toy_teacher$"),
])
def test_bad_objective_options_are_one_line_errors(raw, message) -> None:
    with pytest.raises(UserError, match=message) as error:
        parse_config({"objective": raw})
    assert "\n" not in str(error.value)


def test_the_old_train_objective_key_names_the_new_spelling() -> None:
    with pytest.raises(UserError, match=r"^train\.objective is no longer a key; write objective: \{name: sft\} "
                                        r"\(on the command line objective\.name=sft\)$"):
        load_config(None, ["train.objective=sft"])


def test_a_role_without_its_config_field_is_refused_where_the_class_is_written() -> None:
    with pytest.raises(TypeError, match="reward_model"):
        type("NoField", (Objective,), {"models": {"reward": ModelRole()}})


def test_deltatune_objectives_lists_every_objective_with_its_options_and_models(capsys) -> None:
    assert main(["objectives"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(OBJECTIVES.all())
    assert "options: none" in lines["classification"] and "lower is better" in lines["sft"]
    assert "chunked_loss=None" in lines["sft"]
    toy = lines["toy_teacher"]
    assert "weight=0.5" in toy and "higher is better" in toy
    assert "reference (objective.reference_model, default base)" in toy
    assert "teacher (objective.teacher_model, default required)" in toy


# --- extra models by role ---------------------------------------------------------------------------------------

def test_a_toy_objective_gets_its_reference_and_a_run_directory_teacher_and_trains(tmp_path, reviews, teacher_run):
    ToyTeacher.seen.clear()
    summary = train(load_config(None, run_overrides(
        tmp_path, "toy", reviews, "method.name=lora", "method.r=4", "objective.name=toy_teacher",
        f"objective.teacher_model={teacher_run}")))
    assert summary["steps"] == 3
    objective = ToyTeacher.seen[-1]
    assert isinstance(objective.reference, AdaptersDisabled)  # lora can switch itself off: no second copy
    assert not any(p.requires_grad for p in objective.teacher.parameters()) and not objective.teacher.training
    assert any(p.requires_grad for p in objective.policy.parameters())  # freezing the view left the policy alone
    # The teacher is the run directory's trained model.
    inputs = {"input_ids": torch.tensor([[2, 5, 7, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    from deltatune.runs import load_run
    expected = model_logits(load_run(teacher_run).model, inputs)
    assert torch.allclose(model_logits(objective.teacher, inputs), expected, atol=1e-6)
    # The reference is the untrained base: equal to a separately loaded frozen copy (method full, reference: base).
    ToyTeacher.seen.clear()
    train(load_config(None, run_overrides(
        tmp_path, "copy", reviews, "method.name=full", "objective.name=toy_teacher", "train.max_steps=1",
        "objective.teacher_model=tests.tiny_models:tiny_bert")))
    copy = ToyTeacher.seen[-1].reference
    assert not isinstance(copy, AdaptersDisabled) and not any(p.requires_grad for p in copy.parameters())
    policy_after = model_logits(objective.policy.eval(), inputs)
    assert not torch.allclose(policy_after, model_logits(objective.reference, inputs))  # lora did train
    assert torch.allclose(model_logits(objective.reference, inputs), model_logits(copy, inputs), atol=1e-5)


def test_a_method_that_cannot_switch_itself_off_is_refused_before_the_run_is_written(tmp_path, reviews):
    overrides = run_overrides(tmp_path, "full", reviews, "method.name=full", "objective.name=toy_teacher",
                              "objective.reference_model=policy-disabled",
                              "objective.teacher_model=tests.tiny_models:tiny_bert")
    with pytest.raises(UserError, match=r"^objective\.reference_model=policy-disabled needs a method that can switch "
                                        r"itself off, but 'full'"):
        train(load_config(None, overrides))
    assert not (tmp_path / "full").exists()


def test_a_required_model_left_unset_is_a_one_line_error(tmp_path, reviews):
    with pytest.raises(UserError, match=r"^objective 'toy_teacher' needs a teacher model; set "
                                        r"objective\.teacher_model to a run directory"):
        train(load_config(None, run_overrides(tmp_path, "none", reviews, "objective.name=toy_teacher")))
    assert not (tmp_path / "none").exists()


# --- saved runs -------------------------------------------------------------------------------------------------

def test_runs_saved_with_train_objective_still_load(tmp_path, teacher_run) -> None:
    old = tmp_path / "old-run"
    old.mkdir()
    for name in ("splits.json", "weights"):
        (old / name).symlink_to(teacher_run / name)
    saved = yaml.safe_load((teacher_run / "config.yaml").read_text())
    saved["train"]["objective"] = saved.pop("objective")["name"]
    (old / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert open_run(old).config.objective.name == "auto"
    assert evaluate_run(old, echo=lambda *_: None) == evaluate_run(teacher_run, echo=lambda *_: None)


def test_the_saved_config_spells_out_the_objective_section(teacher_run) -> None:
    assert yaml.safe_load((teacher_run / "config.yaml").read_text())["objective"] == {"name": "auto"}
    assert "objective" not in yaml.safe_load((teacher_run / "config.yaml").read_text())["train"]



def test_the_loop_asks_the_objective_which_way_a_metric_improves() -> None:
    class LowerMain(ToyTeacher):
        main_metric, greater_is_better, metrics = "distance", False, ("distance", "accuracy")

    assert LowerMain().higher_is_better("distance") is False  # its own direction, though not a loss
    assert LowerMain().higher_is_better("accuracy") is True
    assert ToyTeacher().higher_is_better("accuracy") is True and ToyTeacher().higher_is_better("loss") is False


def test_the_disabled_reference_gives_back_each_modules_own_mode() -> None:
    from deltatune.models import ImageClassifier
    from deltatune.training.loop import set_train_mode
    from tests.tiny_models import tiny_cnn

    model = ImageClassifier(tiny_cnn(num_labels=3))
    from deltatune import apply

    apply(model, {"name": "lora", "target_modules": r".*stages\.\d\.0"})
    set_train_mode(model)  # frozen BatchNorms stay in eval mode while the rest trains
    modes = {name: module.training for name, module in model.named_modules()}
    assert any(modes.values()) and not all(modes.values())
    AdaptersDisabled(model)(pixel_values=torch.randn(2, 3, 32, 32))
    assert {name: module.training for name, module in model.named_modules()} == modes
