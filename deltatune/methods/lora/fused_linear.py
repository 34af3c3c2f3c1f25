"""One autograd function for a LoRA linear layer: the frozen matmul, dropout and both low-rank factors together.

    y = x Wᵀ + b + c·((x ⊙ k) Aᵀ) Bᵀ,      c = s / q,  k ~ Bernoulli(q) per input element, q ≈ 1 - p (k = 1 when p = 0)

Backward, with g = ∂L/∂y and u = c·g B (N × r, tiny):
    ∂L/∂x = g W + (u A) ⊙ k        ∂L/∂A = uᵀ (x ⊙ k)        ∂L/∂B = c·gᵀ ((x ⊙ k) Aᵀ)        ∂L/∂b = Σₙ g

Why not let autograd compose the usual modules (what peft does): every separate op there allocates and sweeps an
activation-sized tensor — the dropout output and its float mask, B's output, its scaled copy, the sum, and in
backward the dropout's gradient and a second input-gradient added to the first — and element-wise sweeps, not
matmuls, are where a CPU step goes. Here the mask is drawn once as one byte per element (`keep_mask`; the 1/q
rescale folded into the scalar c), B's product is accumulated into the base output in place by one GEMM, and the
low-rank input-gradient is accumulated into the base one in place. Saved for backward: the layer input (shared
storage when several layers read the same tensor, as q/k/v do — peft keeps one dropped copy per layer), the byte
mask, and the N × r hidden product; the dropped input is recomputed in backward instead of kept.

The mask comes from torch's default generator, so `torch.manual_seed` reproduces a run and resuming restores it.

The base weight is a tensor, or (qlora) a function that rebuilds it from 4 bits: then it is rebuilt again in
backward instead of an fp32 copy staying alive between the two passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy
import torch
from torch import Tensor

WeightSource = Tensor | Callable[[torch.dtype], Tensor]  # the weight, or a function building it in a dtype


def _weight(source: WeightSource, dtype: torch.dtype) -> Tensor:
    return source if isinstance(source, Tensor) else source(dtype)


MASK_BITS = 16  # random bits per mask element: p is used rounded to a multiple of 2^-16


def keep_mask(shape: torch.Size | tuple[int, ...], dropout: float, device: torch.device) -> tuple[Tensor, float]:
    """A boolean keep-mask, each element kept with probability q = round((1-p)·2¹⁶)/2¹⁶ (|q - (1-p)| ≤ 2⁻¹⁷), and q.

    Why not `bernoulli_`: on CPU it makes ~150M draws/s, a visible share of a LoRA step. Here every 64 random bits
    give four int16 words, each uniform on [-2¹⁵, 2¹⁵), and one signed comparison per word makes the mask. The mask
    is kept as bool (one byte per element between forward and backward) and turned into a float factor only where
    it multiplies (`as_factor`).
    """
    threshold = _keep_threshold(dropout)
    if threshold == 1 << MASK_BITS:
        # p < 2⁻¹⁷ rounds to keeping everything, and the int16 comparison below cannot say so: its bound would be
        # 2¹⁵, which wraps to -2¹⁵ and drops every element.
        return torch.ones(shape, dtype=torch.bool, device=device), 1.0
    count = math.prod(shape)
    words = random_words((count + 3) // 4, device).view(torch.int16)[:count]
    keep = words < threshold - (1 << (MASK_BITS - 1))
    return keep.view(shape), threshold / (1 << MASK_BITS)


def keep_probability(dropout: float) -> float:
    """The q `keep_mask` uses for dropout p. It is 0 when 1-p < 2⁻¹⁷, and no 1/q rescale survives that, so
    configs refuse such a p."""
    return _keep_threshold(dropout) / (1 << MASK_BITS)


def _keep_threshold(dropout: float) -> int:
    """q·2¹⁶, in [0, 2¹⁶]."""
    return min(max(round((1.0 - dropout) * (1 << MASK_BITS)), 0), 1 << MASK_BITS)


def random_words(count: int, device: torch.device) -> Tensor:
    """`count` int64 values with all 64 bits uniformly random, derived from torch's default generator of `device`,
    so `torch.manual_seed` reproduces them and a checkpoint's RNG state resumes them.

    On CPU torch has only a Mersenne Twister (~3.3 ns per 64 bits on the benchmark machine; drawing masks is a
    large non-matmul share of a LoRA step); there one 64-bit draw of torch's generator seeds numpy's SFC64 (a small
    chaotic counter generator that passes BigCrush and PractRand), which makes the bits at ~1.7 ns per 64.
    Elsewhere torch's own generator draws them (`random_(-2⁶³, None)`: all 64 bits; plain `random_()` leaves the top
    one 0).
    """
    if device.type != "cpu":
        return torch.empty(count, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    seed = int(torch.empty((), dtype=torch.int64).random_(-(1 << 63), None)) & ((1 << 64) - 1)
    bits = numpy.random.SFC64(seed).random_raw(count)  # uint64
    return torch.from_numpy(bits.view(numpy.int64))


def as_factor(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The bool mask as 0/1 in `dtype`, to multiply by. Why through uint8: on CPU (torch 2.13) float·bool, and
    bool→float conversion, take a slow unvectorised path, ~6x the time of uint8→float plus a float·float product
    (a [524, 576] mask: 120 µs against 40 µs)."""
    return keep.view(torch.uint8).to(dtype)


class FusedLoRALinearFunction(torch.autograd.Function):
    """y = x·W_outmajorᵀ + b + c·((x ⊙ k)·Aᵀ)·Bᵀ on a 2-D input; the base weight must be frozen."""

    @staticmethod
    def forward(ctx, x: Tensor, weight_source: WeightSource, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout: float, fan_in_fan_out: bool) -> Tensor:
        weight = _weight(weight_source, x.dtype)
        # Conv1D stores W as (in, out): then x @ W directly, no transpose copy.
        base = weight if fan_in_fan_out else weight.t()
        out = torch.mm(x, base) if bias is None else torch.addmm(bias, x, base)
        keep, keep_probability, dropped = None, 1.0, x
        if dropout > 0:
            # The 1/q rescale lives in `coefficient`, not in a scaled copy of x.
            keep, keep_probability = keep_mask(x.shape, dropout, x.device)
            dropped = x * as_factor(keep, x.dtype)
        coefficient = scaling / keep_probability
        hidden = torch.mm(dropped, lora_A.t())
        out.addmm_(hidden, lora_B.t(), alpha=coefficient)
        del dropped  # recomputed in backward from x and the mask: keeping x alone lets q/k/v share one copy
        stored = weight_source if isinstance(weight_source, Tensor) else None
        ctx.rebuild_weight = None if stored is not None else weight_source
        ctx.save_for_backward(x, keep, hidden, stored, lora_A, lora_B)
        ctx.coefficient, ctx.fan_in_fan_out, ctx.has_bias = coefficient, fan_in_fan_out, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, keep, hidden, weight, lora_A, lora_B = ctx.saved_tensors
        weight = weight if ctx.rebuild_weight is None else None
        needs_x, _, needs_bias, needs_A, needs_B = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        low_rank_grad = torch.mm(grad_out, lora_B).mul_(ctx.coefficient)  # u = c·g B, N × r
        grad_x = grad_A = grad_B = grad_bias = None
        factor = None if keep is None else as_factor(keep, x.dtype)
        if needs_x:
            weight = weight if weight is not None else ctx.rebuild_weight(grad_out.dtype)
            grad_x = torch.mm(grad_out, weight.t() if ctx.fan_in_fan_out else weight)
            if keep is None:
                grad_x.addmm_(low_rank_grad, lora_A)
            else:
                grad_x.addcmul_(torch.mm(low_rank_grad, lora_A), factor)
        if needs_A:
            dropped = x if factor is None else x * factor
            grad_A = torch.mm(low_rank_grad.t(), dropped)
        if needs_B:
            grad_B = torch.mm(grad_out.t(), hidden).mul_(ctx.coefficient)
        if needs_bias and ctx.has_bias:
            grad_bias = grad_out.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None


def fused_lora_linear(x: Tensor, weight: WeightSource, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                      scaling: float, dropout: float, fan_in_fan_out: bool) -> Tensor:
    """The fused LoRA linear on an input of any leading shape (see the module docstring for the maths)."""
    flat = x.reshape(-1, x.shape[-1])
    out = FusedLoRALinearFunction.apply(flat, weight, bias, lora_A, lora_B, scaling, dropout, fan_in_fan_out)
    return out.view(*x.shape[:-1], out.shape[-1])


def can_fuse(x: Tensor, weight: Tensor | None) -> bool:
    """The fused function covers the common training case: frozen base weight (None: a rebuilt one, never
    trainable), no autocast (mixed precision goes through the composed path, where autocast picks each op's dtype)."""
    frozen = weight is None or not weight.requires_grad
    return frozen and not torch.is_autocast_enabled(x.device.type)
