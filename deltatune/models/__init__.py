"""Model loading: from `ModelConfig.name` to an fp32 CPU `nn.Module` and the processor its inputs need.

`model.name` takes four forms:

* an alias of an embedded pretrained model (`ALIASES`): `minilm-l6` (BERT encoder, classification),
  `smollm2-135m` (Llama from a GGUF, causal-lm or classification), `efficientnet-lite0` (CNN, image-classification);
* a local transformers directory (with config.json), loaded with the Auto class of the task;
* a `.gguf` file, dequantised to fp32 once and cached on disk (see `deltatune.models.gguf_cache`);
* `dual-encoder`: an image tower (`model.image`) and a text tower (`model.text`), each any name of the forms here,
  projected into one space (`deltatune.models.dual_encoder`); assembled by the task it serves (`image-text`);
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
from deltatune.models.sources import ALIASES, Alias, Source
from deltatune.models.families import family_of
from deltatune.models.head import ModelHead
from deltatune.models.streaming import Converting
from deltatune.models.student import keep_blocks, wants_student

# huggingface_hub reads this once when first imported: set it before anything imports transformers, so no load
# ever waits on the network (the machines this runs on are offline). setdefault keeps a user's explicit choice.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [
    "ALIASES",
    "Alias",
    "ImageClassifier",
    "ImageProcessor",
    "load_model",
    "load_processor",
    "ModelHead",
]


def load_processor(cfg: ModelConfig, task: ModelHead | None) -> Any:
    """The tokenizer or `ImageProcessor` for `cfg`'s model, without loading its weights.

    For a GGUF the tokenizer is read from the file once and cached next to the converted model. Import paths
    return the result of `<function>_processor()` or None (see the module docstring). A transformers directory's
    processor depends on the task (tokenizer or image processor), so `task` is required for one.
    """
    from deltatune.models import gguf_cache, hf, image

    source = sources.parse_source(cfg.name)
    if source.kind == sources.DUAL_ENCODER:
        if task is None:
            raise UserError("model.name dual-encoder is assembled by its task; name the task (image-text)")
        return task.assemble_processor(cfg)
    if source.kind == sources.EFFICIENTNET:
        return image.efficientnet_processor()
    if source.kind == sources.GGUF:
        return hf.load_tokenizer(gguf_cache.ensure_tokenizer(_path(source)))
    if source.kind == sources.TRANSFORMERS:
        if task is None:
            raise UserError(f"{cfg.name!r} is a transformers directory; name the task to load its processor for")
        return task.directory_processor(_path(source))
    return _import_processor(cfg.name)


def load_model(cfg: ModelConfig, task: ModelHead, num_labels: int | None,
               converting: Converting | None = None) -> nn.Module:
    """`cfg`'s model for `task` (a registered task, `deltatune.tasks.get_task(name)()`), fp32 on CPU; labelled tasks
    (classification, image-classification) get a new head of `num_labels` outputs.

    `num_labels` falls back to `cfg.num_labels`; labelled tasks require it. The task's `adapt_model` fix-ups
    (e.g. wrapping a CNN in `ImageClassifier`) apply whatever the source. `converting(skeleton)` names modules to
    convert while a transformers directory (or a GGUF's cache) is read tensor by tensor (`deltatune.models.
    streaming`); where that path does not apply the model loads as usual and the caller converts afterwards.
    """
    num_labels = num_labels if num_labels is not None else cfg.num_labels
    _check_num_labels(task, num_labels)
    source = sources.parse_source(cfg.name)
    if source.kind == sources.DUAL_ENCODER:  # two towers, each loaded as below by the task that pairs them
        return task.assemble_model(cfg).to(device="cpu").float()
    if cfg.image is not None or cfg.text is not None:
        key = "model.image" if cfg.image is not None else "model.text"
        raise UserError(f"{key} names a tower of a dual encoder, but model.name is {cfg.name!r}; set "
                        f"model.name=dual-encoder or remove {key}")
    sources.check_supported(source, task.name, task.auto_class)
    model = _load_converting(source, task, num_labels, converting) if not wants_student(cfg.student) else None
    model = task.adapt_model(model if model is not None else _load(source, task, num_labels, cfg.allow_pickle))
    if wants_student(cfg.student):
        model = keep_blocks(model, family_of(model, cfg.family), cfg.student)
    # Training runs in fp32 on CPU; the trainer moves and casts the model later if it wants another device/dtype.
    return model.to(device="cpu").float()


def _load(source: Source, task: ModelHead, num_labels: int | None, allow_pickle: bool = False) -> nn.Module:
    """Dispatch on where the weights live; `allow_pickle` lets a pickle-only transformers directory load."""
    from deltatune.models import gguf_cache, image

    if source.kind == sources.EFFICIENTNET:
        assert num_labels is not None  # checked by _check_num_labels: the only task here is labelled
        return image.load_efficientnet(_path(source), num_labels)
    if source.kind == sources.GGUF:
        return task.load_pretrained(gguf_cache.ensure_model(_path(source)), num_labels)
    if source.kind == sources.TRANSFORMERS:
        return task.load_pretrained(_path(source), num_labels, allow_pickle)
    return _import_model(source.name, task, num_labels)


def _load_converting(source: Source, task: ModelHead, num_labels: int | None,
                     converting: Converting | None) -> nn.Module | None:
    from deltatune.models import gguf_cache, streaming

    if converting is None or task.auto_class is None or source.kind not in (sources.GGUF, sources.TRANSFORMERS):
        return None
    directory = gguf_cache.ensure_model(_path(source)) if source.kind == sources.GGUF else _path(source)
    return streaming.load_converting(directory, task.auto_class, num_labels if task.labelled else None, converting)


def _check_num_labels(task: ModelHead, num_labels: int | None) -> None:
    """Labelled tasks need a positive label count for their new head."""
    if not task.labelled:
        return
    if num_labels is None:
        raise UserError(f"task {task.name!r} needs the number of labels for the new head; set model.num_labels or "
                        f"use data with a label column")
    if num_labels < 1:
        raise UserError(f"model.num_labels is {num_labels}; set it to the number of classes (at least 1)")


def _import_model(name: str, task: ModelHead, num_labels: int | None) -> nn.Module:
    """Call the import path's function (with num_labels= when it accepts it); it must return an nn.Module."""
    _, function = sources.import_target(name)
    kwargs = {}
    if num_labels is not None and task.labelled and sources.accepts_keyword(function, "num_labels"):
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
