"""QLoRA's layers (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): a frozen Linear stored
in 4-bit NF4 (`NF4Linear`), and the LoRA layer around it (`QLoRALinear`, a `LoRALinear` whose base is an NF4Linear).

Forward, per layer and per call (§3, "QLoRA"):  y = X · dequant(c₂, c₁, W_NF4)ᵀ + b + s·B(A(dropout(X))),
the dequantised weight a temporary in the compute dtype (fp32 on CPU) that is dropped as soon as the product is
taken. The backward pass dequantises again rather than keeping that temporary alive until then, so the frozen
base never costs more than its 4-bit storage plus one layer's fp32 weight at a time. Gradients flow to X (and to
the bias when it trains) but never to the quantised weight, which has no parameter at all.

Merging (`deltatune.merge`) never writes into 4-bit: the layer dequantises, adds the update in fp32 and computes
with an ordinary fp32 nn.Linear (W = Ŵ + s·B·A; DoRA as in `lora_layer.py`) while it is merged; `unmerge` puts the
untouched NF4 layer back, so unmerging is exact. That merged nn.Linear is also what an fp32 export writes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.methods.lora import nf4
from deltatune.methods.lora.fused_linear import can_fuse, fused_lora_linear
from deltatune.methods.lora.layers_per_type import LoRALinear
from deltatune.methods.lora.lora_layer import LoRALayer


class _NF4Matmul(torch.autograd.Function):
    """y = X Ŵᵀ + b with Ŵ rebuilt from 4 bits in forward and again in backward (nothing fp32 is saved)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: NF4Linear, bias: Tensor | None) -> Tensor:
        ctx.layer = layer
        ctx.bias_dims = x.dim() - 1
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ ctx.layer.dequantize(grad_output.dtype)  # dL/dX = dL/dY · Ŵ
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=tuple(range(ctx.bias_dims)))
        return grad_x, None, grad_bias


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is kept only as NF4 codes and quantised block statistics (see `nf4.py`).

    Buffers: `packed_weight` (uint8, two codes per byte), `absmax` (uint8 codes with double quantisation, else
    fp32), and with double quantisation `absmax_scale` (fp32 per 256 blocks) and `absmax_offset` (fp32 scalar). The
    bias stays the fp32 nn.Parameter of the original layer (the same object, so a LoRA `bias` setting still trains
    it). `weight` is computed on demand, for code that reads it (shapes, DoRA's norms); it is never stored.
    """

    def __init__(self, in_features: int, out_features: int, quantised: nf4.NF4Tensor, block_size: int,
                 bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.register_buffer("packed_weight", quantised.packed)
        self.register_buffer("absmax", quantised.absmax)
        self.register_buffer("absmax_scale", quantised.absmax_scale)  # None (not registered) without double quant
        self.register_buffer("absmax_offset", quantised.absmax_offset)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> NF4Linear:
        """Quantise `linear` (deterministic: the same weights always give the same codes)."""
        quantised = nf4.quantize_nf4(linear.weight, block_size, double_quant)
        return cls(linear.in_features, linear.out_features, quantised, block_size, linear.bias)

    @staticmethod
    def lora_layer_class() -> type[LoRALayer]:
        """The LoRA layer that wraps this module (the hook `layers_per_type.layer_class_for` looks for)."""
        return QLoRALinear

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def quantised(self) -> nf4.NF4Tensor:
        return nf4.NF4Tensor(self.packed_weight, self.absmax, self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ as a new (out_features, in_features) tensor (bit-identical to bitsandbytes' dequantize_4bit)."""
        weight = nf4.dequantize_nf4(self.quantised(), (self.out_features, self.in_features), self.block_size)
        return weight if dtype == weight.dtype else weight.to(dtype)

    @property
    def packed_parameters(self) -> int:
        """How many weights the packed buffers stand for (counted in a model's parameter total)."""
        return self.in_features * self.out_features

    @property
    def weight(self) -> Tensor:
        return self.dequantize()

    def to_linear(self) -> nn.Linear:
        """An fp32 nn.Linear holding Ŵ (frozen) and sharing this layer's bias parameter."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")  # no init work; replaced
        linear.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def to_standard_module(self) -> nn.Linear:
        """What `deltatune.merge_and_unload` (and so `deltatune export`) puts in this layer's place."""
        return self.to_linear()

    def forward(self, x: Tensor) -> Tensor:
        return _NF4Matmul.apply(x, self, self.bias)

    def forward_no_bias(self, x: Tensor) -> Tensor:
        return _NF4Matmul.apply(x, self, None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block_size={self.block_size}, double_quant={self.double_quant}")


class QLoRALinear(LoRALinear):
    """LoRA (and DoRA) on an NF4Linear: all of LoRALinear's maths, with the base computed from 4 bits.

    Only merging differs: while merged, `base_layer` is an fp32 nn.Linear holding Ŵ + s·B·A and the NF4 layer waits
    in `quantized_layer` (a submodule, so it follows `.to()`), to come back unchanged on unmerge.
    """

    @staticmethod
    def _features(base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features  # without dequantising the weight just for its shape

    def _fused_forward(self, x: Tensor, name: str) -> Tensor | None:
        base = self.base_layer
        if not isinstance(base, NF4Linear) or not can_fuse(x, None):
            return None
        settings = self.settings[name]
        lora_A, lora_B = self.factors(name)
        dropout = self.dropout_now(name)
        # The weight goes in as its 4-bit rebuild function: dequantised in forward and again in backward.
        return fused_lora_linear(x, base.dequantize, base.bias, lora_A, lora_B, settings.scaling, dropout, False)

    def _base_no_bias(self, x: Tensor) -> Tensor:
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.forward_no_bias(x)
        return super()._base_no_bias(x)

    def merge(self) -> None:
        if self.merged is not None or self.active is None or not self.enabled:
            return
        quantised = self.base_layer
        self.quantized_layer = quantised
        self.base_layer = quantised.to_linear()
        super().merge()  # LoRA's merge, now into an ordinary fp32 weight

    def unmerge(self) -> None:
        if self.merged is None:
            return
        self.base_layer = self._modules.pop("quantized_layer")
        self.merged, self._merged_ratio = None, None

    def weights_changed_by_merge(self) -> list[Tensor]:
        return []  # merging builds a new fp32 weight; no existing tensor (tied or not) is written
