"""`deltatune advise` (issue 14) on a tiny classifier: every candidate is probed in its own process and ranked,
predictions are built from the measured step time, and budgets are parsed strictly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deltatune.advise import advise, parse_amount
from deltatune.errors import UserError
from tests.bad_input import assert_refused, write_jsonl


def tiny_config(root: Path) -> str:
    data = write_jsonl(root / "reviews.jsonl", [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": i % 2}
                                                for i in range(80)])
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "tests.tiny_models:tiny_bert", "task": "classification"},
                                      "data": {"name": str(data), "max_length": 64},  # room for virtual tokens
                                      "train": {"epochs": 2, "batch_size": 8, "num_threads": 1}}))
    return str(config)


def test_advise_ranks_the_candidates_it_measured(tmp_path) -> None:
    printed = []
    rows = advise(tiny_config(tmp_path), [], memory="64GB", time_budget="1h", echo=printed.append,
                  candidates={"full": "method={name: full}", "lora": "method={name: lora, r: 2}",
                              "prompt": "method={name: prompt, num_virtual_tokens: 2}"})
    assert [row["candidate"] for row in rows] == ["lora", "full", "prompt"]  # all fit: by the quality prior
    by_name = {row["candidate"]: row for row in rows}
    assert by_name["lora"]["trainable_parameters"] < by_name["full"]["trainable_parameters"]
    for row in rows:
        assert row["fits"] and row["total_steps"] == 2 * 8  # 64 train rows / 8, two epochs
        assert row["predicted_seconds"] >= row["step_seconds"] * row["total_steps"]
        assert row["peak_memory_bytes"] > 10 * 2**20
    assert "| 1 | lora |" in printed[0]


def test_a_method_that_cannot_run_is_listed_with_why(tmp_path) -> None:
    rows = advise(tiny_config(tmp_path), [], candidates={"lora": "method={name: lora, target_modules: [nothing]}"},
                  echo=lambda *_: None)
    assert "nothing" in rows[0]["error"]


@pytest.mark.parametrize("text, kind, expected", [("8GB", "memory", 8 * 2**30), ("512 mb", "memory", 512 * 2**20),
                                                  ("1h", "time", 3600), ("90m", "time", 5400), ("30s", "time", 30)])
def test_budgets_parse(text, kind, expected) -> None:
    assert parse_amount(text, kind) == expected


def test_advise_mistakes(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path)
    assert_refused(["advise", config, "--memory", "8 gigs"], r"--memory '8 gigs' is not a positive amount",
                   capsys, tmp_path)
    assert_refused(["advise", config, "--time", "0h"], r"--time '0h' is not a positive amount", capsys, tmp_path)
    with pytest.raises(UserError, match=r"no method fits 1KB"):
        advise(config, [], memory="1KB", candidates={"lora": "method={name: lora, r: 2}"}, echo=lambda *_: None)


def test_a_probe_killed_by_the_kernel_says_so(monkeypatch) -> None:
    import subprocess
    from types import SimpleNamespace

    from deltatune import advise

    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: SimpleNamespace(returncode=-9, stdout="",
                                                                                    stderr=""))
    assert advise._probe_in_subprocess("config.yaml", []) == {
        "error": "the probe was killed by signal 9 (out of memory?)"}
