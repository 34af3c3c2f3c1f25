"""Meta-learning's evaluation scores the split it is handed (validation or test), as the runner's
`metrics_on_splits` hands it; and training refuses at its start a meta-test pool `meta-eval` would refuse."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deltatune.config.schema import TrainConfig
from deltatune.data.text import ClassificationCollator
from deltatune.errors import UserError
from deltatune.objectives.meta_learning import MetaLearning, MetaLearningConfig
from deltatune.preparation import metrics_on_splits
from tests.helpers import seeded
from tests.tiny_models import tiny_bert


def token_rows(classes: int, per_class: int, seed: int) -> list[dict]:
    """Examples of random tokens whose lengths vary, so the loop batches them in length order, not row order."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(classes * per_class):
        length = 3 + index % 5
        ids = torch.randint(5, 100, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": index % classes})
    return rows


def splits_and_objective(test_seed: int) -> tuple[dict[str, list[dict]], MetaLearning]:
    splits = {"train": token_rows(6, 8, 0), "validation": token_rows(6, 3, 1), "test": token_rows(6, 3, test_seed)}
    objective = MetaLearning(MetaLearningConfig(ways=2, shots=1, queries=1, meta_test_count=2, inner_steps=2,
                                                inner_lr=0.5, validation_episodes=4))
    objective.attach_examples(splits, ClassificationCollator(0))
    return splits, objective


@pytest.mark.parametrize("test_seed", [2, 1])  # 1: the test rows are a copy of the validation rows
def test_each_split_is_scored_on_episodes_of_its_own_rows(monkeypatch, test_seed):
    splits, objective = splits_and_objective(test_seed)
    if test_seed == 1:  # same labels in the same order: only the rows' tokens tell the splits apart
        for row in splits["test"]:
            row["input_ids"] = [token + 1 for token in row["input_ids"]]
    used: list[str] = []
    original = MetaLearning.episode_batches

    def spy(self, examples, episode):
        used.append(next(name for name, rows in splits.items() if rows is examples))
        return original(self, examples, episode)

    monkeypatch.setattr(MetaLearning, "episode_batches", spy)
    data = SimpleNamespace(validation=splits["validation"], test=splits["test"], collate=ClassificationCollator(0))
    model = seeded(tiny_bert, 6)
    metrics = metrics_on_splits(model, objective, data, TrainConfig(eval_batch_size=4), torch.device("cpu"))
    assert used == ["validation"] * 4 + ["test"] * 4
    assert set(metrics["test"]) == {"episode_accuracy", "loss"}
    assert metrics["test"] != metrics["validation"]


def test_a_test_split_too_small_for_an_episode_has_no_metrics():
    splits, objective = splits_and_objective(2)
    objective.attach_examples({**splits, "test": splits["test"][:1]}, ClassificationCollator(0))
    data = SimpleNamespace(validation=splits["validation"], test=splits["test"][:1], collate=ClassificationCollator(0))
    metrics = metrics_on_splits(seeded(tiny_bert, 6), objective, data, TrainConfig(), torch.device("cpu"))
    assert metrics["test"] == {} and "episode_accuracy" in metrics["validation"]


def test_meta_training_refuses_a_meta_test_pool_too_small_for_an_episode():
    rows = [{"labels": index % 12} for index in range(12 * 10)]
    objective = MetaLearning(MetaLearningConfig(ways=10, shots=1, queries=1, meta_test_count=2))
    with pytest.raises(UserError, match=r"10-way episodes need 10 classes but the meta-test pool has 2"):
        objective.precompute({"train": rows, "validation": [], "test": []}, lambda chosen: chosen, 4)


def test_meta_training_refuses_meta_test_tasks_too_small_for_an_episode():
    # tasks a and b have 3 classes each; the meta-test task c has one class, so no 2-way episode
    rows = [{"labels": label, "task": task} for task in "ab" for label in range(3) for _ in range(4)]
    rows += [{"labels": 0, "task": "c"} for _ in range(4)]
    objective = MetaLearning(MetaLearningConfig(ways=2, shots=1, queries=1, meta_test_tasks=["c"]))
    with pytest.raises(UserError, match=r"no meta-test task has 2 classes with 1 \+ 1 rows each"):
        objective.precompute({"train": rows, "validation": [], "test": []}, lambda chosen: chosen, 4)


def test_meta_eval_starts_the_pretrained_side_from_the_init_from_run(tmp_path, monkeypatch):
    import yaml

    from deltatune.cli import main
    from deltatune.runs import load_run
    from tests.bad_input import write_jsonl

    rows = [{"text": f"topic{label} word{k} item {k}", "label": label} for label in range(6) for k in range(10)]
    write_jsonl(tmp_path / "topics.jsonl", rows)
    config = {"model": {"name": "tests.tiny_models:tiny_bert", "task": "classification", "num_labels": 6},
              "data": {"name": "topics.jsonl", "max_length": 12, "split": {"validation": 0.3, "test": 0.0}},
              "method": {"name": "lora", "r": 2},
              "objective": {"name": "meta_learning", "ways": 2, "shots": 1, "queries": 1, "inner_steps": 1,
                            "inner_lr": 0.5, "meta_test_classes": [4, 5], "validation_episodes": 2},
              "train": {"max_steps": 2, "batch_size": 1, "lr": 0.5, "optimizer": "sgd", "num_threads": 1,
                        "progress": False},
              "output_dir": "runs"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert main(["meta-train", "config.yaml", "run_name=first"]) == 0
    assert main(["meta-train", "config.yaml", "run_name=second", "model.init_from=runs/first"]) == 0
    starts: list[torch.nn.Module] = []
    original = MetaLearning.adapted
    monkeypatch.setattr(MetaLearning, "adapted", lambda self, model, support: starts.append(model) or
                        original(self, model, support))
    assert main(["meta-eval", "runs/second", "--episodes", "2"]) == 0
    pretrained = dict(starts[1].named_parameters())  # each episode adapts the meta-learned start, then this one
    first = load_run("runs/first").model
    trained = {name: param for name, param in first.named_parameters() if param.requires_grad}
    assert trained and all(torch.equal(pretrained[name].cpu(), param.cpu()) for name, param in trained.items())
