"""Model loading: from `ModelConfig.name` to an fp32 CPU `nn.Module` and the processor its inputs need.

`model.name` takes four forms:

* an alias of an embedded pretrained model (`ALIASES`): `minilm-l6` (BERT encoder, classification),
  `smollm2-135m` (Llama from a GGUF, causal-lm or classification), `efficientnet-lite0` (CNN, image-classification);
* a local transformers directory (with config.json), loaded with the Auto class of the task;
* a `.gguf` file, dequantised to fp32 once and cached on disk (see `deltatune.models.gguf_cache`);
* an import path `package.module:function`; the function returns an `nn.Module` and is called with
  `num_labels=N` when its signature accepts it. Its processor comes from the function `<function>_processor`
  in the same module (zero arguments, returning a tokenizer or an `ImageProcessor`) when that exists, else None.
  The working directory is importable, so `my_models:build` works from a project folder.

Every model is called with keyword batches and returns logits or an output with `.logits`: text models take
`input_ids=`/`attention_mask=`, image models `pixel_values=` (a CNN whose forward takes the tensor positionally is
wrapped in `ImageClassifier`, which prefixes its parameter names with `backbone.`). Classification heads are new.
Tokenizers always have a pad token (EOS when the model defines none).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.config.schema import ModelConfig
from deltatune.errors import UserError
from deltatune.models import sources
from deltatune.models.image import ImageClassifier, ImageProcessor
from deltatune.models.sources import ALIASES, LABELLED_TASKS, TASKS, Alias, Source

# huggingface_hub reads this once when first imported: set it before anything imports transformers, so no load
# ever waits on the network (the machines this runs on are offline). setdefault keeps a user's explicit choice.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [
    "ALIASES",
    "TASKS",
    "Alias",
    "ImageClassifier",
    "ImageProcessor",
    "load_model",
    "load_processor",
    "resolve_task",
]


def resolve_task(cfg: ModelConfig) -> str:
    """`cfg.task` when set (checked against the model), else the task the model was built for.

    Aliases carry their task; a GGUF is a causal LM; a transformers directory is read from config.json's
    `architectures` (`*ForCausalLM` -> causal-lm, `*ForImageClassification` -> image-classification, anything else
    -> classification). An import path with task "auto" is a UserError: its task cannot be guessed.
    """
    source = sources.parse_source(cfg.name)
    if cfg.task == "auto":
        return sources.default_task(source)
    sources.check_task(cfg.task)
    sources.check_supported(source, cfg.task)
    return cfg.task


def load_processor(cfg: ModelConfig) -> Any:
    """The tokenizer or `ImageProcessor` for `cfg`'s model, without loading its weights.

    For a GGUF the tokenizer is read from the file once and cached next to the converted model. Import paths
    return the result of `<function>_processor()` or None (see the module docstring).
    """
    from deltatune.models import gguf_cache, hf, image

    source = sources.parse_source(cfg.name)
    if source.kind == sources.EFFICIENTNET:
        return image.efficientnet_processor()
    if source.kind == sources.GGUF:
        return hf.load_tokenizer(gguf_cache.ensure_tokenizer(_path(source)))
    if source.kind == sources.TRANSFORMERS:
        task = cfg.task if cfg.task != "auto" else sources.default_task(source)
        if task == "image-classification":
            return image.processor_from_directory(_path(source))
        return hf.load_tokenizer(_path(source))
    return _import_processor(cfg.name)


def load_model(cfg: ModelConfig, task: str, num_labels: int | None) -> nn.Module:
    """`cfg`'s model for `task`, fp32 on CPU; classification tasks get a new head of `num_labels` outputs.

    `num_labels` falls back to `cfg.num_labels`; it is required for classification and image-classification.
    """
    sources.check_task(task)
    num_labels = num_labels if num_labels is not None else cfg.num_labels
    _check_num_labels(task, num_labels)
    source = sources.parse_source(cfg.name)
    sources.check_supported(source, task)
    model = _load(source, task, num_labels, cfg.allow_pickle)
    if task == "image-classification" and not isinstance(model, ImageClassifier):
        from deltatune.models.image import takes_pixel_values

        if not takes_pixel_values(model):
            model = ImageClassifier(model)
    # Training runs in fp32 on CPU; the trainer moves and casts the model later if it wants another device/dtype.
    return model.to(device="cpu").float()


def _load(source: Source, task: str, num_labels: int | None, allow_pickle: bool = False) -> nn.Module:
    """Dispatch on where the weights live; `allow_pickle` lets a pickle-only transformers directory load."""
    from deltatune.models import gguf_cache, hf, image

    if source.kind == sources.EFFICIENTNET:
        assert num_labels is not None  # checked by _check_num_labels: the only task here is labelled
        return image.load_efficientnet(_path(source), num_labels)
    if source.kind == sources.GGUF:
        return hf.load_transformers_model(gguf_cache.ensure_model(_path(source)), task, num_labels)
    if source.kind == sources.TRANSFORMERS:
        return hf.load_transformers_model(_path(source), task, num_labels, allow_pickle)
    return _import_model(source.name, task, num_labels)


def _check_num_labels(task: str, num_labels: int | None) -> None:
    """Labelled tasks need a positive label count for their new head."""
    if task not in LABELLED_TASKS:
        return
    if num_labels is None:
        raise UserError(f"task {task!r} needs the number of labels for the new head; set model.num_labels or use "
                        f"data with a label column")
    if num_labels < 1:
        raise UserError(f"model.num_labels is {num_labels}; set it to the number of classes (at least 1)")


def _import_model(name: str, task: str, num_labels: int | None) -> nn.Module:
    """Call the import path's function (with num_labels= when it accepts it); it must return an nn.Module."""
    _, function = sources.import_target(name)
    kwargs = {}
    if num_labels is not None and task in LABELLED_TASKS and sources.accepts_keyword(function, "num_labels"):
        kwargs["num_labels"] = num_labels
    model = function(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"{name!r} returned a {type(model).__name__}, not a torch.nn.Module; make the function "
                        f"return the model")
    return model


def _import_processor(name: str) -> Any:
    """`<function>_processor()` from the import path's module, or None when the module has none."""
    module, _ = sources.import_target(name)
    factory = getattr(module, f"{name.partition(':')[2]}_processor", None)
    return factory() if callable(factory) else None


def _path(source: Source) -> Path:
    """The source's path (every kind but import paths has one)."""
    assert source.path is not None, source
    return source.path
