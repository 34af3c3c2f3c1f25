"""Shared pieces of the bad-input catalogue (tests/test_bad_inputs_*.py, tests/test_cli_errors.py).

Every catalogue case promises the same four things: exit code 2, exactly one line on stderr starting "error: " and
naming the fix, no traceback, and every file that existed before the command byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from deltatune.cli import main

# A config prefix that trains a tiny random BERT (tests/tiny_models.py) into ./runs.
TINY_BERT = "model: {name: 'tests.tiny_models:tiny_bert', task: classification}\noutput_dir: runs\n"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config_file(root: Path, text: str, name: str = "config.yaml") -> str:
    path = root / name
    path.write_text(text)
    return str(path)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` by relative path (empty when root does not exist)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def make_workspace(root: Path) -> Path:
    """`root` holding a good 20-row two-class JSONL and an earlier run's files that must survive every case."""
    write_jsonl(root / "good.jsonl", [{"text": f"example {i}", "label": i % 2} for i in range(20)])
    earlier = root / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("model: {name: minilm-l6}\n")
    (earlier / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return root


def assert_refused(argv: list[str], message: str, capsys, watched: Path) -> str:
    """Run the CLI in-process: exit 2, one `error:` line matching the regex `message`, `watched` unchanged.

    Returns the error line. `watched` is digested before the call, so pass the directory whose files must survive.
    """
    before = tree_digest(watched)
    capsys.readouterr()  # drop anything printed before the call
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(message, err), err
    after = tree_digest(watched)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed before was changed"
    assert set(before) <= set(after), "a file that existed before was removed"
    return err
