"""Raw rows from an embedded alias, a .jsonl/.csv/.tsv/.parquet file, or an image folder.

Rows are plain dicts keyed by the file's own column names; mapping columns to roles (text, label, ...) happens later
in the tasks (`data.columns`), so one loader serves every task. Image-folder rows are keyed by the configured image
and label columns so the same mapping selects them. Text files are read as UTF-8 unless `data.encoding` names
another codec (see `read_text_file`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path
from typing import Any, Iterator

from deltatune.config.schema import DataConfig
from deltatune.data.aliases import ALIASES
from deltatune.data.reading import iter_lines
from deltatune.errors import UserError, closest_names

Row = dict[str, Any]

FILE_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_rows(cfg: DataConfig) -> list[Row]:
    """All rows of the configured dataset, in a deterministic order (the order saved split indices refer to)."""
    name = cfg.name
    if name in ALIASES:
        rows = ALIASES[name].loader()
    else:
        rows = _load_path(name, cfg)
    if not rows:
        raise UserError(f"dataset '{name}' has no rows; point data.name at a file or folder with examples")
    return rows


def _load_path(name: str, cfg: DataConfig) -> list[Row]:
    """Rows from a path, with a message that tells a mistyped alias from a missing file."""
    path = Path(name).expanduser()
    if path.is_symlink() and not path.exists():
        raise UserError(f"data.name '{name}' is a symbolic link to nothing (broken or a loop); point it at the real "
                        "file or folder")
    if not path.exists():
        looks_like_path = any(sep in name for sep in ("/", "\\")) or path.suffix.lower() in FILE_SUFFIXES
        if looks_like_path:
            raise UserError(
                f"data file '{name}' not found; check data.name (relative paths start at the current directory)"
            )
        hint = ", ".join(closest_names(name, list(ALIASES), limit=1))
        raise UserError(
            f"unknown dataset '{name}' (did you mean {hint}?); valid aliases: {', '.join(ALIASES)}, "
            f"or give a path to a {'/'.join(FILE_SUFFIXES)} file or an image folder"
        )
    if path.is_dir():
        # Folder rows are keyed by the run's image and label columns, so the tasks' roles find them.
        return load_image_folder(path, cfg.columns.get("image", "image"), cfg.columns.get("label", "label"))
    if not path.is_file():  # a FIFO or a device would block or never end
        raise UserError(f"data.name '{name}' is not a regular file; point it at a {'/'.join(FILE_SUFFIXES)} file "
                        "or an image folder")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, cfg.encoding)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, delimiter="\t" if suffix == ".tsv" else ",", encoding=cfg.encoding)
    if suffix == ".parquet":
        return read_parquet(path)
    raise UserError(
        f"unsupported data file extension '{path.suffix or '(none)'}' for {path}; "
        f"use one of {', '.join(FILE_SUFFIXES)} or an image folder"
    )


def read_text_file(path: Path, encoding: str = "auto") -> str:
    """The whole file decoded as text (see `deltatune.data.reading` for the encoding rules and errors)."""
    return "".join(iter_lines(path, encoding))


def read_jsonl(path: Path, encoding: str = "auto") -> list[Row]:
    """One JSON object per line; blank lines are skipped."""
    return list(iter_jsonl(path, encoding))


def iter_jsonl(path: Path, encoding: str = "auto") -> Iterator[Row]:
    """`read_jsonl` a line at a time."""
    for number, line in enumerate(iter_lines(path, encoding), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            message = f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove that line"
            raise UserError(message) from None
        except RecursionError:  # e.g. [[[[...]]]] nested deeper than the parser goes
            raise UserError(f"{path} line {number} nests JSON too deeply; write one flat object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is a JSON {type(record).__name__}, not an object; "
                            "write one {\"column\": value, ...} object per line")
        yield record


def read_csv(path: Path, delimiter: str = ",", encoding: str = "auto") -> list[Row]:
    """A CSV/TSV file with a header row. Cells stay strings; labels like "3" become integers later."""
    return list(iter_csv(path, delimiter, encoding))


def iter_csv(path: Path, delimiter: str = ",", encoding: str = "auto") -> Iterator[Row]:
    """`read_csv` a record at a time (the csv module sees the line ends, which matter inside quoted cells)."""
    reader = csv.DictReader(iter_lines(path, encoding), delimiter=delimiter)
    with _field_size_limit(path.stat().st_size + 1):  # no cell is longer than the file, so long valid cells load
        try:
            header = reader.fieldnames
            if not header:
                raise UserError(f"{path} has no header row; the first line must name the columns")
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise UserError(f"{path} header names column '{repeated[0]}' more than once; give every column a "
                                "distinct name")
            # DictReader files surplus cells under the key None; that is almost always a quoting mistake
            for number, record in enumerate(reader, start=2):
                if None in record:
                    raise UserError(f"{path} line {number} has more cells than the header; quote cells that contain "
                                    f"'{delimiter}'")
                if delimiter == "\t" and any(_swallowed_lines(value) for value in record.values()):
                    # a cell that opens with a stray '"' runs on, quietly eating the rows after it, to the next '"'
                    raise UserError(f"{path} line {number}: a cell that starts with a quote runs over several lines "
                                    "holding tabs (the rows after it); remove the stray '\"' or close its quote")
                yield dict(record)
        except csv.Error as exc:
            raise UserError(f"{path} line {reader.line_num} is not valid CSV ({exc}); fix its quoting") from None


def _swallowed_lines(value: Any) -> bool:
    return isinstance(value, str) and "\t" in value and ("\n" in value or "\r" in value)


@contextlib.contextmanager
def _field_size_limit(size: int) -> Iterator[None]:
    """Raise the csv module's per-cell limit (131,072 characters by default) to `size` for the duration.

    The limit is process-wide, so it is restored afterwards; 2**31 - 1 is the largest value every platform's C long
    holds.
    """
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, min(size, 2**31 - 1)))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_parquet(path: Path) -> list[Row]:
    """A parquet table via pyarrow, as a list of row dicts."""
    return list(iter_parquet(path))


def iter_parquet(path: Path, batch_rows: int = 8192) -> Iterator[Row]:
    """`read_parquet` a record batch at a time."""
    import pyarrow.parquet as pq  # heavy import, only when a parquet file is used

    def refused(exc: Exception) -> UserError:  # pyarrow raises several unrelated types for a damaged file
        reason = " ".join(str(exc).split())  # pyarrow's messages can span lines; the error must stay one line
        return UserError(f"cannot read parquet file {path} ({reason}); check that it is a valid parquet file")

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        for batch in batches:
            yield from batch.to_pylist()
    except UserError:
        raise
    except Exception as exc:
        raise refused(exc) from None


def iter_file_rows(cfg: DataConfig) -> Iterator[Row]:
    """The rows of the data file `cfg.name` names (not an alias nor an image folder), one at a time."""
    path = Path(cfg.name).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return iter_jsonl(path, cfg.encoding)
    if suffix in (".csv", ".tsv"):
        return iter_csv(path, delimiter="\t" if suffix == ".tsv" else ",", encoding=cfg.encoding)
    return iter_parquet(path)


def load_image_folder(folder: Path, image_column: str, label_column: str) -> list[Row]:
    """One subfolder per class (class = subfolder name); rows hold the image file path, decoded later.

    Files are listed in sorted order per sorted class so row indices are stable. Files with other extensions
    (notes, thumbnails databases, hidden files) are skipped.
    """
    folder = folder.resolve()  # absolute paths keep working if the working directory changes later
    classes = sorted(child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    if not classes:
        data_files = sorted(child.name for child in folder.iterdir() if child.suffix.lower() in FILE_SUFFIXES)
        if data_files:
            raise UserError(f"data.name {folder} is a folder, read as an image folder, but it holds {data_files[0]}; "
                            f"set data.name to that file")
        raise UserError(f"image folder {folder} has no subfolders; put each class's images in its own subfolder")
    rows: list[Row] = []
    for name in classes:
        for file in sorted((folder / name).rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                rows.append({image_column: str(file), label_column: name})
    if not rows:
        raise UserError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}) in its class subfolders")
    return rows


def require_columns(rows: list[Row], columns: dict[str, str], source: str) -> None:
    """Check that each configured column (DataConfig key, e.g. "columns.text" -> column name) is in the first row.

    The message names the missing columns, the config fields that chose them, and the columns that do exist.
    """
    missing = {field: column for field, column in columns.items() if column not in rows[0]}
    if missing:
        wanted = ", ".join(f"'{column}' (data.{field})" for field, column in missing.items())
        present = ", ".join(repr(name) for name in rows[0])
        raise UserError(f"column {wanted} not found in {source}; columns are {present}: point data.columns at "
                        "existing columns")


def column_values(rows: list[Row], indices: list[int], column: str, source: str) -> list[Any]:
    """Values of one column for the given rows; a missing cell (None, or NaN as pandas writes gaps) is a UserError
    naming the row."""
    values: list[Any] = []
    for index in indices:
        value = rows[index].get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise UserError(f"row {index} of {source} has no value in column '{column}'; fill it in or drop that row")
        values.append(value)
    return values


# Cell types whose str() is a Python repr, not text a model should read.
_NOT_TEXT = {dict: "a JSON object", list: "a JSON list", tuple: "a list", bytes: "bytes", bytearray: "bytes"}


def text_values(rows: list[Row], indices: list[int], column: str, source: str) -> list[str]:
    """A text column as strings (numbers become their string form; missing cells are errors).

    Objects, lists and bytes are refused: training on their Python repr ("{'a': 1}") is never what was meant.
    """
    texts: list[str] = []
    for index, value in zip(indices, column_values(rows, indices, column, source)):
        kind = _NOT_TEXT.get(type(value))
        if kind is not None:
            raise UserError(f"row {index} of {source} holds {kind} in text column '{column}', not text; store plain "
                            "strings there (or point the column option at a text column)")
        texts.append(value if isinstance(value, str) else str(value))
    return texts
