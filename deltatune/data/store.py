"""Encoded examples on disk, read back an example at a time: what lets a run train on more rows than fit in memory.

A store is a folder with one subfolder per split. Every example field is a column: integers and floats one value
per example (`<field>.npy`), token sequences flattened into one array plus the offsets where each example starts
(`<field>.values.npy`, `<field>.offsets.npy`). Nested examples (a preference pair's `chosen` and `rejected` halves)
store their inner fields as `chosen.input_ids` and so on. Reading takes only the bytes of the examples a batch uses
(see `_DiskArray`); the operating system's page cache keeps what is read often.

Writing goes to a partial folder of the writer's own (`<folder>.partial-<host>-<pid>-<random>`) and is renamed into
place when complete, so a run killed while caching leaves no store that looks finished (the next run writes it
again, and removes the partial folders of writers on this host that are gone), and runs that write the same store
at once never mix their files.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from deltatune.errors import UserError

FORMAT = 1
_SEQUENCE, _INTEGER, _FLOAT = "sequence", "integer", "float"


class NotStorable(ValueError):
    """An example field the store does not hold (tensors, strings): such data stays in memory."""


def flat_fields(example: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The example's fields with nested dicts flattened to dotted names ({"chosen": {"input_ids": ..}} →
    {"chosen.input_ids": ..})."""
    fields: dict[str, Any] = {}
    for key, value in example.items():
        if isinstance(value, dict) and not prefix:
            fields.update(flat_fields(value, f"{key}."))
        else:
            fields[prefix + key] = value
    return fields


def field_kind(name: str, value: Any) -> str:
    if isinstance(value, bool):
        raise NotStorable(f"field {name!r} is a bool")
    if isinstance(value, int):
        return _INTEGER
    if isinstance(value, float):
        return _FLOAT
    if isinstance(value, (list, tuple)) and all(isinstance(item, int) and not isinstance(item, bool)
                                                for item in value):
        return _SEQUENCE
    raise NotStorable(f"field {name!r} holds {type(value).__name__}")


class SplitWriter:
    """Appends examples of one split to its column files, a chunk at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.kinds: dict[str, str] | None = None
        self.count = 0
        self.lengths: dict[str, list[np.ndarray]] = {}
        self.files: dict[str, Any] = {}

    def add(self, examples: Sequence[dict[str, Any]]) -> None:
        if not examples:
            return
        rows = [flat_fields(example) for example in examples]
        if self.kinds is None:
            self.kinds = {name: field_kind(name, value) for name, value in rows[0].items()}
            self.lengths = {name: [] for name, kind in self.kinds.items() if kind == _SEQUENCE}
        for row in rows:
            if row.keys() != self.kinds.keys():
                raise NotStorable(f"examples differ in their fields ({sorted(row)} vs {sorted(self.kinds)})")
        for name, kind in self.kinds.items():
            values = [row[name] for row in rows]
            if kind == _SEQUENCE:
                self.lengths[name].append(np.fromiter((len(value) for value in values), np.int64, len(values)))
                flat = np.fromiter((item for value in values for item in value), np.int64)
                self._append(f"{name}.values", flat)
            else:
                if any(field_kind(name, value) != kind for value in values):
                    raise NotStorable(f"field {name!r} changes type between examples")
                self._append(name, np.asarray(values, dtype=np.int64 if kind == _INTEGER else np.float64))
        self.count += len(rows)

    def _append(self, name: str, array: np.ndarray) -> None:
        if name not in self.files:
            self.files[name] = (self.folder / f"{name}.raw").open("wb")
        array.tofile(self.files[name])

    def close(self) -> dict[str, Any]:
        """Turn the raw column files into .npy arrays (token ids as int32 when they fit) and describe the split."""
        for file in self.files.values():
            file.close()
        kinds = self.kinds or {}
        for name, kind in kinds.items():
            raw = f"{name}.values" if kind == _SEQUENCE else name
            _raw_to_npy(self.folder / f"{raw}.raw", self.folder / f"{raw}.npy", kind == _FLOAT)
            if kind == _SEQUENCE:
                lengths = np.concatenate(self.lengths[name]) if self.lengths[name] else np.zeros(0, np.int64)
                np.save(self.folder / f"{name}.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
        return {"count": self.count, "kinds": kinds}


def private_partial(folder: Path) -> Path:
    """A new partial folder beside `folder` for this writer alone; partial folders of `folder` left by writers on
    this host that no longer run (killed mid-write) are removed first."""
    host = socket.gethostname().replace("-", "_")
    for stale in folder.parent.glob(f"{folder.name}.partial-{host}-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return folder.with_name(f"{folder.name}.partial-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class StoreWriter:
    """Writes a store split by split, chunk by chunk, into `<folder>.partial`; `finish` moves it into place (see the
    module text), `abort` removes what was written."""

    def __init__(self, folder: Path) -> None:
        # One partial folder per writer: runs started together with the same data and settings (a sweep, the
        # machines of a multi-node job) write the same store, and must not delete or mix each other's files.
        self.folder = folder
        self.partial = private_partial(folder)
        self.writers: dict[str, SplitWriter] = {}
        self.described: dict[str, dict[str, Any]] = {}

    def add(self, split: str, examples: Sequence[dict[str, Any]]) -> None:
        if split in self.described:
            raise ValueError(f"split {split!r} of the store is closed")
        if split not in self.writers:
            self.writers[split] = SplitWriter(self.partial / split)
        self.writers[split].add(examples)

    def close_split(self, split: str) -> dict[str, Any]:
        """Finish one split's files (an empty split gets an empty folder) and return its description."""
        if split not in self.described:
            writer = self.writers.pop(split, None) or SplitWriter(self.partial / split)
            self.described[split] = writer.close()
        return self.described[split]

    def drop_split(self, split: str) -> None:
        """Remove a closed split (an intermediate one) from the store."""
        self.described.pop(split)
        shutil.rmtree(self.partial / split)

    def finish(self, meta: dict[str, Any]) -> None:
        for split in list(self.writers):
            self.close_split(split)
        described = self.described
        (self.partial / "meta.json").write_text(json.dumps({"format": FORMAT, "splits": described, **meta}))
        if (self.folder / "meta.json").is_file():  # another writer finished the same store first: keep theirs
            shutil.rmtree(self.partial, ignore_errors=True)
            return
        shutil.rmtree(self.folder, ignore_errors=True)  # an incomplete folder, if any
        try:
            self.partial.rename(self.folder)
        except OSError:  # another writer's complete store appeared in between
            shutil.rmtree(self.partial, ignore_errors=True)

    def abort(self) -> None:
        for writer in self.writers.values():
            for file in writer.files.values():
                file.close()
        shutil.rmtree(self.partial, ignore_errors=True)


def _raw_to_npy(raw: Path, target: Path, floats: bool, block: int = 1 << 22) -> None:
    """A raw column file as a .npy array, integers narrowed to int32 when they fit; read and written a block at a
    time with plain file I/O (no mapping, see `_DiskArray`), so the column is never in memory whole."""
    dtype = np.dtype(np.float64 if floats else np.int64)
    length = raw.stat().st_size // dtype.itemsize

    def blocks() -> Iterator[np.ndarray]:
        for start in range(0, length, block):
            yield np.fromfile(raw, dtype=dtype, count=min(block, length - start), offset=start * dtype.itemsize)

    narrow = not floats and all(-2**31 <= int(part.min()) and int(part.max()) < 2**31 for part in blocks())
    stored = np.dtype(np.int32) if narrow else dtype
    with target.open("wb") as file:
        header = {"descr": np.lib.format.dtype_to_descr(stored), "fortran_order": False, "shape": (length,)}
        np.lib.format.write_array_header_1_0(file, header)
        for part in blocks():
            part.astype(stored).tofile(file)
    raw.unlink()


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The store's description, or None when there is no finished store of this format there."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


class StoredExamples(Sequence):
    """A split's examples read from a store on demand: `examples[i]` is a fresh dict of python ints and lists, as
    the in-memory examples are. Values an objective writes into an example (`example[key] = value`, e.g. a row
    number or a precomputed reference log-probability) are kept in memory beside the store and read back with it."""

    def __init__(self, folder: Path, description: dict[str, Any]) -> None:
        self.count = int(description["count"])
        self.kinds: dict[str, str] = description["kinds"]
        self.columns = {name: _DiskArray(folder / f"{name}.npy") for name, kind in self.kinds.items()
                        if kind != _SEQUENCE}
        self.sequences = {name: (_DiskArray(folder / f"{name}.values.npy"),
                                 _DiskArray(folder / f"{name}.offsets.npy"))
                          for name, kind in self.kinds.items() if kind == _SEQUENCE}
        self.written: dict[str, dict[int, Any]] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(f"example {index} of {self.count}")
        flat: dict[str, Any] = {name: column.read(index, index + 1)[0].item() for name, column in self.columns.items()}
        for name, (values, offsets) in self.sequences.items():
            start, stop = offsets.read(index, index + 2).tolist()
            flat[name] = values.read(start, stop).tolist()
        example: dict[str, Any] = {}
        for name, value in flat.items():
            outer, _, inner = name.partition(".")
            if inner:
                example.setdefault(outer, {})[inner] = value
            else:
                example[name] = value
        for key, values in self.written.items():
            if index in values:
                example[key] = values[index]
        return _WritableExample(example, self, index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(self.count))

    def __add__(self, other: Sequence) -> list:
        return [*self, *other]

    def __radd__(self, other: Sequence) -> list:
        return [*other, *self]

    def remember(self, index: int, key: str, value: Any) -> None:
        self.written.setdefault(key, {})[index] = value

    def lengths(self) -> list[int] | None:
        """Each example's padded length in tokens, from the offsets alone (no example is read); a nested example
        counts its longest part. None without token ids."""
        names = [name for name in self.sequences if name == "input_ids" or name.endswith(".input_ids")]
        if not names:
            return None
        longest = np.max([np.diff(self.sequences[name][1].whole()) for name in names], axis=0)
        return longest.tolist()


class _DiskArray:
    """A 1-D .npy array read with pread, a few elements at a time.

    Why not a memory map: pages of a freshly written file sit in the page cache as large folios, and mapping them
    maps whole 2 MB blocks (madvise does not stop it on this kernel), so a few thousand random examples pulled ~800 MB
    of a 2-million-example column into the process's resident set (reclaimable page cache, but counted in RSS and by
    memory limits). A pread copies exactly the bytes asked for; the kernel still caches the file for reuse."""

    def __init__(self, path: Path) -> None:
        with path.open("rb") as file:
            major, _ = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(file)
            self.start = file.tell()
        self.dtype, self.length = np.dtype(dtype), int(shape[0])
        self.path = path

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, stop: int) -> np.ndarray:
        # Opened per read, not held: a finaliser closing a held descriptor would run Python code at whatever moment
        # the garbage collector picks, and a Ctrl-C arriving then would be swallowed with the finaliser's exception.
        size = self.dtype.itemsize
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(descriptor, (stop - start) * size, self.start + start * size)
        finally:
            os.close(descriptor)
        if len(data) != (stop - start) * size:
            raise UserError(f"the example store file {self.path} is shorter than its header says (damaged); delete "
                            f"{self.path.parent.parent} and run again to rebuild it")
        return np.frombuffer(data, dtype=self.dtype)

    def whole(self) -> np.ndarray:
        return self.read(0, self.length)


class _WritableExample(dict):
    """An example read from a store; what an objective writes into it is remembered by the store."""

    def __init__(self, values: dict[str, Any], store: StoredExamples, index: int) -> None:
        super().__init__(values)
        self._store, self._index = store, index

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._store.remember(self._index, key, value)
