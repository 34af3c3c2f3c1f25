"""What the virtual-token methods need to know about the model: its token embedding table (input-side methods)
and its attention layout (key/value prefixes), each a one-line UserError for models that lack it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.errors import UserError


@dataclass(frozen=True)
class AttentionLayout:
    """Where key/value prefixes go: one (key, value) pair of kv_heads × head_dim per layer and virtual token."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        """Width of one key (or value) vector over all key/value heads: PEFT's token_dim for prefix tuning."""
        return self.kv_heads * self.head_dim

    @property
    def prefix_width(self) -> int:
        """Width of one virtual token's prefix over all layers: keys and values, num_layers·2·kv_width."""
        return self.num_layers * 2 * self.kv_width


def attention_layout(model: nn.Module, method: str) -> AttentionLayout:
    """The attention layout from the model's transformers config; a UserError when it cannot be found."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    values = {key: getattr(config, key, None) for key in ("num_hidden_layers", "num_attention_heads", "hidden_size")}
    if not all(isinstance(value, int) and value > 0 for value in values.values()):
        raise UserError(f"method {method} needs the attention layout (num_hidden_layers, num_attention_heads, "
                        f"hidden_size in model.config), which this {type(model).__name__} lacks; use a transformers "
                        f"model or another method (e.g. prompt or lora)")
    heads = values["num_attention_heads"]
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or values["hidden_size"] // heads
    return AttentionLayout(values["num_hidden_layers"], kv_heads, head_dim)


def input_embeddings(model: nn.Module, method: str) -> nn.Embedding:
    """The model's token embedding table; a UserError for models without one."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Embedding):
        raise UserError(f"method {method} prepends vectors to the token embeddings, but this {type(model).__name__} "
                        f"has no get_input_embeddings() nn.Embedding; use a transformers text model or another method")
    return embeddings
