"""A dataset's raw rows seen through a task's columns: what a task's `encode` reads.

Tasks ask for values by role ("text", "label", "image", ...), never by the file's column names, so a run can map any
file onto a task with `data.columns` and the task code stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.data.labels import EncodedLabels, encode_labels
from deltatune.data.sources import column_values, text_values
from deltatune.data.unlabelled import UNLABELLED, is_blank
from deltatune.errors import UserError

Row = dict[str, Any]


@dataclass
class Table:
    """Raw rows plus the run's role -> column mapping (only the roles this run uses are keys of `columns`)."""

    rows: list[Row]
    columns: dict[str, str]
    source: str  # how error messages name the dataset, e.g. "dataset 'reviews.jsonl'"
    label_names: tuple[str, ...] | None = None  # names of integer labels 0..N-1, when the dataset alias knows them
    base_dir: Path | None = None  # the data file's folder: relative file paths in the rows start there
    # Class ids of every row of the whole dataset, when `rows` is one chunk of it (the on-disk example cache encodes
    # a file chunk by chunk; ids must not depend on which labels a chunk happens to hold).
    encoded_labels: EncodedLabels | None = None
    chunk: bool = False  # `rows` is one chunk of a file with more: checks over every row cannot be made here

    def has(self, role: str) -> bool:
        """Whether this run reads `role` (optional roles are read only when data.columns names them)."""
        return role in self.columns

    def values(self, role: str, indices: list[int]) -> list[Any]:
        """The role's values for the given rows; a missing cell is a UserError naming the row."""
        return column_values(self.rows, indices, self.columns[role], self.source)

    def texts(self, role: str, indices: list[int]) -> list[str]:
        """The role's values as strings (numbers become their string form)."""
        return text_values(self.rows, indices, self.columns[role], self.source)

    def filled_texts(self, role: str, indices: list[int]) -> list[str]:
        """`texts`, refusing an empty or blank cell with a one-line UserError naming the row and its column."""
        texts = self.texts(role, indices)
        for index, text in zip(indices, texts):
            if not text.strip():
                raise UserError(f"row {index} of {self.source} has an empty '{self.columns[role]}' ({role}); fill "
                                "it in or drop that row")
        return texts

    def labels(self, role: str, num_labels: int | None) -> EncodedLabels:
        """Class ids for every row of the table (not only a split's rows), so ids never depend on the split.

        `num_labels` (the model's head size, if fixed) widens the allowed integer range beyond the distinct labels.
        """
        if self.encoded_labels is not None:
            return self.encoded_labels
        column = self.columns[role]
        return label_ids([row.get(column) for row in self.rows], column, num_labels, self.label_names)


def label_ids(values: list[Any], column: str, num_labels: int | None,
              label_names: tuple[str, ...] | None) -> EncodedLabels:
    """Class ids of a label column's values, UNLABELLED where a cell is blank (rows without a label reach here only
    when the objective reads them)."""
    blank = {index for index, value in enumerate(values) if is_blank(value)}
    encoded = encode_labels([value for index, value in enumerate(values) if index not in blank], column, num_labels,
                            label_names)
    ids = [UNLABELLED] * len(values)
    filled = (index for index in range(len(values)) if index not in blank)
    for index, label in zip(filled, encoded.ids):
        ids[index] = label
    return EncodedLabels(ids, encoded.num_labels, encoded.label_names)
