"""Weight files are checked before any loader opens them, and pickles are never read unless asked for.

A pickle (`pytorch_model.bin`, `.pt`, `.pth`) is a program: unpickling it can run arbitrary code. A safetensors
file is a JSON header plus raw tensor bytes and runs nothing. So deltatune reads safetensors, and:

* every safetensors file is opened (header parsed, its extent checked against the file's size) before a loader
  reads it, so a pickle renamed `.safetensors`, a truncated download or a file of zeros is one line naming the file;
* a transformers directory holding only pickle weights is refused with the fix, unless `model.allow_pickle: true`,
  in which case transformers reads them with `torch.load(weights_only=True)` (torch's restricted unpickler, which
  rebuilds only tensors and plain containers and refuses to call anything else);
* a directory that also holds `adapter_config.json` is refused: transformers would silently apply that adapter
  (through peft, which may unpickle `adapter_model.bin`).

Custom model code (`auto_map` in config.json) is refused in `deltatune.models.sources`; `trust_remote_code` is never
passed to transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from deltatune.errors import UserError

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# How a pickle starts: torch.save's zip container, or a raw pickle's PROTO opcode.
_PICKLE_STARTS = (b"PK\x03\x04", b"\x80")


def check_safetensors_file(path: Path) -> None:
    """UserError naming `path` unless it is a complete safetensors file (header and every tensor's bytes present)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"weights file {path} not found; re-save the model (save_pretrained writes it)")
    try:
        with safe_open(str(path), framework="pt"):
            pass  # opening parses the header and checks that the data section covers every tensor exactly
    except (SafetensorError, OSError) as exc:
        with open(path, "rb") as handle:
            start = handle.read(4)
        what = "it looks like a PyTorch pickle renamed" if start.startswith(_PICKLE_STARTS) else \
            "damaged or truncated"
        reason = brief(exc)
        raise UserError(f"weights file {path} is not a readable safetensors file ({what}: {reason}); download or "
                        f"save it again") from None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, after `check_safetensors_file`."""
    from safetensors.torch import load_file

    check_safetensors_file(path)
    return load_file(str(path))


def check_model_directory(directory: Path, allow_pickle: bool) -> Path | None:
    """Check a transformers directory's weight files; the pickle transformers will read, or None for safetensors.

    Safetensors weights, sharded or not, are checked file by file. Pickle-only weights are a UserError unless
    `allow_pickle`; a directory with no weights at all, or with an adapter inside, is a UserError.
    """
    if (directory / "adapter_config.json").is_file():
        raise UserError(f"model directory {directory} also holds adapter_config.json, which transformers would apply "
                        f"silently; keep the base model and the adapter in separate folders and load the adapter "
                        f"with deltatune.load_adapter")
    if (directory / SAFETENSORS_INDEX).is_file():
        for shard in index_shards(directory / SAFETENSORS_INDEX):
            check_safetensors_file(directory / shard)
        return None
    if (directory / SAFETENSORS_WEIGHTS).exists():
        check_safetensors_file(directory / SAFETENSORS_WEIGHTS)
        return None
    pickles = [name for name in PICKLE_WEIGHTS if (directory / name).is_file()]
    if not pickles:
        raise UserError(f"model directory {directory} has no weights ({SAFETENSORS_WEIGHTS}); save the model there "
                        f"with save_pretrained")
    if not allow_pickle:
        raise UserError(f"model directory {directory} holds only pickle weights ({pickles[0]}), which can run code "
                        f"when loaded; re-save the model with save_pretrained (it writes {SAFETENSORS_WEIGHTS}) or set "
                        f"model.allow_pickle: true to read them with torch's weights-only loader")
    return directory / pickles[0]


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file holding an object, as a dict; otherwise a UserError naming the file and ending with `fix`."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, and UnicodeDecodeError for binary files
        raise UserError(f"cannot read {path} ({brief(exc)}); {fix}") from None
    except RecursionError:  # [[[[...]]]] nested deeper than the parser goes
        raise UserError(f"{path} nests JSON too deeply; {fix}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} holds a JSON {type(content).__name__}, not an object; {fix}")
    return content


def index_shards(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index lists; each must be a plain name inside the directory."""
    weight_map = read_json_object(index, "re-save the model with save_pretrained").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index} has no weight_map of tensor names to shard files; re-save the model with "
                        f"save_pretrained")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in (".", ".."):
            raise UserError(f"{index} names shard {shard!r} outside its folder; shards must be plain file names")
    return shards


def brief(exc: BaseException, limit: int = 200) -> str:
    """A library's error message as one short line: whitespace collapsed, cut after its first sentence or `limit`."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    sentence = text.find(". ")
    if 0 < sentence < limit:
        return text[: sentence + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
