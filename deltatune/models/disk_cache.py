"""Converted model files cached on disk, built once per machine and never read half-written.

Two caches use this: GGUF models dequantised to fp32 (`deltatune.models.gguf_cache`) and pickled asset weights
converted to safetensors (`deltatune.models.safetensors_cache`). Both live under `$DELTATUNE_CACHE` (default
`~/.cache/deltatune`), one folder per kind:

    gguf/<file stem>-<key>/model/ ...
    safetensors/<file stem>-<key>/ ...

`key` hashes the source file's absolute path, size and modification time plus the converter's version, so replacing
or touching the file (or changing the conversion) makes a fresh entry. An entry is written into a temporary sibling
and then renamed into place; a rename is atomic, so a process killed mid-write leaves only a temporary folder that is
never read (and is removed by a later build once it is an hour old).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

_STALE_SECONDS = 3600  # a build takes under a minute; older temporary folders belong to killed processes
_TMP_MARK = ".tmp-"

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """`$DELTATUNE_CACHE`, else `~/.cache/deltatune`."""
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune").expanduser()


def file_key(source: Path, version: int | str) -> str:
    """Hash of the file's identity (absolute path, size, mtime in nanoseconds) and the converter's `version`."""
    stat = source.stat()
    identity = f"{version}\0{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def build_once(final: Path, build: Callable[[Path], None], source: Path, version: int) -> Path:
    """`final`, building it with `build(tmp)` and renaming the finished folder into place if it is missing."""
    if final.is_dir():
        return final
    logger.info("converting %s once (%s); caching it in %s", source.name, final.name, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}{_TMP_MARK}", dir=final.parent))
    try:
        build(tmp)
        _write_source_note(tmp, source, version)
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


def _write_source_note(directory: Path, source: Path, version: int) -> None:
    """Record which file the entry came from, for people inspecting or pruning the cache."""
    stat = source.stat()
    note = {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "cache_version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
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
