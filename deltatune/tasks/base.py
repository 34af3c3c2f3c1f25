"""What a task declares: the data roles it reads, how rows become examples, the model head it needs, its default
objective, and how `eval` / `export` / `generate` treat its runs.

A task is stateless; everything run-specific (the DataConfig, the processor, the label count) is passed in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator

from torch import nn

from deltatune.errors import UserError, closest_names

if TYPE_CHECKING:  # the data package imports torch-heavy encoders; tasks import it only where they use it
    from deltatune.config.schema import DataConfig
    from deltatune.data import DatasetBundle
    from deltatune.data.table import Table


class Task(ABC):
    """Subclass, fill in the class attributes and `encode`, and register with `@register_task(name)`.

    Hooks with defaults: `load_pretrained` (the transformers head), `adapt_model` (fix-ups after any load) and
    `directory_processor` (what a transformers directory's inputs need).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Data role -> default column. A role whose default is None is optional: read only when data.columns names it.
    roles: ClassVar[dict[str, str | None]] = {}
    default_objective: ClassVar[str] = ""  # the objective `objective.name: auto` picks
    # The transformers Auto class that loads a directory or GGUF with this task's head (also used to reload an
    # export); None when the task has no transformers head.
    auto_class: ClassVar[str | None] = None
    labelled: ClassVar[bool] = False  # the model ends in a new head of `num_labels` outputs
    # `model.task: auto` on a transformers directory picks the task whose suffix ends one of config.json's
    # `architectures`; the fallback task takes architectures no task names (bare encoders such as BertModel).
    architecture_suffixes: ClassVar[tuple[str, ...]] = ()
    architecture_fallback: ClassVar[bool] = False
    can_generate: ClassVar[bool] = False  # `deltatune generate` accepts its runs

    def columns(self, data: DataConfig) -> dict[str, str]:
        """role -> column for this run: data.columns over the defaults; optional roles only when given.

        An unknown role is a UserError naming the task's roles.
        """
        for role in data.columns:
            if role not in self.roles:
                close = closest_names(role, list(self.roles), limit=1)
                guess = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"data.columns has role {role!r}{guess}, which task {self.name!r} does not read; "
                                f"its roles are {', '.join(self.roles)}")
        chosen = {role: default for role, default in self.roles.items() if default is not None}
        return chosen | dict(data.columns)

    @abstractmethod
    def encode(self, table: Table, splits: dict[str, list[int]], data: DataConfig, processor: Any,
               num_labels: int | None) -> DatasetBundle:
        """Examples for each split (`splits` holds row indices into `table`) and the collate function.

        `processor` is whatever `deltatune.models.load_processor` returned for the model (check that it fits);
        `num_labels` is the model's head size when fixed by the config.
        """

    def pack_train(self, examples: Iterable[Any], data: DataConfig) -> Iterator[Any] | None:
        """The train split's examples packed into fewer, longer ones as `data` asks (causal-LM packing), or None when
        this task does not pack. `encode` packs in memory; the on-disk example cache (`deltatune.data.cached`)
        encodes rows chunk by chunk unpacked and packs the whole train split through this hook afterwards, so both
        paths give the same examples."""
        return None

    def load_pretrained(self, directory: Path, num_labels: int | None, allow_pickle: bool = False) -> nn.Module:
        """The model saved in a transformers directory, with this task's head (override for another builder)."""
        from deltatune.models.hf import load_transformers_model

        if self.auto_class is None:
            raise UserError(f"task {self.name!r} has no transformers head; load its model with model.name "
                            f"set to package.module:function")
        return load_transformers_model(directory, self, num_labels, allow_pickle)

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Fix-ups every loaded model gets for this task (whatever its source); returns the model to train."""
        return model

    def assemble_model(self, cfg: Any) -> nn.Module:
        """The model `model.name: dual-encoder` stands for, built from the models `cfg` (a ModelConfig) names; only a
        task whose examples pair images with texts assembles one."""
        raise UserError(f"model.name dual-encoder pairs an image and a text tower for task image-text, not for task "
                        f"{self.name!r}; set model.task=image-text or name a single model")

    def assemble_processor(self, cfg: Any) -> Any:
        """The processor of `assemble_model`'s model."""
        return self.assemble_model(cfg)  # refused the same way

    def directory_processor(self, directory: Path) -> Any:
        """What a transformers directory's inputs need for this task: by default its tokenizer."""
        from deltatune.models.hf import load_tokenizer

        return load_tokenizer(directory)
