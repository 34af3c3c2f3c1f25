"""Loading transformers directories: the task's Auto class, fp32 on CPU, with the new head sized to the labels.

transformers is imported inside the functions so that importing deltatune stays fast and silent.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from deltatune.errors import UserError

if TYPE_CHECKING:
    from deltatune.models.head import ModelHead


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration, then restore the user's settings.

    A fresh head always shows up as "MISSING" keys in a multi-line report; that is expected here, not news.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_transformers_model(directory: Path, task: ModelHead, num_labels: int | None) -> nn.Module:
    """The model in `directory` with the task's Auto class; labelled tasks get a head of `num_labels` outputs."""
    import transformers

    auto = getattr(transformers, str(task.auto_class))
    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(directory)
    if type(config) not in auto._model_mapping:
        raise UserError(f"{config.model_type!r} model in {directory} has no {task.name} variant in transformers; "
                        f"set model.task to another task or pick another model")
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if task.labelled:
        # A checkpoint fine-tuned for another label count gets a fresh head instead of a size-mismatch crash.
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    with quiet_transformers():
        return auto.from_pretrained(directory, **kwargs)


def load_tokenizer(directory: Path, **kwargs: Any) -> Any:
    """The tokenizer saved in `directory` (kwargs: e.g. gguf_file), with a pad token so batches can be padded."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"no usable tokenizer in {directory} ({exc}); save one there with "
                        f"tokenizer.save_pretrained") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Padded positions are masked out, so reusing EOS is harmless and the usual choice for decoders.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
