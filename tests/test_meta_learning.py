"""Meta-learning's pieces (issue 16): the first-order inner adaptation, Reptile's and first-order MAML's outer
directions and the surrogate loss that hands them to the training loop, against values computed by hand on a
one-weight linear model; and N-way K-shot episodes over disjoint class pools."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from deltatune.data.episodes import Episode, check_disjoint, check_episode_shape, examples_by_class
from deltatune.data.episodes import sample_episode, split_classes
from deltatune.errors import UserError
from deltatune.objectives.losses.meta_learning import adapt, as_surrogate_loss, first_order_maml_direction
from deltatune.objectives.losses.meta_learning import mean_direction, reptile_direction


def squared_error(parameters, batch):
    """L(w) = (w·x − y)², one weight."""
    x, y = batch
    return (parameters["w"] * x - y) ** 2


def test_inner_adaptation_and_reptile_step_by_hand():
    start = {"w": torch.tensor(1.0)}
    # dL/dw = 2x(wx − y). Support (x=2, y=6), α = 0.1:
    #   w = 1:   2·2·(2 − 6)   = −16  → w = 1 + 1.6     = 2.6
    #   w = 2.6: 2·2·(5.2 − 6) = −3.2 → w = 2.6 + 0.32  = 2.92
    adapted = adapt(start, squared_error, [(2.0, 6.0), (2.0, 6.0)], inner_lr=0.1)
    assert adapted["w"].item() == pytest.approx(2.92)
    assert start["w"].item() == 1.0  # the meta-parameters are not touched
    direction = reptile_direction(start, adapted)
    assert direction["w"].item() == pytest.approx(1 - 2.92)
    # an outer SGD step of ε = 0.5 along θ − φ: θ + ε(φ − θ) = 1 + 0.5·1.92 = 1.96
    theta = nn.Parameter(torch.tensor(1.0))
    as_surrogate_loss({"w": theta}, direction).backward()
    torch.optim.SGD([theta], lr=0.5).step()
    assert theta.item() == pytest.approx(1.96)


def test_first_order_maml_direction_by_hand():
    adapted = adapt({"w": torch.tensor(1.0)}, squared_error, [(2.0, 6.0), (2.0, 6.0)], inner_lr=0.1)  # 2.92
    # query (x=1, y=2): dL/dw at 2.92 = 2·1·(2.92 − 2) = 1.84; the start's own gradient would be 2·(1 − 2) = −2
    direction = first_order_maml_direction(adapted, squared_error, (1.0, 2.0))
    assert direction["w"].item() == pytest.approx(1.84)
    both = mean_direction([direction, {"w": torch.tensor(0.16)}])
    assert both["w"].item() == pytest.approx(1.0)


def test_adaptation_of_a_module_equals_plain_sgd_on_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(3)]

    def loss_of(parameters, batch):
        inputs, labels = batch
        return nn.functional.cross_entropy(functional_call(model, parameters, (inputs,)), labels)

    start = dict(model.named_parameters())
    adapted = adapt(start, loss_of, batches, inner_lr=0.3)
    copied = copy.deepcopy(model)
    optimizer = torch.optim.SGD(copied.parameters(), lr=0.3)
    for inputs, labels in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(copied(inputs), labels).backward()
        optimizer.step()
    for name, value in copied.named_parameters():
        torch.testing.assert_close(adapted[name], value.detach(), rtol=0, atol=1e-6)
    assert all(torch.equal(start[name], param) for name, param in model.named_parameters())
    direction = reptile_direction(start, adapted)
    as_surrogate_loss(start, direction).backward()
    for name, param in model.named_parameters():  # the surrogate's gradient is the direction, exactly
        torch.testing.assert_close(param.grad, direction[name], rtol=0, atol=0)


def test_episodes_draw_ways_times_shots_from_their_pool_and_renumber_classes():
    labels = [index % 10 for index in range(200)]  # 20 examples of each of 10 classes
    train, test = split_classes(labels, 3, seed=0)
    assert len(test) == 3 and sorted(train + test) == list(range(10))
    by_class = examples_by_class(labels, train)
    generator = np.random.default_rng(1)
    seen_orders = set()
    for _ in range(20):
        episode = sample_episode(by_class, ways=5, shots=2, queries=3, generator=generator)
        assert set(episode.classes) <= set(train) and len(set(episode.classes)) == 5
        assert len(episode.support) == 10 and len(episode.query) == 15
        assert not set(episode.support) & set(episode.query)
        for index, episode_label in zip(episode.support + episode.query,
                                        episode.support_labels + episode.query_labels):
            assert labels[index] == episode.classes[episode_label]
        seen_orders.add(episode.classes)
    assert len(seen_orders) > 1


def test_wider_query_sets_take_what_each_class_has_beyond_its_shots():
    labels = [0] * 4 + [1] * 9 + [2] * 20
    by_class = examples_by_class(labels, [0, 1, 2])
    same = sample_episode(by_class, ways=3, shots=2, queries=2, generator=np.random.default_rng(5))
    assert same == sample_episode(by_class, ways=3, shots=2, queries=2, generator=np.random.default_rng(5))
    assert len(same.query) == 6  # every class has the run's K + Q: exactly Q each
    wide = sample_episode(by_class, ways=3, shots=2, queries=10, generator=np.random.default_rng(5))
    per_class = {label: wide.query_labels.count(wide.classes.index(label)) for label in (0, 1, 2)}
    assert per_class == {0: 2, 1: 7, 2: 10}  # all beyond the 2 shots where a class has fewer than 2 + 10
    assert len(wide.support) == 6 and not set(wide.support) & set(wide.query)
    for index, episode_label in zip(wide.query, wide.query_labels):
        assert labels[index] == wide.classes[episode_label]


def test_episode_mistakes_are_one_line_errors():
    labels = [0] * 5 + [1] * 9 + [2] * 9
    with pytest.raises(UserError, match=r"classes \[1\] are both meta-train and meta-test"):
        check_disjoint([0, 1], [1, 2])
    with pytest.raises(UserError, match=r"class 0 of the meta-train pool has 5 examples, fewer than shots \+ "
                                        r"queries = 5 \+ 1"):
        check_episode_shape(examples_by_class(labels, [0, 1]), ways=2, shots=5, queries=1, pool_name="meta-train")
    with pytest.raises(UserError, match=r"3-way episodes need 3 classes but the meta-test pool has 2"):
        check_episode_shape(examples_by_class(labels, [1, 2]), ways=3, shots=1, queries=1, pool_name="meta-test")
    with pytest.raises(UserError, match=r"meta-test classes \[7\] are not in the data"):
        split_classes(labels, [7], seed=0)
    with pytest.raises(UserError, match=r"leave at least one class on each side"):
        split_classes(labels, 3, seed=0)


def topic_rows(classes: int = 8, per_class: int = 14) -> list[dict]:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    return [{"text": f"{words[label]} {words[(label + k) % len(words)]} item {k}", "label": label}
            for label in range(classes) for k in range(per_class)]


def test_a_meta_learning_run_draws_episodes_from_meta_train_classes_only(tmp_path, monkeypatch, capsys):
    import json

    import yaml

    from deltatune.cli import main
    from deltatune.objectives import meta_learning
    from tests.bad_input import write_jsonl

    write_jsonl(tmp_path / "topics.jsonl", topic_rows())
    config = {"model": {"name": "tests.tiny_models:tiny_bert", "task": "classification", "num_labels": 8},
              "data": {"name": "topics.jsonl", "max_length": 12, "split": {"validation": 0.3, "test": 0.1, "seed": 0}},
              "method": {"name": "lora", "r": 2, "target_modules": ["query", "value"]},
              "objective": {"name": "meta_learning", "algorithm": "fomaml", "ways": 3, "shots": 1, "queries": 1,
                            "inner_steps": 2, "inner_lr": 0.1, "meta_test_classes": [5, 6, 7], "validation_episodes": 3},
              "train": {"max_steps": 4, "batch_size": 2, "eval_every": 2, "lr": 1e-3, "num_threads": 1,
                        "progress": False},
              "output_dir": "runs", "run_name": "meta"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    drawn: list[Episode] = []
    original = meta_learning.sample_episode
    monkeypatch.setattr(meta_learning, "sample_episode", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    monkeypatch.chdir(tmp_path)
    assert main(["meta-train", "config.yaml"]) == 0
    summary = json.loads((tmp_path / "runs" / "meta" / "summary.json").read_text())
    assert 0 <= summary["after"]["validation"]["episode_accuracy"] <= 1
    assert drawn and all(set(episode.classes) <= set(range(5)) for episode in drawn)  # never classes 5-7
    from safetensors.torch import load_file

    saved = tmp_path / "runs" / "meta" / "precomputed"  # the run records both pools
    assert load_file(saved / "meta_test_classes.safetensors")["values"].tolist() == [5, 6, 7]
    assert load_file(saved / "meta_train_classes.safetensors")["values"].tolist() == list(range(5))

    capsys.readouterr()
    assert main(["eval", "runs/meta"]) == 0  # the saved run's own validation episodes, as at the end of training
    assert f"episode_accuracy={summary['after']['validation']['episode_accuracy']:.4f}" in capsys.readouterr().out
    assert main(["meta-eval", "runs/meta", "--episodes", "6"]) == 0
    result = json.loads((tmp_path / "runs" / "meta" / "meta_eval.json").read_text())
    for start in ("meta-learned", "pretrained"):
        assert 0 <= result[start]["mean"] <= 1 and result[start]["ci95"] >= 0
    assert result["settings"]["meta_test_classes"] == [5, 6, 7]
    gain = result["meta-learned"]["mean"] - result["pretrained"]["mean"]
    assert abs(result["difference"]["mean"] - gain) < 1e-9 and result["difference"]["ci95"] >= 0  # paired episodes
    assert all(set(episode.classes) <= {5, 6, 7} for episode in drawn[-6:])  # meta-eval draws meta-test classes only
    assert main(["meta-eval", "runs/meta", "--episodes", "3", "--queries", "all"]) == 0
    assert json.loads((tmp_path / "runs" / "meta" / "meta_eval.json").read_text())["settings"]["queries"] == "all"
    # every meta-test class has 14 rows, so "all" leaves 13 queries beside each 1-shot support
    assert all(len(episode.query) == 3 * 13 for episode in drawn[-3:])
    from tests.bad_input import assert_refused

    assert_refused(["meta-eval", "runs/meta", "--queries", "some"], r"--queries is 'some'; give a number of query "
                   r"examples per class", capsys, tmp_path / "runs" / "meta" / "weights")
    from safetensors.torch import save_file

    save_file({"values": torch.tensor([0, 1, 2, 3, 4, 5])}, saved / "meta_train_classes.safetensors")
    assert_refused(["meta-eval", "runs/meta"], r"classes \[5\] are both meta-train and meta-test classes", capsys,
                   tmp_path / "runs" / "meta" / "weights")


def test_meta_commands_refuse_other_runs(tmp_path, capsys):
    from tests.bad_input import assert_refused
    from tests.helpers import tiny_classification_run

    tiny_classification_run(tmp_path, 40, max_steps=2)
    assert_refused(["meta-train", str(tmp_path / "config.yaml")], r"meta-train needs objective.name: meta_learning",
                   capsys, tmp_path)


def test_init_from_starts_training_from_a_finished_runs_weights(tmp_path, monkeypatch, capsys):
    import json

    from deltatune.cli import main
    from tests.bad_input import assert_refused
    from tests.helpers import tiny_classification_run

    tiny_classification_run(tmp_path, 60, max_steps=6, eval_every=6, save_every=6)
    monkeypatch.chdir(tmp_path)
    lora = ["method={name: lora, r: 4}", "train.lr=1e-2"]
    assert main(["train", "config.yaml", "run_name=first", *lora]) == 0
    assert main(["train", "config.yaml", "run_name=second", "model.init_from=runs/first", *lora]) == 0
    first = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())
    second = json.loads((tmp_path / "runs" / "second" / "summary.json").read_text())
    assert second["before"] == first["after"]  # the second run starts exactly where the first one ended
    assert_refused(["train", "config.yaml", "run_name=third", "model.init_from=runs/first"],
                   "was trained with another method section", capsys, tmp_path)
    assert_refused(["train", "config.yaml", "run_name=fourth", "model.init_from=runs/first", "model.num_labels=3",
                    *lora], r"does not fit this model .*model\.num_labels", capsys, tmp_path)


def test_meta_test_classes_may_be_named():
    from deltatune.config.loader import objective_config
    from deltatune.objectives.meta_learning import MetaLearning

    config = objective_config({"name": "meta_learning", "meta_test_classes": ["gossip", 1]})
    assert config.meta_test_classes == ["gossip", 1]
    objective = MetaLearning(config)
    objective.label_names = ["AI", "food", "gossip"]
    assert [objective.class_id(value) for value in config.meta_test_classes] == [2, 1]
    with pytest.raises(UserError, match="names class 'sports', which the data does not have; its classes are AI, food"):
        objective.class_id("sports")


def test_pools_by_task_keep_the_classes_and_tasks_that_can_fill_an_episode():
    from deltatune.data.episodes import pools_by_task

    tasks = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    labels = [5, 5, 6, 6, 5, 5, 6, 7, 7, 8, 8]
    # 2-way episodes of 1 shot + 1 query: task 1 has only one class with 2 rows, so it cannot make one
    assert pools_by_task(tasks, labels, [0, 1, 2], 2, 1, 1) == {0: {5: [0, 1], 6: [2, 3]}, 2: {7: [7, 8], 8: [9, 10]}}
    assert pools_by_task(tasks, labels, [0], 2, 1, 1) == {0: {5: [0, 1], 6: [2, 3]}}


def test_with_a_task_column_episodes_stay_inside_one_task_and_meta_test_tasks_are_held_out(tmp_path, monkeypatch):
    import json

    import yaml

    from deltatune.cli import main
    from deltatune.objectives.meta_learning import MetaLearning
    from tests.bad_input import write_jsonl

    domains = ["books", "dvd", "kitchen", "music"]
    rows = [{"text": f"{domain} {level} item {k}", "label": level, "domain": domain}
            for domain in domains for level in ("low", "mid", "high") for k in range(10)]
    write_jsonl(tmp_path / "reviews.jsonl", rows)
    config = {"model": {"name": "tests.tiny_models:tiny_bert", "task": "classification"},
              "data": {"name": "reviews.jsonl", "columns": {"task": "domain"}, "max_length": 12,
                       "split": {"validation": 0.4, "test": 0.0, "seed": 0}},
              "method": {"name": "lora", "r": 2},
              "objective": {"name": "meta_learning", "ways": 2, "shots": 1, "queries": 1, "inner_steps": 2,
                            "inner_lr": 0.1, "meta_test_tasks": ["music"], "validation_episodes": 2},
              "train": {"max_steps": 4, "batch_size": 2, "eval_every": 2, "lr": 1e-3, "num_threads": 1,
                        "progress": False},
              "output_dir": "runs", "run_name": "meta"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    seen: list[set[str]] = []
    original = MetaLearning.episode_batches

    def spy(self, examples, episode):
        seen.append({examples[i]["task"] for i in (*episode.support, *episode.query)})
        return original(self, examples, episode)

    monkeypatch.setattr(MetaLearning, "episode_batches", spy)
    monkeypatch.chdir(tmp_path)
    assert main(["meta-train", "config.yaml"]) == 0
    assert seen and all(len(tasks) == 1 and tasks != {"music"} for tasks in seen)  # one task each, never music
    seen.clear()
    assert main(["meta-eval", "runs/meta", "--episodes", "4"]) == 0
    assert seen and all(tasks == {"music"} for tasks in seen)
    result = json.loads((tmp_path / "runs" / "meta" / "meta_eval.json").read_text())
    assert result["settings"]["meta_test_tasks"] == [3]


@pytest.mark.parametrize("objective, message", [
    ({"shots": 20}, r"class \d+ of the meta-train pool has \d+ examples, fewer than shots \+ queries = 20 \+ 1"),
    ({"meta_test_classes": [5, 5]}, r"meta-test classes \[5, 5\] name a class twice"),
    ({"meta_test_classes": [5, 9]}, r"meta-test classes \[9\] are not in the data"),
    ({"meta_test_tasks": ["music"]}, r"objective\.meta_test_tasks needs rows with a task"),
])
def test_meta_train_refuses_episodes_the_data_cannot_fill(tmp_path, capsys, objective, message):
    import yaml

    from tests.bad_input import assert_refused, write_jsonl

    write_jsonl(tmp_path / "topics.jsonl", topic_rows())
    config = {"model": {"name": "tests.tiny_models:tiny_bert", "task": "classification"},
              "data": {"name": str(tmp_path / "topics.jsonl"), "max_length": 12, "split": {"validation": 0.2, "test": 0.0}},
              "method": {"name": "lora", "r": 2},
              "objective": {"name": "meta_learning", "ways": 2, "shots": 1, "queries": 1, "meta_test_count": 2,
                            **objective},
              "train": {"max_steps": 2, "num_threads": 1, "progress": False},
              "output_dir": str(tmp_path / "runs"), "run_name": "meta"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert_refused(["meta-train", str(tmp_path / "config.yaml")], message, capsys, tmp_path)
