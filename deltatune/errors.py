"""Errors that reach the user as one line.

`UserError` is for bad input: the message names the problem *and* what to do about it. The CLI prints it on stderr
with exit code 2 and no traceback (``--debug`` shows the traceback). Anything else is a bug in deltatune and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message must say what to fix."""


class TrainingDiverged(UserError):
    """Training stopped at a non-finite loss, gradient or weight: settings the user (or a search) chose that this
    model and data cannot train with. A hyperparameter search counts such a trial as a poor one and goes on."""


def closest_names(name: str, candidates: list[str], limit: int = 5) -> list[str]:
    """The candidates that look most like `name`, best first (for "did you mean" hints)."""
    import difflib

    return difflib.get_close_matches(name, candidates, n=limit, cutoff=0.0)[:limit]
