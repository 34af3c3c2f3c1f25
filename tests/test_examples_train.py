"""Every example config trains end to end on the real embedded models and data (slow): two optimizer steps on a few
dozen rows each, the RLHF and distillation chains included (each later stage reads the earlier runs). Tiny random
models pass checks that real ones fail: a packing probe that took SmolLM2's rounding for a leak refused every packed
SmolLM2 example while the suite stayed green. This file is the net for that kind of break."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import deltatune

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUICK = ["train.max_steps=2", "train.eval_every=2", "train.log_every=1"]
# What one example needs beyond QUICK to run in seconds; keyed by the path under examples/.
SMALLER = {
    "dual_encoder_mnist.yaml": ["data.max_examples=60"],
    "efficientnet_mnist.yaml": ["data.max_examples=60"],
    "efficientnet_mnist_lora.yaml": ["data.max_examples=60"],
    "meta_learning_chatterbot.yaml": ["objective.validation_episodes=2"],
    "meta_learning_mnist.yaml": ["objective.validation_episodes=2", "data.max_examples=1000"],
    "minilm_rotten_tomatoes.yaml": ["data.max_examples=64"],
    "minilm_rotten_tomatoes_lora.yaml": ["data.max_examples=64"],
    "minilm_rotten_tomatoes_qlora.yaml": ["data.max_examples=64"],
    "self_training_rotten_tomatoes.yaml": ["data.max_examples=400", "objective.rounds=2",
                                           "objective.batches_per_round=1", "train.max_steps=4"],
    "smollm2_chatterbot_lora.yaml": ["data.max_examples=48"],
    "smollm2_chatterbot_sft.yaml": ["data.max_examples=48"],
}
CHAINED = {"rlhf/1_sft.yaml", "rlhf/2_reward.yaml", "rlhf/3_ppo.yaml", "rlhf/4_dpo.yaml",
           "distill/minilm_student.yaml", "distill/minilm_cross_fit.yaml"}


def example_configs() -> list[str]:
    """Every run config under examples/ (search spaces are not runs)."""
    return sorted(str(path.relative_to(EXAMPLES)) for path in EXAMPLES.rglob("*.yaml")
                  if path.parent.name != "search_spaces")


def train(example: str, root: Path, *overrides: str) -> dict:
    config = deltatune.load_config(str(EXAMPLES / example), [*QUICK, *overrides, f"output_dir={root}"])
    summary = deltatune.train(config)
    for split, metrics in summary["after"].items():
        assert all(math.isfinite(value) for value in metrics.values() if isinstance(value, float)), (split, metrics)
    return summary


def test_every_example_is_trained_here() -> None:
    assert set(example_configs()) == set(SMALLER) | CHAINED, "give a new example its overrides in SMALLER"


@pytest.mark.parametrize("example", sorted(SMALLER))
def test_the_example_trains_on_the_real_model(example: str, tmp_path: Path) -> None:
    summary = train(example, tmp_path, *SMALLER[example])
    assert Path(summary["run_dir"]).is_dir()


def test_the_rlhf_chain_trains_stage_by_stage(tmp_path: Path) -> None:
    """SFT → reward model → PPO and DPO from the SFT run, against the reward run (the README's four commands)."""
    sft = train("rlhf/1_sft.yaml", tmp_path, "data.max_examples=48")["run_dir"]
    reward = train("rlhf/2_reward.yaml", tmp_path, "data.max_examples=64")["run_dir"]
    train("rlhf/3_ppo.yaml", tmp_path, f"model.name={sft}", f"objective.reward_model={reward}",
          "data.max_examples=64", "objective.rollout_size=8", "objective.max_new_tokens=8", "objective.ppo_epochs=1")
    train("rlhf/4_dpo.yaml", tmp_path, f"model.name={sft}", "data.max_examples=64")


def test_the_distillation_chain_trains_a_student_from_teacher_runs(tmp_path: Path) -> None:
    """The teacher and fold runs of minilm_cross_fit.yaml's header, then both students."""
    teacher_recipe = ["method.name=full", "data.max_examples=200"]
    teacher = train("minilm_rotten_tomatoes.yaml", tmp_path, *teacher_recipe, "run_name=teacher")["run_dir"]
    folds = [train("minilm_rotten_tomatoes.yaml", tmp_path, *teacher_recipe, "data.split.folds=5",
                   f"data.split.held_out_fold={fold}", f"run_name=fold{fold}")["run_dir"] for fold in range(5)]
    student = ["data.max_examples=200", f"objective.teacher_model={teacher}"]
    train("distill/minilm_student.yaml", tmp_path, *student)
    train("distill/minilm_cross_fit.yaml", tmp_path, *student, f"objective.teacher_folds=[{','.join(folds)}]")
