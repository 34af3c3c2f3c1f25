"""Where a run computes: the device `train.device` names (in a distributed run, each rank's own GPU), mixed
precision for it, and moving nested batches onto it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from deltatune.errors import UserError


def resolve_device(name: str) -> torch.device:
    """The torch device `train.device` names; a UserError when this machine does not have it."""
    from deltatune import distributed

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and distributed.launched_world_size() > 1:
        raise UserError(f"train.device={name} would put every rank on one GPU; with several processes set "
                        "train.device=cuda (each rank takes its own GPU, numbered by torchrun)")
    if device.type == "cuda" and device.index is None and distributed.launched_world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())  # one GPU per rank, as torchrun numbers them
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"train.device={name} but torch finds no CUDA GPU on this machine; "
                            f"set train.device=auto or cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"train.device={name} but this machine has {count} CUDA GPU(s), cuda:0 to "
                            f"cuda:{count - 1}; pick one of those")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"train.device={name} but torch finds no Apple GPU (MPS) here; set train.device=auto or cpu")
    return device


def autocast_context(device: torch.device, dtype_name: str) -> contextlib.AbstractContextManager:
    """Mixed precision where it pays: bf16 autocast on CUDA by default; fp32 on CPU (bf16 is ~7x slower there)."""
    if dtype_name == "auto":
        # Emulated bf16 (GPUs before Ampere) is slower than fp32: auto takes bf16 only where the hardware has it.
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        dtype_name = "bf16" if native else "fp32"
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    # Names outside DTYPES never get here: the config parser refuses them.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor moved to `device`, however deeply it sits in dicts, lists and tuples (a preference
    pair's chosen/rejected halves are nested batches); anything else is kept as it is."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def return_freed_memory_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation of `threshold_bytes` or more by its own mmap, unmapped again when freed
    (`mallopt(M_MMAP_THRESHOLD)`, which also stops glibc from raising that threshold as it goes). By default glibc
    raises it up to 32 MiB after the first large free, so the per-layer temporaries of a training step (qlora's
    dequantised weights, activations) come from the heap and stay in the process's RSS after they are freed.
    Measured on SmolLM2 LoRA SFT (benchmarks/qlora_memory.py): peak RSS 3.40 → 2.97 GB (lora), 3.13 → 2.62 GB
    (qlora). Linux/glibc only; False where it does not apply. Process-wide: the runner calls it when
    `train.return_freed_memory` is set, never on import."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_MMAP_THRESHOLD = -3  # glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
