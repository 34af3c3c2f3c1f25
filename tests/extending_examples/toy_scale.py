"""Toy output scaling, after (IA)³ (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning"): each chosen linear layer keeps its weights frozen and learns one scale per
output feature.

Update: y = ℓ ⊙ (W x + b), with ℓ ∈ R^out initialised to 1, so the model computes exactly what it did before
training starts. Only ℓ (and the new task head) train: out_features numbers per chosen layer.
"""

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods import register_method
from deltatune.methods.base import Method, WrapperLayer, set_trainable
from deltatune.models.families import Family


@dataclass
class ToyScaleConfig(MethodConfig):
    name: str = "toy_scale"
    include_mlp: bool = True  # scale the feed-forward linears too, not only the attention ones
    train_head: bool = True  # a freshly initialised head must train or the model cannot learn the task


class ScaledLinear(WrapperLayer):
    """y = scale ⊙ base_layer(x): the frozen linear layer, then one trained factor per output feature."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale = nn.Parameter(torch.ones(base_layer.out_features))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.base_layer(inputs) * self.scale


@register_method("toy_scale")
class ToyScale(Method):
    description = "learn one scale per output feature of the attention (and MLP) linears, as (IA)3 does"
    config_class = ToyScaleConfig
    model_kinds = frozenset({"transformer"})

    def apply(self, model: nn.Module, family: Family) -> None:
        config: ToyScaleConfig = self.config  # type: ignore[assignment]
        targets = [
            name for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and (family.is_attention(name) or (config.include_mlp and family.is_mlp(name)))
        ]
        if not targets:
            raise UserError("method toy_scale found no attention or MLP linear layer in this model; "
                            "choose another method (deltatune methods lists them)")
        # Freeze everything first: the scales created below are new parameters and train by default.
        set_trainable(model, lambda name: config.train_head and family.is_head(name))
        for name in targets:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child_name, ScaledLinear(getattr(parent, child_name)))
