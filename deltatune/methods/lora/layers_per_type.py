"""LoRA layers per base type: nn.Linear and transformers' Conv1D, nn.Conv2d, nn.Embedding.

Each subclass of `LoRALayer` (see `lora_layer.py` for the maths) says how its factors are stored (PEFT's names),
how A and B apply to an input, and how the output-major update s·B·A maps onto the base weight's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import UserError
from deltatune.methods.lora.fused_linear import can_fuse, fused_lora_linear
from deltatune.methods.lora.lora_layer import MAGNITUDE_KEY, LoRALayer
from deltatune.methods.shared.model_surgery import replace_module
from deltatune.methods.shared.targets import is_conv1d

SUPPORTED_TYPES = "torch.nn.Linear, transformers' Conv1D, torch.nn.Conv2d (groups=1) and torch.nn.Embedding"


def layer_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class that can wrap `module`, or None when its type is not supported. A module type may name
    its own through a `lora_layer_class()` static method (e.g. qlora's 4-bit NF4Linear), so variants need no
    changes here."""
    own = getattr(module, "lora_layer_class", None)
    if callable(own):
        return own()
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoRALinear
    if isinstance(module, nn.Conv2d):
        return LoRAConv2d if module.groups == 1 else None
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    return None


def wrap(model: nn.Module, module_name: str, module: nn.Module) -> LoRALayer:
    """Replace `module` (named `module_name` in `model`) by a LoRA layer around it."""
    layer_class = layer_class_for(module)
    assert layer_class is not None, "callers check the type first"
    if not module_name:
        raise UserError("LoRA cannot wrap the model itself; put the layer inside a module (e.g. nn.Sequential)")
    layer = layer_class(module)
    replace_module(model, module_name, layer)
    return layer


class LoRALinear(LoRALayer):
    """LoRA on nn.Linear (weight (out, in)) and transformers' Conv1D (weight (in, out), PEFT's `fan_in_fan_out`)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        # The fused path computes the base matmul itself, which is only right for the two exact types it knows
        # (a subclass, such as qlora's NF4Linear, computes its base differently).
        self._fused = type(base_layer) is nn.Linear or self.fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @staticmethod
    def _features(base: nn.Module) -> tuple[int, int]:
        rows, cols = base.weight.shape
        return (rows, cols) if is_conv1d(base) else (cols, rows)

    @classmethod
    def expected_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        fan_in, fan_out = cls._features(base)
        return {"lora_A.weight": (r, fan_in), "lora_B.weight": (fan_out, r), MAGNITUDE_KEY: (fan_out,)}

    def _new_factors(self, name: str, r: int) -> None:
        fan_in, fan_out = self._features(self.base_layer)
        like = {"device": self.base_layer.weight.device, "dtype": self.base_layer.weight.dtype}
        self.lora_A[name] = nn.Linear(fan_in, r, bias=False, **like)
        self.lora_B[name] = nn.Linear(r, fan_out, bias=False, **like)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _output_major(self, weight: Tensor) -> Tensor:
        return weight.t() if self.fan_in_fan_out else weight

    def _to_base_layout(self, output_major: Tensor) -> Tensor:
        return output_major.t() if self.fan_in_fan_out else output_major

    def _low_rank(self, x: Tensor, name: str) -> Tensor:
        lora_A, lora_B = self.factors(name)
        hidden = F.linear(x, lora_A)
        # Scale the r-wide hidden activations rather than the (much wider) output.
        return F.linear(hidden.mul_(self.settings[name].scaling), lora_B)

    def _base_no_bias(self, x: Tensor) -> Tensor:
        return F.linear(x, self._output_major(self.base_layer.weight))

    def _fused_forward(self, x: Tensor, name: str) -> Tensor | None:
        weight = self.base_layer.weight
        if not self._fused or not can_fuse(x, weight):
            return None
        settings = self.settings[name]
        lora_A, lora_B = self.factors(name)
        dropout = self.dropout_now(name)
        return fused_lora_linear(x, weight, self.base_layer.bias, lora_A, lora_B, settings.scaling, dropout,
                                 self.fan_in_fan_out)


class LoRAConv2d(LoRALayer):
    """LoRA on nn.Conv2d (groups=1): A is a conv with the base's kernel, stride, padding and dilation into r
    channels, B a 1×1 conv back out, so B∘A is again a conv of the base's shape and merges into it."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @classmethod
    def expected_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        out_channels, in_channels, *kernel = base.weight.shape
        return {"lora_A.weight": (r, in_channels, *kernel), "lora_B.weight": (out_channels, r, 1, 1),
                MAGNITUDE_KEY: (1, out_channels, 1, 1)}

    def _new_factors(self, name: str, r: int) -> None:
        base: nn.Conv2d = self.base_layer  # type: ignore[assignment]
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                      base.dilation, bias=False, padding_mode=base.padding_mode, **like)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, bias=False, **like)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _per_output(self, vector: Tensor) -> Tensor:
        return vector.view(1, -1, 1, 1)

    def _low_rank(self, x: Tensor, name: str) -> Tensor:
        hidden = self.lora_A[name](x)
        return self.lora_B[name](hidden.mul_(self.settings[name].scaling))

    def _base_no_bias(self, x: Tensor) -> Tensor:
        return self.base_layer._conv_forward(x, self.base_layer.weight, None)  # honours padding_mode


class LoRAEmbedding(LoRALayer):
    """LoRA on nn.Embedding: A is (r, vocabulary) and is looked up like the embedding, B (dim, r) maps the r-wide
    lookup to the embedding width. Following PEFT, A starts at zero and B random (the lookup of a zero A is zero),
    and dropout is not applied (the input is token ids)."""

    factor_keys = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @classmethod
    def expected_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        vocabulary, dim = base.weight.shape
        return {"lora_embedding_A": (r, vocabulary), "lora_embedding_B": (dim, r), MAGNITUDE_KEY: (dim,)}

    def _new_factors(self, name: str, r: int) -> None:
        vocabulary, dim = self.base_layer.weight.shape
        like = {"device": self.base_layer.weight.device, "dtype": self.base_layer.weight.dtype}
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, vocabulary, **like))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r, **like))

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _initialise(self, name: str, how: bool | str) -> None:
        if how is not False:
            lora_A, lora_B = self.factors(name)
            nn.init.zeros_(lora_A)
            nn.init.normal_(lora_B)

    def _dropout(self, x: Tensor, name: str) -> Tensor:
        return x

    def _output_major(self, weight: Tensor) -> Tensor:
        return weight.t()  # one row per embedding dimension, over the vocabulary (as PEFT's DoRA)

    def _to_base_layout(self, output_major: Tensor) -> Tensor:
        return output_major.t()

    def _low_rank(self, x: Tensor, name: str) -> Tensor:
        lora_A, lora_B = self.factors(name)
        hidden = F.embedding(x, lora_A.t(), padding_idx=self.base_layer.padding_idx)
        return F.linear(hidden, lora_B).mul_(self.settings[name].scaling)

    def _base_no_bias(self, x: Tensor) -> Tensor:
        return self.base_layer(x)
