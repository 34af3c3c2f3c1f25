"""Checks made before a run builds or writes anything, so a run that cannot finish fails in its first second
instead of after its training steps: the output directory is writable and has room for a checkpoint, and the
validation metric is one the objective reports. (Ranges and choices of single config fields are the parser's job,
`deltatune.config.constraints`; whether `train.device` exists here is `loop.resolve_device`'s.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from deltatune.errors import UserError, closest_names
from deltatune.objectives.base import Objective

ADAM_COPIES = 3  # a step checkpoint holds the trainable weights and AdamW's two moments of each


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (where creating `path` would start)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(run_path: Path) -> None:
    """The run directory can be created (or, when it exists, written): refuse a file in the way, a read-only
    directory or a full disk by creating and removing a small probe file where the run will write first."""
    start = nearest_existing(run_path)
    if not start.is_dir():
        raise UserError(f"cannot create the run directory {run_path}: {start} is a file, not a directory; "
                        f"set output_dir (or run_name) to a directory path")
    try:
        handle, probe = tempfile.mkstemp(prefix=".deltatune-write-probe-", dir=start)
        try:
            os.write(handle, b"\0" * 4096)  # a few bytes: a full disk refuses them, an empty file would pass
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        raise UserError(f"cannot write in {start} ({error.strerror}); make it writable or set output_dir to a "
                        f"writable directory") from None


def check_free_space(run_path: Path, model: nn.Module) -> None:
    """Refuse to start when the disk cannot hold even one step checkpoint of `model`'s trainable weights."""
    seen = {id(p): p for p in model.parameters() if p.requires_grad}
    needed = ADAM_COPIES * sum(p.numel() * p.element_size() for p in seen.values())
    start = nearest_existing(run_path)
    free = shutil.disk_usage(start).free
    if free < needed:
        raise UserError(f"{start} has {free / 2**20:.1f} MiB free but one checkpoint of this run needs about "
                        f"{needed / 2**20:.1f} MiB; free space there or set output_dir to a bigger disk")


def check_metric(metric: str, objective: type[Objective]) -> None:
    """`train.metric` must be "auto" or a metric the objective's `evaluate` reports."""
    if metric == "auto" or metric in objective.metrics:
        return
    choices = ["auto", *objective.metrics]
    close = closest_names(metric, choices, limit=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown train.metric {metric!r}{guess}; the {objective.name} objective reports: "
                    f"{', '.join(choices)}")
