"""Atomic, pickle-free checkpoints.

A checkpoint is a directory: tensors in safetensors files, everything else in JSON. It is written under a
temporary name, every file fsync'd, then renamed into place and the parent fsync'd, so a kill at any moment leaves
either the previous checkpoint or the new one, never a torn one. Nothing is ever unpickled when loading.

Every JSON file is strict JSON: a non-finite float (nan, inf, -inf) is written as null, never as the bare `NaN`
Python's json module would emit. A disk that fails mid-write (full, read-only, I/O error) is a one-line UserError
naming the file; the half-written temporary copy is removed and the previous checkpoint stays. A damaged file met
when reading (truncated safetensors, invalid state.json) is a one-line UserError naming it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")
# What to tell the user for each way a disk can refuse a write; any other OSError is a bug and keeps its traceback.
_DISK_FIXES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "choose an output_dir on a file system that allows larger files",
    errno.EROFS: "choose an output_dir on a writable disk",
    errno.EACCES: "make that directory writable or choose another output_dir",
    errno.EPERM: "make that directory writable or choose another output_dir",
    errno.EIO: "check that disk (it reported an I/O error)",
}


@contextlib.contextmanager
def disk_writes(path: Path) -> Iterator[None]:
    """Turn a disk's refusal while writing `path` into a one-line UserError naming the file and the fix."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        code = _errno_of(error)
        if code not in _DISK_FIXES:
            raise
        raise UserError(f"cannot write {path} ({os.strerror(code)}); {_DISK_FIXES[code]}, then run again") from error


def _errno_of(error: BaseException) -> int | None:
    """The OS error number of an OSError, or of safetensors' Rust I/O error ("... (os error 28) ...")."""
    if isinstance(error, OSError):
        return error.errno
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match.group(1)) if match else None


def strict_json(data: Any) -> Any:
    """`data` with every non-finite float replaced by None, so `json.dumps(..., allow_nan=False)` accepts it."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def read_json(path: Path, fix: str) -> Any:
    """The JSON in `path`; a UserError naming the file and `fix` when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is damaged (not valid JSON: {error}); {fix}") from None


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync, then rename over `path`."""
    text = json.dumps(strict_json(data), indent=2, sort_keys=True, allow_nan=False)
    tmp = path.with_name(f".{path.name}.tmp")
    with disk_writes(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_durably(tmp, text.encode())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        fsync_dir(path.parent)


def write_durably(path: Path, data: bytes) -> None:
    """The one low-level write of JSON files: write, flush and fsync `data` to `path`."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors needs contiguous tensors that share no storage; clone where needed, then fsync."""
    clean = {name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}
    with disk_writes(path):
        save_file(clean, str(path), metadata=metadata)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def write_checkpoint_dir(final_dir: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
    """Write `{name}.safetensors` for each entry of `tensors` plus `state.json`, atomically as one directory."""
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    try:
        with disk_writes(tmp_dir):
            tmp_dir.mkdir(parents=True)
        for name, group in tensors.items():
            save_tensors(tmp_dir / f"{name}.safetensors", group)
        write_json_atomic(tmp_dir / "state.json", state)
        fsync_dir(tmp_dir)
    except UserError:
        # A disk that refused the write: drop the partial copy (it frees the space it took); the previous
        # checkpoint under `final_dir` was never touched.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    old_dir = final_dir.with_name(f".{final_dir.name}.old")
    if final_dir.exists():
        # Replacing a directory cannot be one rename; move the old one aside first, so at every instant one
        # complete copy exists under a name `latest_checkpoint`/`read_checkpoint_dir` will find.
        if old_dir.exists():
            shutil.rmtree(old_dir)
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old_dir.exists():
        shutil.rmtree(old_dir)


def read_checkpoint_dir(directory: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Tensors by file stem and the JSON state of a checkpoint directory (falling back to its `.old` copy).

    A damaged file is a UserError naming it: a step checkpoint can be deleted (resuming then starts from the one
    before it); damaged final weights mean training the run again."""
    if not (directory / "state.json").exists():
        old_dir = directory.with_name(f".{directory.name}.old")
        if (old_dir / "state.json").exists():
            directory = old_dir
    fix = f"delete {directory} (or restore it from a backup) and run again"
    state = read_json(directory / "state.json", fix)
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        try:
            tensors[path.stem] = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path} is damaged ({str(error).splitlines()[0]}); {fix}") from None
    return tensors, state


def step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints under `root`, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "state.json").exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for _, path in step_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into flat tensors (safetensors) and JSON-able rest."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the optimizer state_dict written by `optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for flat, tensor in tensors.items():
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}
