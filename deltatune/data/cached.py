"""Data files larger than memory: rows are read in chunks, encoded by the task chunk by chunk and written once to an
on-disk example store (`deltatune.data.store`); runs read examples from it as batches need them, and a later run
with the same file and settings reuses it without reading the file's rows again.

The store lives under `$DELTATUNE_CACHE/data/<key>` (default `~/.cache/deltatune`). The key hashes the data file's
bytes, the data section of the config, the task and its label count, the tokenizer (its vocabulary, chat template and
padding side), saved splits when a run gives them, and the source of deltatune's data and task code, so any change
that could change an example writes a new store. `data.cache: false` keeps the examples in memory as before.

Two passes over the file: the first counts rows and collects what needs the whole table (label values, so class ids
never depend on a chunk; split group keys), the second encodes. Peak memory is then one chunk's rows and examples
plus the per-row indices of the splits, not the dataset. The task's packing (`Task.pack_train`) runs over the whole
stored train split afterwards, so packed sequences are the same as the in-memory path's.

Data that cannot be stored (examples holding tensors or text, a second `data.unlabelled` file, hidden labels for
experiments) is built in memory; `applies` says which.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import pickle
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from deltatune.config.schema import DataConfig
from deltatune.data import DatasetBundle
from deltatune.data.aliases import ALIASES
from deltatune.data.sources import FILE_SUFFIXES, iter_file_rows, require_columns, text_values
from deltatune.data.splits import SPLIT_NAMES, check_splits, make_splits
from deltatune.data.store import NotStorable, StoredExamples, StoreWriter, read_meta
from deltatune.data.table import Table, label_ids
from deltatune.data.unlabelled import is_blank, refuse_unlabelled, train_takes_unlabelled
from deltatune.errors import UserError

Task = Any  # a deltatune.tasks.base.Task (the tasks sit above this package and hand themselves in)
CHUNK_ROWS = 20_000
PACK_CHUNK = 2_000


def applies(cfg: DataConfig) -> bool:
    """Whether this data goes through the on-disk store: a .jsonl/.csv/.tsv/.parquet file with `data.cache` on, no
    second unlabelled file and no hidden labels (those experiments stay in memory)."""
    path = Path(cfg.name).expanduser()
    return (cfg.cache and cfg.name not in ALIASES and path.suffix.lower() in FILE_SUFFIXES and path.is_file()
            and cfg.unlabelled is None and cfg.labelled_fraction is None)


def build_cached(cfg: DataConfig, task: Task, processor: Any, splits: dict[str, list[int]] | None,
                 num_labels: int | None, reads_unlabelled: bool) -> DatasetBundle | None:
    """The dataset from its store, written first when missing; None when its examples cannot be stored."""
    from deltatune.models.disk_cache import cache_root

    folder = cache_root() / "data" / cache_key(cfg, task, processor, splits, num_labels, reads_unlabelled)
    refused = folder.with_name(f"{folder.name}.not-storable")  # remembered, so the next run does not try again
    if read_meta(folder) is None and not refused.exists():
        try:
            _write_store(folder, cfg, task, processor, splits, num_labels, reads_unlabelled)
        except NotStorable:
            refused.parent.mkdir(parents=True, exist_ok=True)
            refused.touch()
    return None if refused.exists() else open_store(folder)


def open_store(folder: Path) -> DatasetBundle:
    meta = read_meta(folder)
    if meta is None:
        raise UserError(f"the example cache {folder} is incomplete; delete it and run again")
    parts = {name: StoredExamples(folder / meta["split_folders"][name], meta["splits"][meta["split_folders"][name]])
             for name in SPLIT_NAMES}
    rows = {name: np.load(folder / f"rows.{name}.npy").tolist() for name in SPLIT_NAMES}
    collate = pickle.loads((folder / "collate.pkl").read_bytes())
    label_names = meta["label_names"]
    return DatasetBundle(parts["train"], parts["validation"], parts["test"], collate, meta["num_labels"],
                         list(label_names) if label_names is not None else None, rows, packed=meta["packed"])


def _write_store(folder: Path, cfg: DataConfig, task: Task, processor: Any, given: dict[str, list[int]] | None,
                 num_labels: int | None, reads_unlabelled: bool) -> None:
    columns = task.columns(cfg)
    source = f"dataset '{cfg.name}'"
    label_column = columns.get("label") if task.labelled else None
    survey = _survey(cfg, columns, label_column, source)
    chosen = check_splits(given, survey.rows) if given is not None else make_splits(
        survey.rows, cfg.split, cfg.max_examples, survey.groups)
    if not chosen["train"]:
        raise UserError(f"the train split of '{cfg.name}' is empty; add rows or lower data.split fractions")
    blank = [index for index, value in enumerate(survey.labels or []) if is_blank(value)]
    if blank and not reads_unlabelled:
        refuse_unlabelled(blank, label_column, source)
    chosen = train_takes_unlabelled(chosen, blank) if blank else chosen
    encoded = label_ids(survey.labels, label_column, num_labels, None) if label_column is not None else None
    writer = StoreWriter(folder)
    try:
        last = _encode_chunks(writer, cfg, task, processor, chosen, columns, source, encoded, num_labels)
        for name in SPLIT_NAMES:
            writer.close_split(name)  # a split left empty (validation 0) still gets its (empty) folder
        train_folder = "train"
        packed = task.pack_train(iter(StoredExamples(writer.partial / "train", writer.described["train"])), cfg)
        if packed is not None:
            train_folder = "train.packed"
            for chunk in iter(lambda: list(itertools.islice(packed, PACK_CHUNK)), []):
                writer.add(train_folder, chunk)
            writer.close_split(train_folder)
            writer.drop_split("train")  # the unpacked examples were only the packing's input
        for name in SPLIT_NAMES:
            np.save(writer.partial / f"rows.{name}.npy", np.asarray(chosen[name], dtype=np.int64))
        (writer.partial / "collate.pkl").write_bytes(pickle.dumps(last.collate))
        writer.finish({"split_folders": {"train": train_folder, "validation": "validation", "test": "test"},
                       "num_labels": last.num_labels, "label_names": last.label_names, "packed": packed is not None,
                       "rows": survey.rows, "source": cfg.name})
    except BaseException:
        writer.abort()
        raise


def _encode_chunks(writer: StoreWriter, cfg: DataConfig, task: Task, processor: Any, chosen: dict[str, list[int]],
                   columns: dict[str, str], source: str, encoded: Any, num_labels: int | None) -> DatasetBundle:
    """Encode the file chunk by chunk with the task's own `encode` (unpacked) into the store; the last chunk's
    bundle (its collate function, label count and names) describes them all."""
    unpacked = replace(cfg, packing=False)
    base_dir = Path(cfg.name).expanduser().parent
    last = None
    for start, rows in _chunks(cfg):
        window = _RowWindow(rows, start)
        local = {name: _within(chosen[name], start, start + len(rows)) for name in SPLIT_NAMES}
        taken = [index for name in SPLIT_NAMES for index in local[name][:1]]
        if not taken:
            continue  # rows data.max_examples left out
        # A split without rows in this chunk encodes one borrowed row, dropped after: tokenizers refuse empty lists.
        whole = start == 0 and len(rows) < CHUNK_ROWS  # a first chunk short of full is the whole file
        table = Table(window, columns, source, base_dir=base_dir, encoded_labels=encoded,  # type: ignore[arg-type]
                      chunk=not whole)
        bundle = task.encode(table, {name: local[name] or taken[:1] for name in SPLIT_NAMES}, unpacked, processor,
                             num_labels)
        for name in SPLIT_NAMES:
            if local[name]:
                writer.add(name, getattr(bundle, name))
        last = bundle
    assert last is not None  # the survey found rows
    return last


def _within(indices: list[int], start: int, end: int) -> list[int]:
    """The sorted `indices` that fall in [start, end)."""
    return indices[bisect.bisect_left(indices, start) : bisect.bisect_left(indices, end)]


def _chunks(cfg: DataConfig) -> Iterator[tuple[int, list[dict]]]:
    rows = iter_file_rows(cfg)
    start = 0
    while chunk := list(itertools.islice(rows, CHUNK_ROWS)):
        yield start, chunk
        start += len(chunk)


class _Survey:
    def __init__(self) -> None:
        self.rows = 0
        self.labels: list[Any] | None = None
        self.groups: list[str] | None = None


def _survey(cfg: DataConfig, columns: dict[str, str], label_column: str | None, source: str) -> _Survey:
    """First pass: the row count, every row's label value (class ids span the whole file) and split group key."""
    survey = _Survey()
    survey.labels = [] if label_column is not None else None
    survey.groups = [] if cfg.split.group else None
    for start, rows in _chunks(cfg):
        if start == 0:
            require_columns(rows, {f"columns.{role}": column for role, column in columns.items()}, source)
            if cfg.split.group:
                require_columns(rows, {"split.group": cfg.split.group}, source)
        if survey.labels is not None:
            # one shared object per distinct class name: millions of rows hold a handful of labels
            survey.labels += [sys.intern(value) if isinstance(value, str) else value
                              for value in (row.get(label_column) for row in rows)]
        if survey.groups is not None:
            keys = text_values(_RowWindow(rows, start), range(start, start + len(rows)), cfg.split.group, source)
            survey.groups += [sys.intern(key) for key in keys]
        survey.rows += len(rows)
    if not survey.rows:
        raise UserError(f"dataset '{cfg.name}' has no rows; point data.name at a file or folder with examples")
    return survey


class _RowWindow(Sequence):
    """One chunk of a file's rows addressed by their row numbers in the whole file (so messages name the right
    row): rows[start + i] is chunk[i]."""

    def __init__(self, rows: list[dict], start: int) -> None:
        self.rows, self.start = rows, start

    def __len__(self) -> int:
        return self.start + len(self.rows)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            raise TypeError("a row window is read by row number")
        if not self.start <= index < len(self):
            raise IndexError(f"row {index} is outside this chunk")
        return self.rows[index - self.start]


def cache_key(cfg: DataConfig, task: Task, processor: Any, splits: dict[str, list[int]] | None,
              num_labels: int | None, reads_unlabelled: bool) -> str:
    """What every example of the store depends on, hashed (see the module text)."""
    digest = hashlib.sha256()
    # the file is hashed by its bytes below, so the same file named by another path (relative, absolute) matches
    settings = {"data": {**dataclasses.asdict(cfg), "name": None}, "task": task.name, "num_labels": num_labels,
                "reads_unlabelled": reads_unlabelled, "processor": processor_fingerprint(processor),
                "code": code_fingerprint(task), "python": sys.version_info[:2], "libraries": library_versions()}
    digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    with Path(cfg.name).expanduser().open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if splits is not None:
        digest.update(json.dumps({name: list(splits[name]) for name in SPLIT_NAMES}).encode())
    return digest.hexdigest()[:24]


def processor_fingerprint(processor: Any) -> str:
    """A hash of what tokenisation depends on: a fast tokenizer's full definition (vocabulary, normaliser, merges),
    its chat template, special tokens and padding side; other processors by their repr."""
    backend = getattr(processor, "backend_tokenizer", None)
    parts = [type(processor).__name__, repr(getattr(processor, "chat_template", None)),
             repr(getattr(processor, "padding_side", None)), repr(getattr(processor, "truncation_side", None)),
             repr(getattr(processor, "special_tokens_map", None)),
             repr(getattr(processor, "model_max_length", None))]
    if backend is not None:
        # truncation and padding are per-call settings the tokenizer keeps from its last call, not its definition
        definition = {key: value for key, value in json.loads(backend.to_str()).items()
                      if key not in ("truncation", "padding")}
        parts.append(json.dumps(definition, sort_keys=True))
    else:
        parts.append(repr(processor))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def code_fingerprint(task: Task) -> str:
    """A hash of deltatune's data and task code and of the task's own source file (a user's task registered from
    their own module): a change in how rows become examples must not reuse old stores."""
    import inspect

    root = Path(__file__).resolve().parents[1]
    files = sorted([*root.glob("data/*.py"), *root.glob("tasks/*.py")])
    try:
        own = inspect.getsourcefile(type(task))
    except TypeError:  # a class without a source file (built in a notebook cell): its name is in the key already
        own = None
    if own and Path(own).resolve() not in files:
        files.append(Path(own).resolve())
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """The versions of the libraries that turn text into token ids (chat templates render through jinja2)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("transformers", "tokenizers", "jinja2", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return versions
