"""A distillation teacher's logits computed once and kept on disk (safetensors shards), not in memory.

A pass of the teacher over the training set costs as much as an epoch of its forward passes; a student trained for
several epochs, or several students of a learning-rate sweep, read the same logits back instead. One cache is a
folder named by a fingerprint of the teacher's weights and of the examples (token ids and label positions), so a
changed teacher or changed data never reads stale logits, and a later run with the same teacher and data (a
resumed run, the next learning rate) finds it complete and reuses it:

    <output_dir>/cache/teacher-logits-<fingerprint>/shard-00000.safetensors, ..., index.json

Each example's row is what distillation compares: a classifier's logits (K,), or a language model's next-token
logits at the positions that predict a response token (n, V) — prompt and padding positions are not stored. Rows
are read memory-mapped, one batch's worth at a time; `index.json` is written last and marks the cache complete.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

SHARD_BYTES = 256 * 2**20  # a shard is written once its rows reach this size


def fingerprint(teacher: nn.Module, examples: Iterable[dict]) -> str:
    """A short hash of the teacher's weights (name, shape and sum of every parameter) and of the examples' token
    ids and labels, in order: equal only when the cached logits would be computed again identically."""
    digest = hashlib.sha256()
    for name, param in teacher.state_dict().items():
        if torch.is_tensor(param) and param.is_floating_point():
            digest.update(f"{name}{tuple(param.shape)}{float(param.double().sum()):.12e}".encode())
    for example in examples:
        for key in ("input_ids", "labels", "position_ids"):
            if key in example:
                digest.update(f"{key}{example[key]}".encode())
    return digest.hexdigest()[:20]


class TeacherLogitCache:
    """Rows by example index: written in order by `write`, read back by `rows`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._starts: list[int] = []
        self._names: list[str] = []
        self._handles: dict[str, object] = {}

    @property
    def complete(self) -> bool:
        return (self.directory / "index.json").is_file()

    def write(self, rows: Iterable[torch.Tensor]) -> int:
        """Store `rows` (example 0, 1, 2, ... in order) in shards; returns how many. A folder left by an
        interrupted write is replaced; the index appears only once every shard is on disk."""
        partial = self.directory.with_name(self.directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        shards, pending, size, start, count = [], {}, 0, 0, 0
        for row in rows:
            pending[str(count)] = row.detach().to("cpu", torch.float32).contiguous()
            size += pending[str(count)].numel() * 4
            count += 1
            if size >= SHARD_BYTES:
                shards.append(self._flush(partial, len(shards), pending, start))
                pending, size, start = {}, 0, count
        if pending or not shards:
            shards.append(self._flush(partial, len(shards), pending, start))
        (partial / "index.json").write_text(json.dumps({"rows": count, "shards": shards}))
        shutil.rmtree(self.directory, ignore_errors=True)
        os.replace(partial, self.directory)
        return count

    @staticmethod
    def _flush(directory: Path, number: int, rows: dict[str, torch.Tensor], start: int) -> dict:
        name = f"shard-{number:05d}.safetensors"
        save_file(rows, str(directory / name))
        return {"file": name, "start": start}

    def rows(self, indices: list[int]) -> list[torch.Tensor]:
        """The stored rows of examples `indices`, in that order."""
        if not self._starts:
            index = json.loads((self.directory / "index.json").read_text())
            self._starts = [shard["start"] for shard in index["shards"]]
            self._names = [shard["file"] for shard in index["shards"]]
        found = []
        for example in indices:
            name = self._names[bisect.bisect_right(self._starts, example) - 1]
            if name not in self._handles:
                self._handles[name] = safe_open(str(self.directory / name), framework="pt")
            found.append(self._handles[name].get_tensor(str(example)))
        return found


class CacheChain:
    """Several caches read as one: row i of part k is example `starts[k] + i` (cross-fitted teachers write one part
    each, so each part stays reusable on its own)."""

    def __init__(self, parts: list[TeacherLogitCache], sizes: list[int]) -> None:
        self.parts = parts
        self.starts = [sum(sizes[:k]) for k in range(len(sizes))]

    def rows(self, indices: list[int]) -> list[torch.Tensor]:
        found = []
        for example in indices:
            part = bisect.bisect_right(self.starts, example) - 1
            found.extend(self.parts[part].rows([example - self.starts[part]]))
        return found
