"""The key/value virtual-token layer (prefix tuning, P-tuning v2); the shared hook machinery is in
`virtual_token_layer.py`.

The flattened prefix (n, N·2·kv_heads·d_h) is split, in PEFT's order, into per-layer keys and values
(batch, kv_heads, n, d_h) and put into the KV cache the model is called with, so each attention layer concatenates
them before its own keys/values: K'_l = [P_l^K ; K_l(x)]. The real tokens then sit at positions n, n+1, ... (the
model counts from the cache length; given positions move by n).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.errors import UserError
from deltatune.methods.virtual_tokens.encoders import VirtualTokenEncoder
from deltatune.methods.virtual_tokens.model_layout import attention_layout
from deltatune.methods.virtual_tokens.virtual_token_layer import VirtualTokenLayer


class KeyValuePrefixLayer(VirtualTokenLayer):
    """Prefix tuning and P-tuning v2: the virtual tokens are keys and values at every attention layer, handed to
    the model as a KV cache that already holds them (the model's own attention concatenates them)."""

    def __init__(self, model: nn.Module, peft_type: str) -> None:
        super().__init__(model, peft_type)
        self.layout = attention_layout(model, "prefix")
        self.prefixed: Any = None  # the cache this layer filled for the call in flight

    @classmethod
    def token_width(cls, model: nn.Module) -> int:
        return attention_layout(model, "prefix").prefix_width

    @classmethod
    def peft_dimensions(cls, model: nn.Module) -> dict[str, Any]:
        # PEFT describes one key (or value) over the key/value heads, which differ from the query heads under GQA.
        layout = attention_layout(model, "prefix")
        return {"token_dim": layout.kv_width, "num_attention_heads": layout.kv_heads, "num_layers": layout.num_layers}

    def inject(self, model: nn.Module, encoder: VirtualTokenEncoder, kwargs: dict[str, Any]) -> None:
        from transformers import DynamicCache

        if model.training and getattr(model, "is_activation_checkpointing", False):
            raise UserError("prefix methods cannot train with gradient checkpointing: the checkpointed layers drop "
                            "the KV cache that carries the prefix; call model.gradient_checkpointing_disable()")
        reference = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        batch, count, layout = reference.shape[0], encoder.num_virtual_tokens, self.layout
        dtype = model.get_input_embeddings().weight.dtype
        # (n, layers·2·kv_width) → (layers, 2, kv_heads, n, head_dim): PEFT's order, so its files mean the same.
        prefix = encoder().to(dtype).view(count, layout.num_layers, 2, layout.kv_heads, layout.head_dim)
        prefix = prefix.permute(1, 2, 3, 0, 4)
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = DynamicCache(config=model.config)
        for index in range(layout.num_layers):
            keys, values = (prefix[index, part].unsqueeze(0).expand(batch, -1, -1, -1) for part in (0, 1))
            cache.update(keys, values, index)
        kwargs["past_key_values"] = self.prefixed = cache
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + count

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        cache, self.prefixed = self.prefixed, None
        encoder = self.current()
        if cache is None or encoder is None or kwargs.get("past_key_values") is not cache:
            return None
        if cache.get_seq_length() <= encoder.num_virtual_tokens:
            raise UserError(f"{type(model).__name__} ignored the key/value prefix (its attention does not read "
                            f"past_key_values); prefix methods cannot adapt it, use prompt or lora instead")
        if kwargs.get("use_cache") is False and isinstance(output, dict) and output.get("past_key_values") is cache:
            # The cache only carried the prefix; returned, generate(use_cache=False) would feed it back next step.
            return type(output)(**{key: value for key, value in output.items() if key != "past_key_values"})
        return None
