"""The task registry: a new task is one file; data.columns maps a task's roles to a file's columns; `model.task: auto`
reads the architecture; the objective "auto" asks the task."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import deltatune.tasks as tasks_package
from deltatune.config.loader import config_to_dict, load_config, parse_config
from deltatune.config.schema import DataConfig, ModelConfig
from deltatune.tasks import build_datasets
from deltatune.errors import UserError
from deltatune.objectives import get_objective
from deltatune.tasks import TASKS, available_tasks, get_task, resolve_task, task_for_architectures
from tests.bad_input import TINY_BERT, assert_refused, config_file, make_workspace, write_jsonl

# A whole new task, written as a user would write deltatune/tasks/star_rating.py: its own roles and defaults,
# its own encoding, the classification head and objective, and an architecture name `auto` recognises.
STAR_RATING = '''
from deltatune.data import DatasetBundle
from deltatune.data.splits import SPLIT_NAMES
from deltatune.data.text import ClassificationCollator, encode_classification, pad_token_id
from deltatune.tasks import register_task
from deltatune.tasks.base import Task


@register_task("star-rating")
class StarRating(Task):
    description = "1-5 stars from a review"
    roles = {"review": "review", "stars": "stars"}
    default_objective = "classification"
    auto_class = "AutoModelForSequenceClassification"
    labelled = True
    architecture_suffixes = ("ForStarRating",)

    def encode(self, table, splits, data, processor, num_labels):
        labels = table.labels("stars", num_labels)
        parts = {name: encode_classification(processor, table.texts("review", splits[name]), None,
                                             [labels.ids[i] for i in splits[name]], data.max_length)
                 for name in SPLIT_NAMES}
        return DatasetBundle(parts["train"], parts["validation"], parts["test"],
                             ClassificationCollator(pad_token_id(processor)), labels.num_labels,
                             labels.label_names, splits)
'''


@pytest.fixture
def star_rating(tmp_path, monkeypatch):
    """The registry with STAR_RATING as one more file of the tasks package (restored afterwards)."""
    folder = tmp_path / "more_tasks"
    folder.mkdir()
    (folder / "star_rating.py").write_text(STAR_RATING)
    monkeypatch.setattr(tasks_package, "__path__", [*tasks_package.__path__, str(folder)])
    monkeypatch.setattr(TASKS, "_entries", dict(TASKS.all()))
    monkeypatch.setattr(TASKS, "_discovered", False)
    yield
    sys.modules.pop("deltatune.tasks.star_rating", None)


def reviews(path: Path) -> str:
    rows = [{"body": f"{'great' if i % 2 else 'poor'} film {i}", "rating": ["1 star", "5 stars"][i % 2]}
            for i in range(40)]
    return str(write_jsonl(path, rows))


# --- the registry ---------------------------------------------------------------------------------------------

def test_the_built_in_tasks_are_registered_with_their_roles_and_defaults() -> None:
    pairs = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "margin": None}
    built_in = {"causal-lm": {"prompt": "prompt", "response": "response"},
                "classification": {"text": "text", "text_pair": None, "label": "label", "task": None},
                "image-classification": {"image": "image", "label": "label", "task": None},
                "image-text": {"image": "image", "caption": None, "label": None},
                "preference": pairs, "prompts": {"prompt": "prompt"}, "reward-pairs": pairs}
    tasks = {name: task for name, task in available_tasks().items() if name in built_in}  # a user's own may join
    assert {name: task.roles for name, task in tasks.items()} == built_in
    assert [name for name, task in tasks.items() if task.can_generate] == ["causal-lm", "preference", "prompts"]
    assert [name for name, task in tasks.items() if task.labelled] == ["classification", "image-classification",
                                                                       "reward-pairs"]


def test_a_new_task_file_registers_itself_and_trains(star_rating, tmp_path) -> None:
    from deltatune import train
    from deltatune.runs import evaluate_run

    assert "star-rating" in available_tasks()
    assert get_task("star-rating")().columns(DataConfig()) == {"review": "review", "stars": "stars"}
    data = reviews(tmp_path / "reviews.jsonl")
    config = load_config(None, ["model.name=tests.tiny_models:tiny_bert", "model.task=star-rating",
                                f"data.name={data}", "data.columns.review=body", "data.columns.stars=rating",
                                "train.max_steps=2", "train.progress=false", "train.num_threads=1",
                                f"output_dir={tmp_path / 'runs'}", "run_name=stars"])
    summary = train(config)
    assert summary["task"] == "star-rating"
    again = evaluate_run(summary["run_dir"], echo=lambda *_: None)
    assert again["test"]["accuracy"] == pytest.approx(summary["after"]["test"]["accuracy"])


def test_a_new_task_names_its_architectures_for_auto(star_rating, tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForStarRating"]}))
    assert resolve_task(ModelConfig(name=str(tmp_path))) == "star-rating"


@pytest.mark.parametrize("architectures, task", [
    (["LlamaForCausalLM"], "causal-lm"), (["ViTForImageClassification"], "image-classification"),
    (["BertForSequenceClassification"], "classification"), (["BertModel"], "classification"),
    ([], "classification"),
])
def test_auto_task_per_architecture(tmp_path, architectures, task) -> None:
    assert task_for_architectures(architectures) == task
    (tmp_path / "config.json").write_text(json.dumps({"architectures": architectures}))
    assert resolve_task(ModelConfig(name=str(tmp_path))) == task


def test_auto_objective_is_the_tasks_default() -> None:
    assert get_objective("auto", get_task("causal-lm")()).name == "sft"
    assert get_objective("auto", get_task("image-classification")()).name == "classification"
    assert get_objective("sft", get_task("classification")()).name == "sft"  # a named objective wins


# --- data.columns ---------------------------------------------------------------------------------------------

def test_columns_take_the_task_defaults_and_optional_roles_only_when_given() -> None:
    classification = get_task("classification")()
    assert classification.columns(DataConfig()) == {"text": "text", "label": "label"}
    given = DataConfig(columns={"text": "premise", "text_pair": "hypothesis"})
    assert classification.columns(given) == {"text": "premise", "text_pair": "hypothesis", "label": "label"}
    assert get_task("causal-lm")().columns(DataConfig(columns={"response": "answer"})) == {
        "prompt": "prompt", "response": "answer"}


def test_columns_from_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  columns: {text: review, label: sentiment}\n")
    config = load_config(path, ["data.columns.label=stars", "data.columns.text_pair=title"])
    assert config.data.columns == {"text": "review", "label": "stars", "text_pair": "title"}
    assert parse_config(config_to_dict(config)) == config
    assert load_config(None, ["data.columns.text=7"]).data.columns == {"text": "7"}  # column names are strings


def test_columns_rename_what_the_task_reads(tmp_path) -> None:
    from tests.tiny_models import tiny_bert_processor

    data, tokenizer = reviews(tmp_path / "reviews.jsonl"), tiny_bert_processor()
    bundle = build_datasets(DataConfig(name=data, columns={"text": "body", "label": "rating"}), "classification",
                            tokenizer)
    assert bundle.label_names == ["1 star", "5 stars"]
    example = bundle.train[0]
    words = tokenizer.decode(example["input_ids"], skip_special_tokens=True).split()
    assert words[0] == ["poor", "great"][example["labels"]] and words[1] == "film"


def test_unknown_role_names_the_tasks_roles_before_reading_data() -> None:
    cfg = DataConfig(name="no/such/file.jsonl", columns={"txt": "review"})
    with pytest.raises(UserError, match=r"^data.columns has role 'txt' \(did you mean 'text'\?\), which task "
                       r"'classification' does not read; its roles are text, text_pair, label, task$"):
        build_datasets(cfg, "classification", None)
    with pytest.raises(UserError, match=r"role 'text'.*task 'causal-lm'.*its roles are prompt, response"):
        build_datasets(DataConfig(columns={"text": "review"}), "causal-lm", None)


@pytest.mark.parametrize("key, role", [("text_column", "text"), ("text_pair_column", "text_pair"),
                                       ("label_column", "label"), ("prompt_column", "prompt"),
                                       ("response_column", "response"), ("image_column", "image")])
def test_old_column_keys_say_what_to_write_instead(key, role) -> None:
    with pytest.raises(UserError, match=rf"^data.{key} is no longer a key; write data.columns: \{{{role}: x\}} "
                       rf"\(on the command line data.columns.{role}=x\)$"):
        parse_config({"data": {key: "x"}})


@pytest.mark.parametrize("override, message", [
    ("data.text_column=review", r"data.text_column is no longer a key; write data.columns: \{text: review\}"),
    ("data.columns.text=", r"data.columns.text must be a string, got nothing"),
    ("data.columns=review", r"data.columns must be a mapping"),
    ("data.columns.txt=review", r"data.columns has role 'txt' \(did you mean 'text'\?\)"),
])
def test_bad_columns_on_the_command_line(tmp_path, monkeypatch, capsys, override, message) -> None:
    monkeypatch.chdir(tmp_path)
    make_workspace(tmp_path)
    path = config_file(tmp_path, TINY_BERT + "data: {name: good.jsonl}\n")
    assert_refused(["train", path, override, "train.progress=false"], message, capsys, tmp_path)
