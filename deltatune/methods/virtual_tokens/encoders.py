"""The trained virtual tokens: what produces the (num_virtual_tokens, width) tensor a virtual-token layer feeds in.

`VirtualTokenEncoder` is the interface; `PromptTable` is the plain trained table (prompt tuning, P-tuning v2 and
every adapter read from PEFT's files). P-tuning and prefix tuning build their reparameterising encoders in their
method files.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class VirtualTokenEncoder(nn.Module):
    """Produces the virtual tokens: `forward()` returns a (num_virtual_tokens, width) tensor.

    peft_fields: this encoder's type-specific fields of PEFT's adapter_config.json (e.g. its init or MLP size).
    insert_at: the sequence index the virtual tokens go to; 0 (PEFT's place) or 1, after the first token, so
    that an encoder's head that reads position 0 ([CLS]) still reads a real token.
    """

    peft_fields: dict[str, Any]
    insert_at: int = 0

    @property
    def num_virtual_tokens(self) -> int:
        raise NotImplementedError


class PromptTable(VirtualTokenEncoder):
    """The virtual tokens as a plain trained table (prompt tuning, P-tuning v2, and every adapter read from PEFT's
    files, which hold the resolved tokens). Named like PEFT's `embedding` so the state reads the same."""

    def __init__(self, tokens: Tensor, peft_fields: dict[str, Any] | None = None, trainable: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(*tokens.shape, device=tokens.device, dtype=torch.float32)
        with torch.no_grad():
            self.embedding.weight.copy_(tokens)
        self.embedding.weight.requires_grad_(trainable)
        self.peft_fields = dict(peft_fields or {})

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def forward(self) -> Tensor:
        return self.embedding.weight
