"""Atomic, pickle-free checkpoints.

A checkpoint is a directory: tensors in safetensors files, everything else in JSON. It is written under a
temporary name, every file fsync'd, then renamed into place and the parent fsync'd, so a kill at any moment leaves
either the previous checkpoint or the new one, never a torn one. Nothing is ever unpickled when loading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d+)$")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors needs contiguous tensors that share no storage; clone where needed, then fsync."""
    clean = {name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}
    save_file(clean, str(path), metadata=metadata)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_checkpoint_dir(final_dir: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
    """Write `{name}.safetensors` for each entry of `tensors` plus `state.json`, atomically as one directory."""
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    for name, group in tensors.items():
        save_tensors(tmp_dir / f"{name}.safetensors", group)
    write_json_atomic(tmp_dir / "state.json", state)
    fsync_dir(tmp_dir)
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
    """Tensors by file stem and the JSON state of a checkpoint directory (falling back to its `.old` copy)."""
    if not (directory / "state.json").exists():
        old_dir = directory.with_name(f".{directory.name}.old")
        if (old_dir / "state.json").exists():
            directory = old_dir
    state = json.loads((directory / "state.json").read_text())
    tensors = {path.stem: load_file(str(path)) for path in sorted(directory.glob("*.safetensors"))}
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
