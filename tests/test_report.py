"""`deltatune report` (issue 14) on tiny runs of several methods: every section is there, its numbers hold what they
say (a LoRA run's weight change is its merged update, a method that adds modules reports hidden-state change
instead), forgetting is measured on a second dataset, and bad input is one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.cli import main
from tests.bad_input import assert_refused, write_jsonl
from tests.test_runs import sft_run, tiny_run


def reviews(root: Path) -> Path:
    return write_jsonl(root / "reviews.jsonl", [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": i % 2}
                                                for i in range(60)])


def classifier_run(root: Path, method: list[str]) -> Path:
    return tiny_run(root, method[0].partition("=")[2], ["model.name=tests.tiny_models:tiny_bert",
                                                         "model.task=classification", f"data.name={reviews(root)}",
                                                         *method, "train.max_steps=3", "train.lr=1e-2"])


def report_of(run_dir: Path, *extra: str) -> dict:
    assert main(["report", str(run_dir), *extra]) == 0
    out = run_dir / "report"
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page  # offline
    return {"page": page, "numbers": json.loads((out / "report.json").read_text()), "files": sorted(
        path.name for path in out.iterdir())}


@pytest.fixture(scope="module")
def lora_classifier(tmp_path_factory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("lora"), ["method.name=lora", "method.r=4"])


def test_the_report_of_a_lora_classifier_has_every_section(lora_classifier, tmp_path) -> None:
    topics = write_jsonl(tmp_path / "topics.jsonl", [{"text": f"{['sport', 'food', 'music'][i % 3]} talk {i}",
                                                      "label": i % 3} for i in range(90)])
    report = report_of(lora_classifier, "--forgetting", str(topics))
    for title in ("Training curves", "Weight change", "Hidden-state change", "linear CKA", "Confusion matrix",
                  "Forgetting"):
        assert title in report["page"]
    assert {"curves.png", "weight_change.png", "cka.png", "confusion.png", "forgetting.png", "index.html",
            "report.json"} <= set(report["files"])
    numbers = report["numbers"]
    assert numbers["weights"]["changed_tensors"] > 0
    lora_tensors = [t for t in numbers["weights"]["tensors"] if t["block"] is not None]
    assert lora_tensors and all(t["effective_rank"] <= 4.0 + 1e-6 for t in lora_tensors)  # rank-4 updates
    assert all(-1e-9 <= value <= 1 + 1e-9 for value in numbers["cka"]["diagonal"])
    assert sum(map(sum, numbers["confusion"]["matrix"])) == numbers["cka"]["examples"]
    forgetting = numbers["forgetting"]
    assert set(forgetting["base"]) == {"probe_accuracy", "probe_loss"}
    assert 0.0 <= forgetting["tuned"]["probe_accuracy"] <= 1.0


def test_a_method_that_adds_modules_reports_hidden_state_change_instead(tmp_path) -> None:
    run = classifier_run(tmp_path, ["method.name=adapter", "method.placement=houlsby"])
    numbers = report_of(run)["numbers"]
    assert numbers["weights"] is None
    assert len(numbers["hidden_change"]) == 2 and max(numbers["hidden_change"]) > 0


def test_a_prompt_tuned_classifier_lines_its_positions_up_with_the_input(tmp_path) -> None:
    run = classifier_run(tmp_path, ["method.name=prompt", "method.num_virtual_tokens=3", "data.max_length=64"])
    numbers = report_of(run)["numbers"]
    assert numbers["weights"] is None and len(numbers["cka"]["diagonal"]) == 2


def test_a_language_model_report_has_before_and_after_samples_and_perplexity_forgetting(tmp_path) -> None:
    run = sft_run(tmp_path, "lora", ["method.r=4", "train.max_steps=2"])
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": f"name a colour {i}", "response": "blue"}
                                                   for i in range(30)])
    numbers = report_of(run, "--forgetting", str(other))["numbers"]
    assert numbers["samples"] and {"prompt", "base", "tuned"} <= set(numbers["samples"][0])
    assert {"loss", "perplexity"} <= set(numbers["forgetting"]["base"])


def test_report_mistakes(lora_classifier, tmp_path, capsys) -> None:
    assert_refused(["report", str(tmp_path)], r"not a run directory", capsys, tmp_path)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 20)
    assert_refused(["report", str(lora_classifier), "--forgetting", str(pairs)],
                   r"--forgetting .*cannot be read as classification rows", capsys, lora_classifier)
    assert_refused(["report", str(lora_classifier), "--forgetting-columns", "text"],
                   r"--forgetting-columns takes role=column", capsys, lora_classifier)
    assert_refused(["report", str(lora_classifier), "--examples", "2"], r"--examples must be at least 4", capsys,
                   lora_classifier)
    mine = tmp_path / "results"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert_refused(["report", str(lora_classifier), "--out", str(mine)],
                   r"--out .*results exists and is not an earlier report", capsys, tmp_path)
    assert_refused(["report", str(lora_classifier), "--out", str(lora_classifier)],
                   r"exists and is not an earlier report", capsys, lora_classifier)


def test_runs_of_input_pairs_are_refused_and_the_probe_needs_classes_it_has_seen() -> None:
    from types import SimpleNamespace

    from deltatune.errors import UserError
    from deltatune.insight.forgetting import check_probe_classes
    from deltatune.insight.report import _compared_rows

    pairs = SimpleNamespace(data=SimpleNamespace(validation=[{}] * 5, test=[], collate=lambda rows: {
        "chosen": {"input_ids": None}, "rejected": {"input_ids": None}}), task=SimpleNamespace(name="reward-pairs"))
    with pytest.raises(UserError, match=r"is a reward-pairs run, whose examples are pairs of model inputs"):
        _compared_rows(pairs, Path("runs/r"), 256)
    few = SimpleNamespace(data=SimpleNamespace(validation=[{"x": 1}] * 2, test=[{"x": 2}] * 6,
                                               collate=lambda rows: {"input_ids": None}))
    assert _compared_rows(few, Path("runs/f"), 256) == [{"x": 2}] * 6  # validation too small: the test rows
    with pytest.raises(UserError, match=r"hold 1 class; the probe needs at least 2"):
        check_probe_classes({0}, {0})
    with pytest.raises(UserError, match=r"test rows hold class 2, which none of its train and validation rows has"):
        check_probe_classes({0, 1}, {0, 2})


def test_a_qlora_report_counts_the_adapter_update_not_the_rounding_to_4_bits(tmp_path) -> None:
    """QLoRA holds its frozen weights in 4 bits: measured against the full-precision base, every frozen matrix
    would look changed by the rounding (relative change ~0.1, near-full rank); against the weights the run held,
    only the adapted matrices change, each by a rank-r update."""
    numbers = report_of(classifier_run(tmp_path, ["method.name=qlora", "method.r=4"]))["numbers"]
    in_blocks = [t for t in numbers["weights"]["tensors"] if t["block"] is not None]
    assert in_blocks and all(t["effective_rank"] <= 4.0 + 1e-6 for t in in_blocks), in_blocks


def test_the_report_of_an_image_classifier_and_its_forgetting_on_other_images(tmp_path) -> None:
    from tests.test_data_images import write_image_folder

    images = write_image_folder(tmp_path / "shapes", {"dark": 20, "mid": 20, "light": 20})
    others = write_image_folder(tmp_path / "others", {"a": 15, "b": 15})
    run = tiny_run(tmp_path, "cnn", ["model.name=tests.tiny_models:tiny_cnn", "model.task=image-classification",
                                     f"data.name={images}", "data.image_size=32", "method.name=freeze",
                                     "method.last_n_blocks=1", "train.max_steps=3", "train.lr=1e-2"])
    numbers = report_of(run, "--forgetting", str(others))["numbers"]
    changed_blocks = {t["block"] for t in numbers["weights"]["tensors"] if t["block"] is not None}
    assert changed_blocks == {len(numbers["cka"]["diagonal"]) - 1}  # only the last block trained
    assert numbers["cka"]["diagonal"][0] == pytest.approx(1.0)  # frozen early blocks represent as before
    assert set(numbers["forgetting"]["tuned"]) == {"probe_accuracy", "probe_loss"}


def test_a_qlora_report_counts_biases_trained_in_place(tmp_path) -> None:
    """bias="all" trains the biases of the 4-bit linears in place: measured against the held copy they would read
    as unchanged; against the pretrained biases they change."""
    numbers = report_of(classifier_run(tmp_path, ["method.name=qlora", "method.r=4", "method.bias=all"]))["numbers"]
    assert any(t["name"].endswith(".bias") and t["block"] is not None for t in numbers["weights"]["tensors"])
