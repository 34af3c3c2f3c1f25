"""What loading a model needs to know of the task it is loaded for.

`deltatune.tasks.Task` provides it; the loaders here take it as an argument instead of importing the task registry,
which sits above them (a task's hooks themselves call these loaders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn


class ModelHead(Protocol):
    """The task's name, its transformers Auto class (or None), whether it ends in a new head of `num_labels`
    outputs, and its loading hooks."""

    name: str
    auto_class: str | None
    labelled: bool

    def load_pretrained(self, directory: Path, num_labels: int | None, allow_pickle: bool = False) -> nn.Module:
        """The model saved in a transformers directory, with the task's head (`allow_pickle`: see
        ModelConfig.allow_pickle)."""
        ...

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Fix-ups every loaded model gets for the task."""
        ...

    def directory_processor(self, directory: Path) -> Any:
        """What a transformers directory's inputs need for the task (a tokenizer, an image processor)."""
        ...

    def assemble_model(self, cfg: Any) -> nn.Module:
        """A model built from other models (model.name dual-encoder: two towers) for this task."""
        ...

    def assemble_processor(self, cfg: Any) -> Any:
        """The processor of an assembled model."""
        ...
