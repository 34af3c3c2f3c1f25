"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

n trainable virtual tokens act at every attention layer l of the frozen model as extra keys and values:

    head_l(x) = softmax(Q_l(x)·[P_l^K ; K_l(x)]ᵀ/√d_h) · [P_l^V ; V_l(x)]

with P_l^K, P_l^V ∈ R^{n×(kv_heads·d_h)} (no rotary/position encoding on the prefix), the attention mask extended by
n ones and the real tokens at positions n, n+1, ... Training the prefix directly is unstable, so by default it is
reparameterised (`prefix_projection: true`, the paper's MLP): from seeds e ∈ R^{n×d_kv},

    [P_1^K, P_1^V, ..., P_N^K, P_N^V] = W₂·tanh(W₁·e + b₁) + b₂          (d_kv → encoder_hidden_size → N·2·d_kv)

and only the resulting prefix is kept afterwards: adapter files are PEFT's PREFIX_TUNING files, whose
`prompt_embeddings` is the flattened prefix (n, N·2·d_kv) in PEFT's layout, and loading one gives that table.
`prefix_projection: false` trains the prefix table itself, which is P-tuning v2 (`ptuning_v2.py`). The model gets
the prefix as a KV cache it attends over (see `virtual_token_layer.py`), so it must read `past_key_values`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.config.schema import MethodConfig
from deltatune.methods import register_method
from deltatune.methods.virtual_tokens.encoders import PromptTable, VirtualTokenEncoder
from deltatune.methods.virtual_tokens.key_value_prefix_layer import KeyValuePrefixLayer
from deltatune.methods.virtual_tokens.method_base import VirtualTokenConfig, VirtualTokenMethod, check_positive_int
from deltatune.methods.virtual_tokens.model_layout import AttentionLayout, attention_layout
from deltatune.methods.virtual_tokens.virtual_token_layer import VirtualTokenLayer


@dataclass
class PrefixTuningConfig(VirtualTokenConfig):
    name: str = "prefix"
    prefix_projection: bool = True  # train through the MLP reparameterisation (false: the prefix table itself)
    encoder_hidden_size: int | None = None  # the MLP's hidden width; None: the key/value width (as PEFT)


class PrefixEncoder(VirtualTokenEncoder):
    """Seeds `embedding` (n×d_kv) through `transform` (Linear, tanh, Linear) to the flattened prefix."""

    def __init__(self, count: int, layout: AttentionLayout, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(count, layout.kv_width)
        self.transform = nn.Sequential(nn.Linear(layout.kv_width, hidden), nn.Tanh(),
                                       nn.Linear(hidden, layout.prefix_width))
        self.peft_fields = {"encoder_hidden_size": hidden, "prefix_projection": True, "init_weights": None}

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def forward(self) -> Tensor:
        return self.transform(self.embedding.weight)


def prefix_table(count: int, layout: AttentionLayout) -> PromptTable:
    """The flattened prefix trained directly, N(0, 1) at init as PEFT's and P-tuning v2's nn.Embedding."""
    fields = {"encoder_hidden_size": layout.kv_width, "prefix_projection": False, "init_weights": None}
    return PromptTable(torch.randn(count, layout.prefix_width), fields)


@register_method("prefix")
class PrefixTuning(VirtualTokenMethod):
    description = "trained key/value prefixes at every attention layer, through an MLP while training (prefix tuning)"
    config_class: ClassVar[type[MethodConfig]] = PrefixTuningConfig
    layer_class: ClassVar[type[VirtualTokenLayer]] = KeyValuePrefixLayer
    file_type: ClassVar[str] = "PREFIX_TUNING"
    peft_type: ClassVar[str | None] = "PREFIX_TUNING"
    peft_field_names: ClassVar[tuple[str, ...]] = ("encoder_hidden_size", "prefix_projection", "init_weights")

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [*super().contract_bad_options(), ("encoder_hidden_size", 0)]

    def build_encoder(self, model: nn.Module) -> VirtualTokenEncoder:
        config: PrefixTuningConfig = self.config  # type: ignore[assignment]
        layout = attention_layout(model, self.name)
        if not config.prefix_projection:
            return prefix_table(config.num_virtual_tokens, layout)
        if config.encoder_hidden_size is not None:
            check_positive_int("method.encoder_hidden_size", config.encoder_hidden_size, "512")
        return PrefixEncoder(config.num_virtual_tokens, layout, config.encoder_hidden_size or layout.kv_width)
