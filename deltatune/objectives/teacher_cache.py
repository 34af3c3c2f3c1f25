"""A distillation teacher's logits computed once and kept on disk (safetensors shards), not in memory.

A pass of the teacher over the training set costs as much as an epoch of its forward passes; a student trained for
several epochs, or several students of a learning-rate sweep, read the same logits back instead. One cache is a
folder named by a fingerprint of the teacher's weights, of the examples' contents and of how they become model
inputs (`fingerprint`), so a changed teacher, changed data or changed preprocessing never reads stale logits, and a later run with the same teacher and data (a
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
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from deltatune.data.store import private_partial

SHARD_BYTES = 256 * 2**20  # a shard is written once its rows reach this size


def fingerprint(teacher: nn.Module, examples: list[dict], batches_of: Callable[[list[dict]], dict] | None = None,
                skip: tuple[str, ...] = ("teacher_index",)) -> str:
    """A short hash of the teacher's weights (name, dtype, shape and sum of every parameter), of every example's
    contents in order (token ids, labels, raw images, ...; not the `skip` keys written after caching), of the first
    example as the collate function turns it into model inputs (image size and normalisation live there, not in the
    examples), and of the autocast setting: equal only when the cached logits would be computed again identically."""
    digest = hashlib.sha256()
    for name, param in teacher.state_dict().items():
        if torch.is_tensor(param) and param.is_floating_point():
            digest.update(f"{name}{param.dtype}{tuple(param.shape)}{float(param.double().sum()):.12e}".encode())
    for example in examples:
        for key in sorted(set(example) - set(skip)):
            digest.update(key.encode())
            digest.update(_content(example[key]))
    if batches_of is not None and examples:
        probe = batches_of([{key: value for key, value in examples[0].items() if key not in skip}])
        for key in sorted(probe):
            digest.update(key.encode())
            digest.update(_content(probe[key]))
        device = next((value.device.type for value in probe.values() if torch.is_tensor(value)), "cpu")
        if torch.is_autocast_enabled(device):
            digest.update(f"autocast {torch.get_autocast_dtype(device)}".encode())
    return digest.hexdigest()[:20]


def _content(value: object) -> bytes:
    """The bytes that identify a value: a tensor's or array's dtype, shape and data, an image's pixels, else repr."""
    if torch.is_tensor(value):
        value = value.detach().cpu()
        data = value.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        return f"{value.dtype}{tuple(value.shape)}".encode() + data
    if hasattr(value, "tobytes") and hasattr(value, "shape"):  # numpy arrays
        return f"{getattr(value, 'dtype', '')}{value.shape}".encode() + value.tobytes()
    if hasattr(value, "tobytes") and hasattr(value, "size"):  # PIL images
        return f"{getattr(value, 'mode', '')}{value.size}".encode() + value.tobytes()
    return repr(value).encode()


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
        """Store `rows` (example 0, 1, 2, ... in order) in shards; returns how many. Each process writes its own
        partial folder (students of a sweep may start at once) and the index appears only once every shard is on
        disk; a process that finds the cache completed by another meanwhile keeps that one."""
        partial = private_partial(self.directory)
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
        if self.complete:  # another process finished the same cache first: its rows are these rows
            shutil.rmtree(partial, ignore_errors=True)
            return count
        shutil.rmtree(self.directory, ignore_errors=True)  # an incomplete folder, if any
        try:
            os.replace(partial, self.directory)
        except OSError:  # another process's complete folder appeared in between
            shutil.rmtree(partial, ignore_errors=True)
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
