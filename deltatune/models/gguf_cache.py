"""An on-disk fp32 cache of GGUF models, so the slow dequantisation happens once per machine.

Loading a Q4_1 GGUF through transformers dequantises every tensor (about 25 s for SmolLM2-135M) and yields a model
that refuses `save_pretrained` because its config is flagged as quantized. The first load therefore rebuilds a plain
model from the same config minus `quantization_config`, copies the fp32 weights in and saves it (safetensors) as an
ordinary transformers directory; later loads read that directory in about a second.

Layout under `$DELTATUNE_CACHE` (default `~/.cache/deltatune`):

    gguf/<file stem>-<key>/model/       config.json + model.safetensors + source.json
    gguf/<file stem>-<key>/tokenizer/   tokenizer files + source.json

`key` hashes the GGUF file's absolute path, size and modification time (plus a format version), so replacing or
touching the file makes a fresh entry. Each of `model/` and `tokenizer/` is written into a temporary sibling and then
renamed into place; a rename is atomic, so a process killed mid-write leaves only a temporary folder that is never
read (and is removed by a later build once it is an hour old).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from deltatune.models.hf import quiet_transformers

# Bump when the cached layout or conversion changes, so old entries are ignored instead of misread.
CACHE_VERSION = 1
_STALE_SECONDS = 3600  # a build takes under a minute; older temporary folders belong to killed processes
_TMP_MARK = ".tmp-"

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """`$DELTATUNE_CACHE`, else `~/.cache/deltatune`."""
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune").expanduser()


def gguf_cache_key(gguf: Path) -> str:
    """Hash of the file's identity: absolute path, size and mtime (nanoseconds), plus CACHE_VERSION."""
    stat = gguf.stat()
    identity = f"{CACHE_VERSION}\0{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def gguf_cache_dir(gguf: Path, part: str) -> Path:
    """Where the `part` ("model" or "tokenizer") of this GGUF is (or will be) cached."""
    return cache_root() / "gguf" / f"{gguf.stem}-{gguf_cache_key(gguf)}" / part


def ensure_model(gguf: Path) -> Path:
    """A transformers directory holding the GGUF's model in fp32, converting and caching it on first use."""
    return _build_once(gguf_cache_dir(gguf, "model"), lambda out: _convert_model(gguf, out), gguf)


def ensure_tokenizer(gguf: Path) -> Path:
    """A directory holding the GGUF's tokenizer (vocabulary, merges, chat template) in transformers form."""
    return _build_once(gguf_cache_dir(gguf, "tokenizer"), lambda out: _convert_tokenizer(gguf, out), gguf)


def _convert_model(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to fp32 and save it as a plain (non-quantized) transformers model in `out`."""
    from transformers import AutoModelForCausalLM

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

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(out)


def _build_once(final: Path, build: Callable[[Path], None], gguf: Path) -> Path:
    """`final`, building it with `build(tmp)` and renaming the finished folder into place if it is missing."""
    if final.is_dir():
        return final
    logger.info("converting %s once (%s); caching it in %s", gguf.name, final.name, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}{_TMP_MARK}", dir=final.parent))
    try:
        build(tmp)
        _write_source_note(tmp, gguf)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same entry first; its copy is as good as ours.
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_source_note(directory: Path, gguf: Path) -> None:
    """Record which file the entry came from, for people inspecting or pruning the cache."""
    stat = gguf.stat()
    note = {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "cache_version": CACHE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (directory / "source.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")


def _remove_stale_temporaries(parent: Path) -> None:
    """Delete temporary build folders left behind by killed processes (never a recent one: it may be live)."""
    now = time.time()
    for entry in parent.iterdir():
        if _TMP_MARK in entry.name and entry.is_dir():
            try:
                if now - entry.stat().st_mtime > _STALE_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:  # another process removed it meanwhile
                pass
