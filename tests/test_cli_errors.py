"""The bad-input catalogue: each mistake gives one line on stderr naming the fix, exit code 2, no traceback,
and nothing already written is changed."""

import subprocess
import sys
import pytest

from deltatune.cli import main
from tests.bad_input import TINY_BERT, assert_refused, config_file, make_workspace, write_jsonl


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A directory holding a good data file, a config using it, and an earlier run's files that must survive."""
    monkeypatch.chdir(tmp_path)
    return make_workspace(tmp_path)


BASE = TINY_BERT

CASES = {
    "bad yaml": ("train: {lr: [1, 2\n", [], r"invalid YAML at line"),
    "unknown key": (BASE + "train: {learning_rate: 0.1}\n", [], r"unknown key 'learning_rate' in train.*valid keys"),
    "missing config file": (None, [], r"not found; give the path to a YAML file"),
    "missing data file": (BASE + "data: {name: nope.jsonl}\n", [], r"nope\.jsonl"),
    "missing column": (BASE + "data: {name: good.jsonl, columns: {text: sentence}}\n", [],
                       r"column 'sentence' \(data.columns.text\) not found"),
    "empty dataset": (BASE + "data: {name: empty.jsonl}\n", [], r"empty|no rows"),
    "label out of range": (BASE + "data: {name: bad_labels.jsonl}\nmodel: {name: 'tests.tiny_models:tiny_bert', "
                           "task: classification, num_labels: 2}\n", [], r"label"),
    "unknown model alias": ("model: {name: minilm-l7, task: classification}\ndata: {name: good.jsonl}\n", [],
                            r"minilm-l7.*minilm-l6"),
    "unknown method": (BASE + "data: {name: good.jsonl}\n", ["method.name=lorax"], r"unknown method 'lorax'"),
    "non-numeric lr": (BASE + "data: {name: good.jsonl}\n", ["train.lr=fast"], r"train.lr must be a number"),
    "existing run dir": (BASE + "data: {name: good.jsonl}\nrun_name: earlier\n", [], r"already exists.*--resume"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_harmless(case, workspace, capsys):
    text, overrides, message = CASES[case]
    (workspace / "empty.jsonl").write_text("")
    write_jsonl(workspace / "bad_labels.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 7}] * 5)
    path = config_file(workspace, text) if text is not None else str(workspace / "absent.yaml")
    assert_refused(["train", path, *overrides, "train.progress=false"], message, capsys, workspace / "runs")


def test_debug_flag_shows_the_traceback(workspace, capsys):
    path = config_file(workspace, BASE + "train: {lr: fast}\n")
    assert main(["--debug", "train", path]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_real_process_exit_code_and_stderr(workspace):
    path = config_file(workspace, "train: {lr: fast}\n")
    result = subprocess.run([sys.executable, "-m", "deltatune", "train", path], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.lr must be a number, got 'fast'; write e.g. train.lr=3e-5"
    ]


def test_methods_lists_every_registered_method_with_a_description(capsys):
    from deltatune.methods import available_methods

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(available_methods())
    assert all(len(line.split(None, 1)) == 2 for line in lines)


def test_tasks_lists_every_registered_task_with_its_roles(capsys):
    from deltatune.tasks import available_tasks

    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(available_tasks())
    classification = next(line for line in lines if line.startswith("classification "))
    assert "data roles: text, [text_pair], label, [task]; objective: classification" in classification


def test_a_reader_that_goes_away_stops_the_listing_without_a_traceback():
    """`deltatune objectives | head -1`: the pipe closes before the listing is written."""
    process = subprocess.Popen([sys.executable, "-m", "deltatune", "objectives"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and err.decode() == ""
