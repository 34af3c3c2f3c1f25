"""4-bit NormalFloat (NF4) storage with double quantisation, in plain torch (Dettmers et al., 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs", §3).

NF4. A weight tensor W (n values, flattened row-major) is cut into blocks of B = 64 values. Each block keeps its
absolute maximum  c_b = max_i |W_i|  and every value becomes the index of the nearest entry of the 16-value NF4 code
book q (quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero):

    code_i = argmin_j |W_i / c_b - q_j|,        Ŵ_i = q[code_i] · c_b.

Two 4-bit codes share a byte, the even-indexed value in the high nibble:  byte_k = code_{2k} << 4 | code_{2k+1}.

Double quantisation (§3, "Double Quantization"). The n/64 fp32 absmax values would cost 32/64 = 0.5 bits per weight;
instead their mean μ is subtracted and the centred values are quantised again, blockwise in blocks of 256, to 8 bits
with the signed "dynamic" code book d (Dettmers 2016, 256 values in [-1, 1]), keeping one fp32 absmax s_g per 256:

    a_b = c_b - μ,   acode_b = nearest(a_b / s_g, d),   ĉ_b = d[acode_b] · s_g + μ,   Ŵ_i = q[code_i] · ĉ_b.

Storage per weight: 4 bits + 8/64 bits + 32/(64·256) bits ≈ 4.127 bits = 0.516 bytes (plus 4 bytes for μ).

Bit-for-bit compatibility with bitsandbytes (`quantize_4bit(quant_type="nf4", compress_statistics=True)` and
`dequantize_4bit`): the NF4 table is bitsandbytes' fp32 table; the 4-bit step rounds like its reference kernel
(scale by the reciprocal of the absmax, clamp to [-1, 1], bucket by the midpoints of q, a tie goes to the lower code;
a short last block is divided by its absmax); the 8-bit step rounds like its CPU kernel (a 65536-entry lookup table
over [-1, 1] that maps a grid point to the nearest entry of d); dequantisation multiplies the same fp32 numbers in
the same order. `tests/test_qlora.py` checks all of it against bitsandbytes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

# The NF4 code book (QLoRA, Appendix E), exactly as bitsandbytes stores it in fp32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
ABSMAX_BLOCK = 256  # block size of the second (8-bit) quantisation of the absmax values, as in the paper
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the 4-bit block sizes bitsandbytes accepts
_LUT_SIZE = 65536  # grid points of the 8-bit lookup table (bitsandbytes' CPU kernel)


class NF4Tensor(NamedTuple):
    """The stored form of one weight tensor; nothing else is kept (no fp32 copy)."""

    packed: Tensor  # uint8 (ceil(n/2),): two 4-bit codes per byte, the first in the high nibble
    absmax: Tensor  # double quantised: uint8 codes into the dynamic map (blocks,); otherwise fp32 (blocks,)
    absmax_scale: Tensor | None  # fp32 (ceil(blocks/256),): the absmax of each block of 256 centred absmax values
    absmax_offset: Tensor | None  # fp32 0-dim: the mean μ subtracted before the second quantisation


# ---- code books (shared by every layer: computed once per device, never stored in a layer) --------------------
@functools.lru_cache(maxsize=8)
def nf4_code(device: torch.device) -> Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=8)
def _nf4_pairs(device: torch.device) -> Tensor:
    """(256, 2): the two NF4 values a packed byte stands for, so one gather decodes two weights."""
    code = nf4_code(device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)


@functools.lru_cache(maxsize=8)
def dynamic_map(device: torch.device) -> Tensor:
    """The signed 8-bit dynamic code book (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning"):
    for exponent e = 0..6, 2^e evenly spaced fractions in [0.1, 1] (the midpoints of linspace(0.1, 1, 2^e + 1))
    scaled by 10^(e-6), with both signs, plus 0 and 1; sorted. Computed with bitsandbytes' fp32 arithmetic."""
    values: list[float] = []
    for exponent in range(7):
        bounds = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (exponent - 6)) * means).tolist()
        values += (-(10 ** (exponent - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=8)
def _dynamic_lut(device: torch.device) -> Tensor:
    """For each of 65536 evenly spaced points v_k = -1 + 2k/65535, the index of the nearest dynamic-map entry
    (the number of midpoints below v_k), as bitsandbytes' CPU kernel builds it."""
    code = dynamic_map(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)


# ---- blocks ------------------------------------------------------------------------------------------------------
def _blocks(flat: Tensor, block_size: int) -> Tensor:
    """`flat` zero-padded to whole blocks, as (blocks, block_size); padding never changes an absmax."""
    missing = -flat.numel() % block_size
    padded = torch.nn.functional.pad(flat, (0, missing)) if missing else flat
    return padded.view(-1, block_size)


def _per_block(values: Tensor, scales: Tensor, block_size: int) -> Tensor:
    """values[i] · scales[i // block_size] for a flat `values` (one rounding per product)."""
    n = values.numel()
    return (_blocks(values, block_size) * scales[:, None]).view(-1)[:n]


# ---- 8-bit blockwise (the absmax values) -------------------------------------------------------------------------
def quantize_blockwise_8bit(values: Tensor, block_size: int = ABSMAX_BLOCK) -> tuple[Tensor, Tensor]:
    """(uint8 codes into the dynamic map, fp32 absmax per block). Rounds like bitsandbytes' CPU kernel: v = x·(1/s)
    clamped to [-1, 1] is moved to the grid point ⌊((v + 1)·0.5)·65535 + 0.5⌋ of the lookup table, whose entry is the
    nearest code; an all-zero block gets absmax 0 and code 0."""
    flat = values.reshape(-1).float()
    blocks = _blocks(flat, block_size)
    absmax = blocks.abs().amax(dim=1)
    # A zero block must not divide by zero; its codes are forced to 0 below, as in bitsandbytes.
    inverse = torch.where(absmax == 0, 0.0, 1.0 / absmax)
    scaled = (blocks * inverse[:, None]).clamp_(-1.0, 1.0)
    # Each step rounds separately (no fused multiply-add), exactly as the kernel's vector path.
    grid = scaled.add_(1.0).mul_(0.5).mul_(float(_LUT_SIZE - 1)).add_(0.5).to(torch.int64)
    codes = _dynamic_lut(flat.device)[grid]
    codes = torch.where(absmax[:, None] == 0, 0, codes).to(torch.uint8)
    return codes.view(-1)[: flat.numel()].clone(), absmax


def dequantize_blockwise_8bit(codes: Tensor, absmax: Tensor, block_size: int = ABSMAX_BLOCK) -> Tensor:
    return _per_block(dynamic_map(codes.device)[codes.long()], absmax, block_size)


# ---- NF4 ---------------------------------------------------------------------------------------------------------
def _nf4_codes(flat: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """(4-bit codes as uint8, one per value; fp32 absmax per block), rounded like bitsandbytes' reference kernel."""
    n = flat.numel()
    full = n - n % block_size
    whole = flat[:full].view(-1, block_size)
    absmax = whole.abs().amax(dim=1)
    scaled = (whole * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).view(-1)
    if full < n:
        # bitsandbytes divides the short last block by its absmax (clamped away from zero) and stores it clamped.
        last = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, (flat[full:] / last).clamp(-1, 1)])
    code = nf4_code(flat.device)
    midpoints = (code[:-1] + code[1:]) / 2
    # bucketize (right=False): a value exactly on a midpoint takes the lower code, as bitsandbytes does.
    return torch.bucketize(scaled, midpoints).to(torch.uint8), absmax


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantise `weight` (any shape, flattened row-major) to NF4 with optional double quantisation."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"NF4 block size must be one of {BLOCK_SIZES}, got {block_size}")
    flat = weight.detach().reshape(-1).float()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot quantise a weight holding NaN or infinite values")
    codes, absmax = _nf4_codes(flat, block_size)
    if codes.numel() % 2:
        # An odd count fills the last byte's low nibble with the code of 0.0 (index 7), as bitsandbytes does.
        codes = torch.cat([codes, codes.new_full((1,), NF4_CODE.index(0.0))])
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None)
    offset = absmax.mean()
    absmax_codes, absmax_scale = quantize_blockwise_8bit(absmax - offset, ABSMAX_BLOCK)
    return NF4Tensor(packed, absmax_codes, absmax_scale, offset)


def dequantize_absmax(quantised: NF4Tensor) -> Tensor:
    """The fp32 absmax per 4-bit block: stored directly, or ĉ_b = d[acode_b] · s_g + μ."""
    if quantised.absmax_scale is None or quantised.absmax_offset is None:
        return quantised.absmax
    centred = dequantize_blockwise_8bit(quantised.absmax, quantised.absmax_scale, ABSMAX_BLOCK)
    return centred + quantised.absmax_offset


def dequantize_nf4(quantised: NF4Tensor, shape: torch.Size | tuple[int, ...], block_size: int = 64) -> Tensor:
    """Ŵ_i = q[code_i] · ĉ_b, fp32, in `shape`: a temporary, rebuilt on every call."""
    n = 1
    for size in shape:
        n *= size
    values = _nf4_pairs(quantised.packed.device).index_select(0, quantised.packed.int()).view(-1)[:n]
    return _per_block(values, dequantize_absmax(quantised), block_size).view(shape)


def storage_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the storages behind `tensors` (each storage counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
