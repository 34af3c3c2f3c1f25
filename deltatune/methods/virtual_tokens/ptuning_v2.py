"""P-tuning v2 (Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks").

Deep prompts: n trainable virtual tokens at every layer of the frozen model, as keys and values of its attention,

    head_l(x) = softmax(Q_l(x)·[P_l^K ; K_l(x)]ᵀ/√d_h) · [P_l^V ; V_l(x)],   P_l^K, P_l^V ∈ R^{n×(kv_heads·d_h)}

trained directly, without prefix tuning's MLP reparameterisation (the paper finds it unnecessary, and harmful on
some tasks), together with a newly initialised task head (a classifier on BERT-style encoders, which the paper
targets; for causal LMs there is no new head). Everything else, and the adapter files (PEFT's PREFIX_TUNING with
`prefix_projection: false`, read back by `prefix`), is shared with `prefix.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from deltatune.config.schema import MethodConfig
from deltatune.methods import register_method
from deltatune.methods.virtual_tokens.encoders import PromptTable
from deltatune.methods.virtual_tokens.method_base import VirtualTokenConfig, VirtualTokenMethod
from deltatune.methods.virtual_tokens.model_layout import attention_layout
from deltatune.methods.virtual_tokens.prefix import PrefixTuning, prefix_table


@dataclass
class PTuningV2Config(VirtualTokenConfig):
    name: str = "ptuning_v2"


@register_method("ptuning_v2")
class PTuningV2(PrefixTuning):
    description = "trained deep prompts (key/value prefixes) at every layer, no reparameterisation (P-tuning v2)"
    config_class: ClassVar[type[MethodConfig]] = PTuningV2Config
    peft_type: ClassVar[str | None] = None  # its files are PREFIX_TUNING files, which `prefix` reads

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return VirtualTokenMethod.contract_bad_options()  # prefix's encoder options are not P-tuning v2's

    def build_encoder(self, model: nn.Module) -> PromptTable:
        config: PTuningV2Config = self.config  # type: ignore[assignment]
        return prefix_table(config.num_virtual_tokens, attention_layout(model, self.name))
