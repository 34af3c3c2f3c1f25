"""Loading transformers directories: the Auto class per task, fp32 on CPU, with the new head sized to the labels.

transformers is imported inside the functions so that importing deltatune stays fast and silent.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from deltatune.errors import UserError

AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}


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


def load_transformers_model(directory: Path, task: str, num_labels: int | None) -> nn.Module:
    """The model in `directory` with the task's Auto class; labelled tasks get a head of `num_labels` outputs."""
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[task])
    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(directory)
    if type(config) not in auto._model_mapping:
        raise UserError(f"{config.model_type!r} model in {directory} has no {task} variant in transformers; set "
                        f"model.task to another task or pick another model")
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if task != "causal-lm":
        # A checkpoint fine-tuned for another label count gets a fresh head instead of a size-mismatch crash.
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    with quiet_transformers():
        model = auto.from_pretrained(directory, **kwargs)
    if task == "classification":
        _ensure_pad_token_id(model.config)
    return model


def _ensure_pad_token_id(config: Any) -> None:
    """Decoder classifiers pick the last non-pad token, so they refuse batches unless pad_token_id is set.

    Use end-of-sequence, matching `load_tokenizer`, which pads with the EOS token when there is no pad token.
    """
    if getattr(config, "pad_token_id", None) is not None:
        return
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is not None:
        config.pad_token_id = eos


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
