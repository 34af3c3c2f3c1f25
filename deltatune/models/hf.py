"""Loading transformers directories: the task's Auto class, fp32 on CPU, with the new head sized to the labels.

transformers is imported inside the functions so that importing deltatune stays fast and silent.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
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


def load_transformers_model(
    directory: Path, task: ModelHead, num_labels: int | None, allow_pickle: bool = False
) -> nn.Module:
    """The model in `directory` with the task's Auto class; labelled tasks get a head of `num_labels` outputs.

    Weight files are checked first (`deltatune.models.weight_files`): safetensors only, unless `allow_pickle` lets a
    pickle-only directory be read weights-only. Custom code is never run (no trust_remote_code).
    """
    import transformers

    from deltatune.models.weight_files import brief, check_model_directory

    pickle_file = check_model_directory(directory, allow_pickle)
    auto = getattr(transformers, str(task.auto_class))
    try:
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unknown model_type, malformed fields
        raise UserError(f"cannot read the model configuration {directory / 'config.json'} ({brief(exc)}); fix it "
                        f"or re-save the model with save_pretrained") from None
    if type(config) not in auto._model_mapping:
        raise UserError(f"{config.model_type!r} model in {directory} has no {task.name} variant in transformers; set "
                        f"model.task to another task or pick another model")
    # use_safetensors=True: transformers must never fall back to a pickle on its own
    kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": pickle_file is None, "weights_only": True}
    if task.labelled:
        # A checkpoint fine-tuned for another label count gets a fresh head instead of a size-mismatch crash; the
        # loading info says what was re-initialised, so anything outside the head is refused below.
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True)
    try:
        with quiet_transformers(), warnings.catch_warnings():
            # torch warns on stderr about pickle protocols it did not write; the refusal below says what matters
            warnings.filterwarnings("ignore", module="torch._weights_only_unpickler")
            loaded = auto.from_pretrained(directory, **kwargs)
    except Exception as exc:
        if pickle_file is None:
            raise  # safetensors were checked up front: a failure here is not the file's fault
        # An untrusted pickle fails the restricted unpickler in many ways (UnpicklingError, KeyError, EOFError...)
        raise UserError(f"torch's weights-only loader refused {pickle_file} ({type(exc).__name__}: {brief(exc)}); "
                        f"it is damaged or holds more than tensors: do not use it, get the weights as "
                        f"safetensors") from None
    if not task.labelled:
        return loaded
    model, info = loaded
    _check_mismatched_sizes(model, info.get("mismatched_keys", ()), directory)
    return model


def _check_mismatched_sizes(model: nn.Module, mismatched: Any, directory: Path) -> None:
    """UserError when a tensor inside the pretrained body had another shape in the checkpoint than the config gives
    it: `ignore_mismatched_sizes` re-initialised it at random, which is right for a head sized to other labels and
    silently wrong anywhere else (e.g. a raised max_position_embeddings). The head is what lies outside the inner
    transformer (`base_model_prefix`: BART's classification_head, XLNet's logits_proj) or what the family table
    calls the head.

    `mismatched`: transformers' loading info, (name, checkpoint shape, model shape) per tensor.
    """
    from deltatune.models.families import family_of

    family = family_of(model)
    body = getattr(model, "base_model_prefix", "")
    outside = sorted((str(name), tuple(saved), tuple(wanted)) for name, saved, wanted, *_ in mismatched
                     if not family.is_head(str(name)) and body and str(name).startswith(body + "."))
    if outside:
        name, saved, wanted = outside[0]
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise UserError(f"{name} has shape {saved} in the checkpoint in {directory} but {wanted} under its "
                        f"config.json{more}; only the task head may differ: restore config.json's sizes to the "
                        f"checkpoint's (e.g. max_position_embeddings) or use a checkpoint of those sizes")


def load_tokenizer(directory: Path, **kwargs: Any) -> Any:
    """The tokenizer saved in `directory` (kwargs: e.g. gguf_file), with a pad token so batches can be padded."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as exc:
        from deltatune.models.weight_files import brief  # transformers' messages span lines; the error must not

        raise UserError(f"no usable tokenizer in {directory} ({brief(exc)}); save one there with "
                        f"tokenizer.save_pretrained") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Padded positions are masked out, so reusing EOS is harmless and the usual choice for decoders.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.cache
def takes_logits_to_keep(model_class: type) -> bool:
    """Whether the model class's forward computes logits only for the positions asked (`logits_to_keep`,
    transformers causal LMs since 4.50); cached per class, as callers ask on every forward."""
    try:
        return "logits_to_keep" in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return False


def align_padding(model: nn.Module, processor: Any) -> None:
    """Give the model's config the pad id its batches are padded with (the tokenizer's): a decoder classifier takes
    each row's last token that is not config.pad_token_id as the one it reads, so another id there (a config
    without one gets eos, a tokenizer may pad with its own token) would read padding in every shorter row."""
    config, pad = getattr(model, "config", None), getattr(processor, "pad_token_id", None)
    if isinstance(pad, int) and config is not None and hasattr(config, "pad_token_id") and config.pad_token_id != pad:
        config.pad_token_id = pad
