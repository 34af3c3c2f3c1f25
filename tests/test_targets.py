"""The target rule every wrapping method shares (deltatune.methods.shared.targets): a module its parent never calls
is never adapted in silence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
from deltatune.errors import UserError


class AttentionBlock(nn.Module):
    """A torch-native block: nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x, x, x)
        return self.head(self.mlp(attended).mean(1))


@pytest.mark.parametrize("method", ["lora", "sparse"])
def test_an_adapter_on_multihead_attention_out_proj_is_refused_when_named(method: str) -> None:
    with pytest.raises(UserError, match=r"attention\.out_proj is the out_proj of an nn\.MultiheadAttention.*leave it "
                                        r"out of method\.target_modules"):
        deltatune.apply(AttentionBlock(), {"name": method, "target_modules": ["out_proj", "mlp"]})


def test_all_linear_leaves_multihead_attention_out_proj_out() -> None:
    torch.manual_seed(0)
    model = AttentionBlock()
    deltatune.apply(model, {"name": "lora", "target_modules": "all-linear", "modules_to_save": []})
    assert set(deltatune.adapters.adapter_layers(model)) == {"mlp", "head"}


def test_an_adapter_on_out_proj_would_never_run() -> None:
    """Why: the wrapped out_proj's forward is not called by nn.MultiheadAttention (the weight is read directly)."""
    model = AttentionBlock()
    calls = []
    model.attention.out_proj.register_forward_hook(lambda *args: calls.append(1))
    model(torch.randn(1, 3, 8))
    assert calls == []
