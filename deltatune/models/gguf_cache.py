"""An on-disk fp32 cache of GGUF models, so the slow dequantisation happens once per machine.

Loading a Q4_1 GGUF through transformers dequantises every tensor (about 25 s for SmolLM2-135M) and yields a model
that refuses `save_pretrained` because its config is flagged as quantized. The first load therefore rebuilds a plain
model from the same config minus `quantization_config`, copies the fp32 weights in and saves it (safetensors) as an
ordinary transformers directory; later loads read that directory in about a second.

Entries live under `cache_root()/gguf/<file stem>-<key>/` (see `deltatune.models.disk_cache` for the key and the
atomic build):

    model/       config.json + model.safetensors + source.json
    tokenizer/   tokenizer files + source.json

Before converting, the file is parsed with the `gguf` reader, so a damaged or truncated GGUF is a one-line error
naming the file instead of a failure deep inside the conversion.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from deltatune.errors import UserError
from deltatune.models.disk_cache import build_once, cache_root, file_key
from deltatune.models.hf import quiet_transformers

__all__ = ["CACHE_VERSION", "cache_root", "check_gguf_file", "ensure_model", "ensure_tokenizer", "gguf_cache_dir",
           "gguf_cache_key"]

# Bump when the cached layout or conversion changes, so old entries are ignored instead of misread.
CACHE_VERSION = 1


def gguf_cache_key(gguf: Path) -> str:
    """Hash of the file's identity (absolute path, size and mtime in nanoseconds), CACHE_VERSION and the versions of
    the libraries that convert it: a transformers or gguf upgrade may dequantise or convert the tokenizer
    differently, so it builds a fresh entry instead of reading the old one."""
    return file_key(gguf, f"{CACHE_VERSION} {converter_versions()}")


def converter_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "absent"

    return f"transformers {installed('transformers')} gguf {installed('gguf')}"


def gguf_cache_dir(gguf: Path, part: str) -> Path:
    """Where the `part` ("model" or "tokenizer") of this GGUF is (or will be) cached."""
    return cache_root() / "gguf" / f"{gguf.stem}-{gguf_cache_key(gguf)}" / part


def ensure_model(gguf: Path) -> Path:
    """A transformers directory holding the GGUF's model in fp32, converting and caching it on first use."""
    return build_once(gguf_cache_dir(gguf, "model"), lambda out: _convert_model(gguf, out), gguf, CACHE_VERSION)


def ensure_tokenizer(gguf: Path) -> Path:
    """A directory holding the GGUF's tokenizer (vocabulary, merges, chat template) in transformers form."""
    return build_once(gguf_cache_dir(gguf, "tokenizer"), lambda out: _convert_tokenizer(gguf, out), gguf,
                      CACHE_VERSION)


def _convert_model(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to fp32 and save it as a plain (non-quantized) transformers model in `out`."""
    from transformers import AutoModelForCausalLM

    check_gguf_file(gguf)
    with quiet_transformers():
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    # The weights are already plain fp32; only this flag makes save_pretrained refuse the model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    del quantized  # two fp32 copies of the weights at once are enough
    with quiet_transformers():
        plain.save_pretrained(out)


def _convert_tokenizer(gguf: Path, out: Path) -> None:
    """Read the tokenizer embedded in the GGUF and save it in transformers' own files."""
    from transformers import AutoTokenizer

    check_gguf_file(gguf)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(out)


def check_gguf_file(gguf: Path) -> None:
    """UserError naming the file unless the gguf reader parses its header, metadata and tensor table in full.

    The reader maps the file and checks that every tensor's bytes lie inside it (about 3 s for SmolLM2, once per
    cache entry), which is what a truncated download or a renamed file fails.
    """
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... for damaged files
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"GGUF file {gguf} cannot be read ({type(exc).__name__}: {reason}); it is damaged or "
                        f"truncated: download it again") from None
