"""Raw rows from an embedded alias, a .jsonl/.csv/.tsv/.parquet file, or an image folder.

Rows are plain dicts keyed by the file's own column names; mapping columns to roles (text, label, ...) happens later
in the tasks (`data.columns`), so one loader serves every task. Image-folder rows are keyed by the configured image
and label columns so the same mapping selects them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from deltatune.config.schema import DataConfig
from deltatune.data.aliases import ALIASES
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
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return read_parquet(path)
    raise UserError(
        f"unsupported data file extension '{path.suffix or '(none)'}' for {path}; "
        f"use one of {', '.join(FILE_SUFFIXES)} or an image folder"
    )


def read_jsonl(path: Path) -> list[Row]:
    """One JSON object per line; blank lines are skipped."""
    rows: list[Row] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                message = f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove that line"
                raise UserError(message) from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number} is a JSON {type(record).__name__}, not an object; "
                                "write one {\"column\": value, ...} object per line")
            rows.append(record)
    return rows


def read_csv(path: Path, delimiter: str = ",") -> list[Row]:
    """A CSV/TSV file with a header row. Cells stay strings; labels like "3" become integers later."""
    # utf-8-sig drops the byte-order mark Excel writes, which would otherwise glue itself to the first column name
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise UserError(f"{path} has no header row; the first line must name the columns")
        # DictReader files surplus cells under the key None; that is almost always a quoting mistake
        rows: list[Row] = []
        for number, record in enumerate(reader, start=2):
            if None in record:
                raise UserError(f"{path} line {number} has more cells than the header; quote cells that contain "
                                f"'{delimiter}'")
            rows.append(dict(record))
    return rows


def read_parquet(path: Path) -> list[Row]:
    """A parquet table via pyarrow, as a list of row dicts."""
    import pyarrow.parquet as pq  # heavy import, only when a parquet file is used

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise UserError(f"cannot read parquet file {path} ({exc}); check that it is a valid parquet file") from None
    return table.to_pylist()


def load_image_folder(folder: Path, image_column: str, label_column: str) -> list[Row]:
    """One subfolder per class (class = subfolder name); rows hold the image file path, decoded later.

    Files are listed in sorted order per sorted class so row indices are stable. Files with other extensions
    (notes, thumbnails databases, hidden files) are skipped.
    """
    folder = folder.resolve()  # absolute paths keep working if the working directory changes later
    classes = sorted(child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    if not classes:
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
    """Values of one column for the given rows; a missing cell is a UserError naming the row."""
    values: list[Any] = []
    for index in indices:
        value = rows[index].get(column)
        if value is None:
            raise UserError(f"row {index} of {source} has no value in column '{column}'; fill it in or drop that row")
        values.append(value)
    return values


def text_values(rows: list[Row], indices: list[int], column: str, source: str) -> list[str]:
    """A text column as strings (numbers become their string form; missing cells are errors)."""
    return [value if isinstance(value, str) else str(value) for value in column_values(rows, indices, column, source)]
