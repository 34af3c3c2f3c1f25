"""The run directory: everything a run leaves behind, in one place.

    config.yaml        the fully resolved config (every default spelled out)
    splits.json        row indices of train/validation/test, so `deltatune eval` uses the same test split
    metrics.jsonl      one JSON object per logged step and per evaluation
    checkpoints/       step-N/ directories for --resume (newest few kept)
    best/              trainable weights of the best validation score so far
    weights/           the final trainable weights (+ method config) the run produced
    summary.json/.md   headline numbers

Every JSON file here is strict JSON: a non-finite number (a nan or inf metric) is written as null.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from deltatune.errors import UserError
from deltatune.training.checkpoint import (
    disk_writes,
    fsync_dir,
    read_checkpoint_dir,
    read_json,
    strict_json,
    write_json_atomic,
)


def _claim(tmp: Path, target: Path, text: str) -> None:
    """Create `target` with `text` only if it does not exist (FileExistsError otherwise): a hard link of the written
    file, so the name appears complete; on filesystems without hard links (FAT, some network and FUSE mounts) an
    exclusive create, which claims as surely but could be cut off mid-write."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
            raise
        with open(target, "x") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


class RunDirTaken(UserError):
    """A new run found its directory claimed by another run started at the same moment; nothing there is its own."""


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.best = self.path / "best"
        self.weights = self.path / "weights"
        self.metrics_file = self.path / "metrics.jsonl"

    def create(self) -> None:
        with disk_writes(self.path):
            self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config_dict: dict[str, Any], claim: bool = False) -> None:
        """Write config.yaml atomically. `claim` (a new run): only if no run wrote one first, else RunDirTaken; the
        hard link fails when the name exists, so of two runs started at once exactly one owns the directory."""
        import yaml

        text = yaml.safe_dump(config_dict, sort_keys=False)
        tmp = self.path / f".config.yaml.{os.getpid()}.tmp"
        with disk_writes(self.path / "config.yaml"):
            tmp.write_text(text)
            try:
                if claim:
                    _claim(tmp, self.path / "config.yaml", text)
                else:
                    os.replace(tmp, self.path / "config.yaml")
            except FileExistsError:
                raise RunDirTaken(f"another run started in {self.path} at the same time and owns it; set run_name to "
                                  "a new name (or leave it out) and run again") from None
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(self.path)

    def check_is_run(self) -> None:
        """A UserError unless this directory holds a run (its config.yaml)."""
        if not (self.path / "config.yaml").is_file():
            raise UserError(f"{self.path} is not a run directory (no config.yaml); pass the directory `deltatune "
                            f"train` printed")

    def check_finished(self) -> None:
        """A UserError unless the run finished, i.e. wrote its final weights."""
        if not (self.weights / "state.json").is_file():
            raise UserError(f"{self.path} has no final weights yet; finish it with `deltatune train CONFIG --resume`")

    def read_final_weights(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(the trainable weights by parameter name, the method's config as a dict) the finished run saved.

        A UserError when the run has not finished or its weights/ directory lacks the tensors.
        """
        self.check_finished()
        tensors, state = read_weights(self.weights)
        if not tensors:
            raise UserError(f"{self.weights} has no model.safetensors; finish the run again with `deltatune train "
                            f"CONFIG --resume`")
        return tensors, dict(state.get("method") or {})

    def write_splits(self, splits: dict[str, list[int]]) -> None:
        write_json_atomic(self.path / "splits.json", splits)

    def read_splits(self) -> dict[str, list[int]] | None:
        path = self.path / "splits.json"
        if not path.exists():
            return None
        return read_json(path, "restore it from a backup, or start a new run (the test split must not change)")

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics record and flush it to disk, so a killed run keeps what it logged."""
        line = json.dumps(strict_json(record), sort_keys=True, allow_nan=False) + "\n"
        with disk_writes(self.metrics_file), open(self.metrics_file, "a") as handle:
            handle.write(line)
            handle.flush()

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop records the killed run logged after its last checkpoint (they will be logged again)."""
        if not self.metrics_file.exists():
            return
        kept = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path / ".metrics.jsonl.tmp"
        with disk_writes(self.metrics_file):
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.metrics_file)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)
        lines = [f"# Run {self.path.name}", ""]
        for key, value in summary.items():
            lines.append(f"- **{key}**: {_fmt(value)}")
        with disk_writes(self.path / "summary.md"):
            (self.path / "summary.md").write_text("\n".join(lines) + "\n")


def drop_best_after(run_dir: RunDir, step: int) -> bool:
    """Remove best/ (and its .old copy) when it was written after `step`, the checkpoint a resume continues from:
    evaluations between checkpoints, or a kill between the two writes, leave a best/ from steps the resumed run
    redoes, and a run resumed to a lower max_steps would otherwise end with weights from beyond its budget. True
    when something was removed (the loop then tracks the best afresh)."""
    import shutil

    dropped = False
    for folder in (run_dir.best, run_dir.best.with_name(f".{run_dir.best.name}.old")):
        state = folder / "state.json"
        if state.is_file() and read_json(state, f"delete {folder} and run again").get("step", 0) > step:
            shutil.rmtree(folder)
            dropped = True
    return dropped


def holds_weights(directory: Path) -> bool:
    """Whether `directory` holds trainable weights as a run writes them (a run's weights/ or best/), or its `.old`
    copy does (a kill between the two renames of `write_checkpoint_dir` leaves only that; reading falls back to it)."""
    return any((folder / "state.json").is_file() and (folder / "model.safetensors").is_file()
               for folder in (directory, directory.with_name(f".{directory.name}.old")))


def read_weights(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model tensors and the JSON state (method config, ...) of such a directory."""
    tensors, state = read_checkpoint_dir(directory)
    return dict(tensors.get("model", {})), state


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key}={_fmt(item)}" for key, item in value.items())
    return str(value)
