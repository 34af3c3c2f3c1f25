"""The two ways virtual tokens enter a frozen model (see `_virtual_tokens.py` for the shared machinery).

InputPromptLayer (prompt tuning, P-tuning): the call's tokens are embedded here and the n virtual tokens inserted
    into the embedded sequence, at index 0 (PEFT's place) or 1 (after an encoder's [CLS], which its head reads):
        E' = [E(x_{<i}) ; P ; E(x_{≥i})],   mask' = [m_{<i} ; 1ⁿ ; m_{≥i}],   labels' = [l_{<i} ; -100ⁿ ; l_{≥i}]
    token_type_ids get type 0 and position_ids n consecutive positions there, later positions move by n; the
    post-hook removes the n virtual positions from per-token outputs again. With the prompts in front and no labels,
    a causal LM is asked for the real positions' logits only (`logits_to_keep`), so the head never computes the others.
KeyValuePrefixLayer (prefix tuning, P-tuning v2): the flattened prefix (n, N·2·kv_heads·d_h) is split, in PEFT's
    order, into per-layer keys and values (batch, kv_heads, n, d_h) and put into the KV cache the model is called
    with, so each attention layer concatenates them before its own keys/values: K'_l = [P_l^K ; K_l(x)]. The real
    tokens then sit at positions n, n+1, ... (the model counts from the cache length; given positions move by n).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import UserError
from deltatune.methods._virtual_tokens import (
    IGNORE_INDEX,
    VirtualTokenEncoder,
    VirtualTokenLayer,
    attention_layout,
    drop_virtual_positions,
    input_embeddings,
    insert_constant,
)


class InputPromptLayer(VirtualTokenLayer):
    """Prompt tuning and P-tuning: the virtual tokens join the input embeddings."""

    def __init__(self, model: nn.Module, peft_type: str) -> None:
        super().__init__(model, peft_type)
        self.prompted: Tensor | None = None  # the inputs_embeds this layer built for the call in flight

    @classmethod
    def token_width(cls, model: nn.Module) -> int:
        return input_embeddings(model, "prompt").embedding_dim

    @classmethod
    def peft_dimensions(cls, model: nn.Module) -> dict[str, Any]:
        config = getattr(model, "config", None)
        return {"token_dim": cls.token_width(model),
                "num_attention_heads": getattr(config, "num_attention_heads", None),
                "num_layers": getattr(config, "num_hidden_layers", None)}

    def inject(self, model: nn.Module, encoder: VirtualTokenEncoder, kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
        batch, length = embeds.shape[:2]
        index, count = min(encoder.insert_at, length), encoder.num_virtual_tokens
        prompts = encoder().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = self.prompted = torch.cat([embeds[:, :index], prompts, embeds[:, index:]], dim=1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = insert_constant(kwargs["token_type_ids"], index, count, 0)
        positions = kwargs.get("position_ids")
        if positions is not None:
            virtual = torch.arange(index, index + count, device=positions.device, dtype=positions.dtype)
            kwargs["position_ids"] = torch.cat([positions[..., :index], virtual.expand(*positions.shape[:-1], count),
                                                positions[..., index:] + count], dim=-1)
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor) and labels.dim() >= 2 and labels.shape[:2] == (batch, length):
            kwargs["labels"] = insert_constant(labels, index, count, IGNORE_INDEX)  # no loss on virtual tokens
        elif index == 0 and labels is None and not kwargs.get("logits_to_keep") and _keeps_logits(type(model)):
            # Logits for the real (last `length`) positions only: the LM head skips the n virtual ones, and backward
            # skips the zero-filled (batch, length + n, vocabulary) gradient that slicing them off would cost. Not
            # when the model computes the loss itself: its labels cover every position.
            kwargs["logits_to_keep"] = length

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        prompted, self.prompted = self.prompted, None
        encoder = self.current()
        if prompted is None or encoder is None or kwargs.get("inputs_embeds") is not prompted:
            return None
        count = encoder.num_virtual_tokens
        index = min(encoder.insert_at, prompted.shape[1] - count)
        return drop_virtual_positions(output, prompted.shape[1], index, count)


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    """Whether the model class computes logits for its last positions only on request (transformers' causal LMs,
    `logits_to_keep`); cached per class, as it is asked on every forward."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


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
