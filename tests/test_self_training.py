"""Self-training and unlabelled rows (issue 13) on tiny data: which rows are unlabelled and where they go, how
pseudo-labels are chosen and weighted, and the bad-input cases. Learning and bit-identical resume inside a round
are checked by the objective contract suite (tests/test_objective_contracts.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltatune.config.schema import DataConfig, SplitConfig
from deltatune.data.unlabelled import HIDDEN_LABEL, UNLABELLED
from deltatune.objectives.self_training import EXAMPLE_INDEX, SelfTraining, SelfTrainingConfig
from deltatune.tasks import build_datasets
from tests.bad_input import TINY_BERT, assert_refused, config_file, make_workspace, write_jsonl
from tests.tiny_models import tiny_bert_processor


def rows(count: int, blank_every: int = 0) -> list[dict]:
    return [{"text": f"row {i}", "label": "" if blank_every and i % blank_every == 0 else f"class{i % 3}"}
            for i in range(count)]


def bundle(tmp_path, data_rows: list[dict], **settings):
    path = write_jsonl(tmp_path / "data.jsonl", data_rows)
    config = DataConfig(name=str(path), split=SplitConfig(validation=0.2, test=0.2), **settings)
    return build_datasets(config, "classification", tiny_bert_processor(), reads_unlabelled=True)


def test_empty_labels_are_unlabelled_training_rows_and_never_scored(tmp_path) -> None:
    data = bundle(tmp_path, rows(60, blank_every=4))
    assert all(example["labels"] != UNLABELLED for example in data.validation + data.test)
    assert sum(example["labels"] == UNLABELLED for example in data.train) == 15  # every blank row trains
    assert data.num_labels == 3 and data.label_names == ["class0", "class1", "class2"]


def test_an_unlabelled_source_joins_the_train_split_only(tmp_path) -> None:
    write_jsonl(tmp_path / "more.jsonl", [{"text": f"extra {i}"} for i in range(7)])
    data = bundle(tmp_path, rows(30), unlabelled=str(tmp_path / "more.jsonl"))
    assert sum(example["labels"] == UNLABELLED for example in data.train) == 7
    assert len(data.validation) + len(data.test) == 12  # the 30 labelled rows split as before


def test_labelled_fraction_keeps_a_seeded_stratified_share_and_remembers_the_hidden_labels(tmp_path) -> None:
    first = bundle(tmp_path, rows(300), labelled_fraction=0.1)
    kept = [example["labels"] for example in first.train if example["labels"] != UNLABELLED]
    per_class = {label: sum(1 for example in first.train if example.get(HIDDEN_LABEL, example["labels"]) == label)
                 for label in range(3)}
    assert sorted(kept) == sorted(label for label, count in per_class.items() for _ in range(round(count / 10)))
    hidden = [example for example in first.train if example["labels"] == UNLABELLED]
    assert all(HIDDEN_LABEL in example for example in hidden)
    assert all(example["labels"] != UNLABELLED for example in first.validation + first.test)
    again = bundle(tmp_path, rows(300), labelled_fraction=0.1)
    assert [example["labels"] for example in again.train] == [example["labels"] for example in first.train]


def objective_with(train: list[dict], **options) -> SelfTraining:
    objective = SelfTraining(SelfTrainingConfig(name="self_training", **options))
    objective.precompute({"train": train}, None, 8)
    return objective


def test_pseudo_labels_keep_the_confident_and_at_most_per_class_of_each_class() -> None:
    train = [{"labels": 0}, {"labels": 1}] + [{"labels": UNLABELLED, HIDDEN_LABEL: label} for label in (0, 0, 0, 1)]
    # Unlabelled rows 2..5 get these logits: confident 0, confident 0, unsure, confident 1.
    logits = torch.tensor([[4.0, 0.0], [3.0, 0.0], [0.1, 0.0], [0.0, 5.0]])
    model = lambda **batch: logits[batch["rows"]]  # noqa: E731 - a stand-in classifier
    batches_of = lambda indices: {"rows": torch.tensor(indices) - 2, "labels": torch.zeros(len(indices))}  # noqa
    objective = objective_with(train, confidence=0.9)
    stats = objective.start_epoch(1, model, batches_of, 2)
    assert objective.pseudo_labels.tolist() == [UNLABELLED, UNLABELLED, 0, 0, UNLABELLED, 1]
    assert stats["pseudo_labels"] == 3 and stats["pseudo_accuracy"] == 1.0
    assert objective.epoch_examples() == [0, 1, 2, 3, 5]
    balanced = objective_with(train, confidence=0.5, per_class=1)
    balanced.start_epoch(1, model, batches_of, 4)
    assert balanced.pseudo_labels.tolist() == [UNLABELLED, UNLABELLED, 0, UNLABELLED, UNLABELLED, 1]


def test_the_loss_weights_pseudo_labels_and_skips_rows_without_any() -> None:
    train = [{"labels": 1}, {"labels": UNLABELLED}, {"labels": UNLABELLED}]
    objective = objective_with(train, pseudo_weight=0.5)
    objective.pseudo_labels = torch.tensor([UNLABELLED, 0, UNLABELLED])  # row 1 has a pseudo-label, row 2 none
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [5.0, -5.0]])
    batch = {"x": torch.arange(3), "labels": torch.tensor([1, UNLABELLED, UNLABELLED]),
             EXAMPLE_INDEX: torch.tensor([0, 1, 2])}
    loss, _ = objective.loss(lambda **inputs: logits[inputs["x"]], batch)
    labelled = -math.log(math.exp(1) / (1 + math.exp(1)))
    pseudo = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(loss) == pytest.approx((labelled + 0.5 * pseudo) / 1.5, abs=1e-6)


def test_input_noise_reaches_the_training_pass_and_not_the_weak_view() -> None:
    torch.manual_seed(0)
    train = [{"labels": 1}, {"labels": UNLABELLED}]
    objective = objective_with(train, input_noise=0.5, consistency_weight=1.0, p_cutoff=0.5)
    seen: list[torch.Tensor] = []

    def model(**inputs):
        seen.append(inputs["attention_mask"].clone())
        return torch.zeros(len(inputs["attention_mask"]), 2, requires_grad=True)

    batch = {"attention_mask": torch.ones(2, 50, dtype=torch.long), "labels": torch.tensor([1, UNLABELLED]),
             EXAMPLE_INDEX: torch.tensor([0, 1])}
    objective.loss(model, batch)
    training_pass, weak_view = seen
    assert 30 < int(training_pass.sum()) < 70  # about half of the 96 inner tokens hidden
    assert bool((weak_view == 1).all()) and bool((batch["attention_mask"] == 1).all())


RUN = TINY_BERT + "train: {max_steps: 2, batch_size: 4, progress: false, num_threads: 1}\n"

CASES = {
    "confidence of 0": (["objective.name=self_training", "objective.confidence=0", "data.name=good.jsonl"],
                        r"objective\.confidence .*\(0, 1\]"),
    "confidence above 1": (["objective.name=self_training", "objective.confidence=1.5", "data.name=good.jsonl"],
                           r"objective\.confidence .*\(0, 1\]"),
    "labelled fraction that leaves a class without labels": (
        ["objective.name=self_training", "data.name=good.jsonl", "data.labelled_fraction=0.01"],
        r"keeps no label of class .*; raise it to at least"),
    "no unlabelled rows": (["objective.name=self_training", "data.name=good.jsonl"],
                           r"the train split has none; leave some labels empty, add data\.unlabelled"),
    "hidden labels under plain classification": (["data.name=good.jsonl", "data.labelled_fraction=0.5"],
                                                 r"set objective\.name=self_training"),
    "empty labels under plain classification": (["data.name=blank.jsonl"],
                                                r"has no value in column 'label'.*objective\.name=self_training"),
    "self-training a language model": (["objective.name=self_training", "model.name=tests.tiny_models:tiny_llama",
                                        "model.task=causal-lm", "data.name=sft.jsonl"],
                                       r"pseudo-labels classes, and task 'causal-lm' has none"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_self_training_mistakes(case, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    make_workspace(tmp_path)
    write_jsonl(tmp_path / "blank.jsonl", rows(20, blank_every=5))
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}] * 10)
    config_file(tmp_path, RUN)
    overrides, message = CASES[case]
    assert_refused(["train", "config.yaml", *overrides], message, capsys, tmp_path)


def test_rounds_are_logged(tmp_path) -> None:
    from deltatune.config.loader import load_config
    from deltatune.runner import train

    data = write_jsonl(tmp_path / "data.jsonl", [{"text": f"{'good' if i % 2 else 'bad'} {i}", "label": i % 2}
                                                  for i in range(60)])
    config = load_config(None, ["model.name=tests.tiny_models:tiny_bert", "model.task=classification",
                                "objective.name=self_training", f"data.name={data}", "data.labelled_fraction=0.5",
                                "objective.rounds=2", "objective.batches_per_round=2", "objective.confidence=0.5",
                                "objective.patience=2", "train.batch_size=8", "train.progress=false",
                                "train.num_threads=1", f"output_dir={tmp_path / 'runs'}", "run_name=st"])
    train(config, echo=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "runs" / "st" / "metrics.jsonl").read_text().splitlines()]
    rounds = [record for record in records if record["type"] == "round"]
    assert [record["round"] for record in rounds] == [0, 1]
    assert rounds[1]["pseudo_labels"] > 0 and 0 <= rounds[1]["pseudo_accuracy"] <= 1
    assert len([record for record in records if record["type"] == "eval"]) == 2  # one evaluation per round


def test_restart_starts_every_round_from_the_weights_training_started_with() -> None:
    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.norm = torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.norm(x))

    model = Classifier()
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    objective = SelfTraining(SelfTrainingConfig(name="self_training", restart=True, confidence=0.5))
    objective.setup({}, model, None)
    objective.precompute({"train": [{"labels": 0}, {"labels": UNLABELLED}]}, None, 2)
    with torch.no_grad():  # what round 0's training did: new weights and BatchNorm statistics
        model.linear.weight.add_(1.0)
        model.norm.running_mean.add_(3.0)
    model.eval()
    stats = objective.start_epoch(1, model, lambda rows: {"x": torch.ones(len(rows), 3), "labels": torch.zeros(1)}, 2)
    assert stats["pseudo_labels"] == 1  # pseudo-labels come from the trained model, before the restart
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, start[name]), name
