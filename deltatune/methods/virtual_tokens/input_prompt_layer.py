"""The input-side virtual-token layer (prompt tuning, P-tuning); the shared hook machinery is in
`virtual_token_layer.py`.

The call's tokens are embedded here and the n virtual tokens inserted into the embedded sequence, at index 0
(PEFT's place) or 1 (after an encoder's [CLS], which its head reads):
    E' = [E(x_{<i}) ; P ; E(x_{≥i})],   mask' = [m_{<i} ; 1ⁿ ; m_{≥i}],   labels' = [l_{<i} ; -100ⁿ ; l_{≥i}]
token_type_ids get type 0 and position_ids n consecutive positions there, later positions move by n; the post-hook
removes the n virtual positions from per-token outputs again. With the prompts in front and no labels, a causal LM
is asked for the real positions' logits only (`logits_to_keep`), so the head never computes the others.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deltatune.methods.virtual_tokens.encoders import VirtualTokenEncoder
from deltatune.methods.virtual_tokens.model_layout import input_embeddings
from deltatune.methods.virtual_tokens.virtual_token_layer import (
    IGNORE_INDEX,
    VirtualTokenLayer,
    drop_virtual_positions,
    insert_constant,
)
from deltatune.models.hf import takes_logits_to_keep


class InputPromptLayer(VirtualTokenLayer):
    """Prompt tuning and P-tuning: the virtual tokens join the input embeddings."""

    def __init__(self, model: nn.Module, peft_type: str) -> None:
        super().__init__(model, peft_type)
        self.prompted: Tensor | None = None  # the inputs_embeds this layer built for the call in flight

    @classmethod
    def hook_target(cls, model: nn.Module) -> nn.Module:
        """A model with a task head that does not generate (a classifier) gets the virtual tokens in its inner
        transformer (`base_model`), whose per-token outputs come back to the head at their real length: a decoder
        classifier then finds each row's last real token from the caller's input_ids, as without a prompt. Hooked
        on the outer model it would see only inputs_embeds and read the last position, a pad token on every
        right-padded row (PEFT has that flaw). Causal LMs keep the outer hook (labels, logits_to_keep)."""
        inner = getattr(model, "base_model", model)
        generates = callable(getattr(model, "can_generate", None)) and bool(model.can_generate())
        return model if generates or not isinstance(inner, nn.Module) else inner

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
        elif index == 0 and labels is None and _keeps_every_logit(kwargs) \
                and takes_logits_to_keep(type(model)):
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


def _keeps_every_logit(kwargs: dict[str, Any]) -> bool:
    """Whether the caller left logits_to_keep at "all" (None or 0); an index tensor, possibly empty (the chunked SFT
    loss asks for none), is the caller's choice and stays."""
    keep = kwargs.get("logits_to_keep")
    return keep is None or (isinstance(keep, int) and keep == 0)
