"""Virtual tokens: the machinery shared by the prompt-side methods (prompt, ptuning, prefix, ptuning_v2).

Each of these methods trains n vectors that the frozen model reads as if they were extra tokens of the input:

    input side (prompt tuning, P-tuning):  E' = [P ; E(x)],  P ∈ R^{n×d}, joined to the input embeddings
    key/value side (prefix, P-tuning v2):  at every layer l, K'_l = [P_l^K ; K_l(x)],  V'_l = [P_l^V ; V_l(x)]

so every real position also attends to the n virtual ones (`encoders.py` produces them; `model_layout.py` reads the
embedding table and attention layout they must fit). The frozen model is reached by composition only: a
`VirtualTokenLayer` is registered as a submodule of the model (its parameters are the model's, so they move, save
and count like any other) and adds a forward pre-hook and a forward hook to the top-level model. The pre-hook
rewrites the call (`input_prompt_layer.py` embeds `input_ids` itself and inserts P, `key_value_prefix_layer.py`
hands the model a KV cache already holding the prefix); both extend `attention_mask` by n ones and
move the later `position_ids` by n, as PEFT does. The post-hook removes the virtual positions from per-token
outputs, so `logits` keep the input's shape and the objectives need no change.

Generation with a KV cache: the virtual tokens enter the cache at the first (prefill) call; later calls, whose
cache is not empty, only extend the mask and positions by n, so cached and uncached generation see the same
sequence. Packed rows (position_ids restarting inside a row) would share one set of virtual tokens between
unrelated examples, so they are refused with a one-line UserError.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.errors import UserError
from deltatune.methods.shared.switch import AdapterSwitch
from deltatune.methods.virtual_tokens.encoders import PromptTable, VirtualTokenEncoder

IGNORE_INDEX = -100  # labels of virtual positions: no loss there
PACKING_ERROR = ("prompt-side methods (prompt, ptuning, prefix, ptuning_v2) cannot keep packed examples apart "
                 "(position_ids restart inside a row); set data.packing: false")


# ---- the adapter layer -----------------------------------------------------------------------------------------
class VirtualTokenLayer(AdapterSwitch, nn.Module):
    """Named virtual-token adapters of one PEFT type on a model, with the hooks that feed the active one in.

    Implements `deltatune.methods.shared.protocol.AdapterLayer`. It holds no base module: `outside_base_model` tells
    `save_adapter` that its state sits at the top of PEFT's file (`prompt_embeddings`), not under a module name.
    """

    outside_base_model: ClassVar[bool] = True
    peft_type: str  # one layer per PEFT type, so an adapter's files have a single type

    def __init__(self, model: nn.Module, peft_type: str) -> None:
        super().__init__()
        self.peft_type = peft_type
        self.encoders = nn.ModuleDict()
        # Bound methods of this module, so a deepcopy of the model carries hooks bound to the copied layer.
        target = self.hook_target(model)
        target.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        target.register_forward_hook(self._after_forward, with_kwargs=True)

    @classmethod
    def hook_target(cls, model: nn.Module) -> nn.Module:
        """The module whose calls get the virtual tokens: the model itself."""
        return model

    @classmethod
    def attach(cls, model: nn.Module, peft_type: str) -> VirtualTokenLayer:
        """The model's layer for `peft_type`, created (as submodule `deltatune_<type>`) on first use."""
        attribute = f"deltatune_{peft_type.lower()}"
        layer = getattr(model, attribute, None)
        if layer is None:
            layer = cls(model, peft_type)
            model.add_module(attribute, layer)
        return layer

    @classmethod
    def token_width(cls, model: nn.Module) -> int:
        """The width of one virtual token this layer feeds to `model`."""
        raise NotImplementedError

    @classmethod
    def peft_dimensions(cls, model: nn.Module) -> dict[str, Any]:
        """PEFT's token_dim / num_attention_heads / num_layers for this kind of layer on `model`."""
        raise NotImplementedError

    def add_adapter(self, name: str, encoder: VirtualTokenEncoder) -> None:
        self.encoders[name] = encoder

    def current(self) -> VirtualTokenEncoder | None:
        """The encoder that takes part in this call, or None when the layer is off."""
        if not self.enabled or self.active is None:
            return None
        return self.encoders[self.active]  # type: ignore[return-value]

    # -- hooks -----------------------------------------------------------------------------------------------
    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        encoder = self.current()
        if encoder is None:
            return None
        kwargs = _as_keywords(model, args, kwargs)
        count = encoder.num_virtual_tokens
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            # A later generation step: the virtual tokens are in the cache already; only masks/positions move.
            kwargs["attention_mask"] = _insert_ones(kwargs.get("attention_mask"), encoder.insert_at, count)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + count
            return (), kwargs
        _refuse_packed(kwargs.get("position_ids"), kwargs.get("attention_mask"))
        self.inject(model, encoder, kwargs)
        kwargs["attention_mask"] = _insert_ones(kwargs.get("attention_mask"), encoder.insert_at, count)
        return (), kwargs

    def inject(self, model: nn.Module, encoder: VirtualTokenEncoder, kwargs: dict[str, Any]) -> None:
        """Put the virtual tokens into the call's keyword arguments (in place)."""
        raise NotImplementedError

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        return None

    # -- the AdapterLayer protocol -----------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.encoders)

    def merge(self) -> None:
        raise UserError("prompt-side adapters (virtual tokens) cannot be merged into weights or exported as a "
                        "plain model; keep the adapter and save it with deltatune.save_adapter (peft reads it)")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def weights_changed_by_merge(self) -> list[Tensor]:
        return []

    def unwrap(self) -> nn.Module:
        self.merge()  # never returns: there is no plain module equivalent to virtual tokens
        return self

    def combine(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        """A table of Σ wᵢ·tokensᵢ (the adapters must have the same number and width of virtual tokens)."""
        chosen = [(name, weight) for name, weight in zip(names, weights) if name in self.encoders]
        if not chosen:
            return
        with torch.no_grad():
            present = [(self.encoders[name]().detach().float(), weight) for name, weight in chosen]
        places = {self.encoders[name].insert_at for name, _ in chosen}
        if len(places) > 1:  # a prompt after [CLS] and one before it are not the same input
            raise UserError(f"cannot combine virtual-token adapters inserted at different places {sorted(places)}; "
                            "train them with the same method.keep_first_token")
        shapes = {tuple(tokens.shape) for tokens, _ in present}
        if len(shapes) > 1:
            raise UserError(f"cannot combine virtual-token adapters of different shapes {sorted(shapes)}; give them "
                            f"the same num_virtual_tokens")
        tokens = sum(weight * tokens for tokens, weight in present)
        first: VirtualTokenEncoder = self.encoders[chosen[0][0]]  # type: ignore[assignment]
        combined = PromptTable(tokens, first.peft_fields, trainable=False)  # type: ignore[arg-type]
        combined.insert_at = first.insert_at
        self.encoders[new_name] = combined

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """PEFT's saved state: the resolved virtual tokens, whatever encoder produced them."""
        return {"prompt_embeddings": self.encoders[name]().detach()}

    def delete_adapter(self, name: str) -> None:
        del self.encoders[name]
        self._forget(name)


# ---- call rewriting helpers ------------------------------------------------------------------------------------
def _as_keywords(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments all by name (model(ids) is model(input_ids=ids)), as a new dict."""
    if not args:
        return dict(kwargs)
    positional = [name for name, parameter in inspect.signature(model.forward).parameters.items()
                  if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(positional):
        raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments")
    return {**dict(zip(positional, args)), **kwargs}


def insert_constant(tensor: Tensor, index: int, count: int, value: int) -> Tensor:
    """`count` columns of `value` inserted into `tensor`'s sequence dimension (dim 1) at `index`."""
    shape = (tensor.shape[0], count, *tensor.shape[2:])
    filler = torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor[:, :index], filler, tensor[:, index:]], dim=1)


def _insert_ones(mask: Tensor | None, index: int, count: int) -> Tensor | None:
    if mask is None:
        return None
    if mask.dim() != 2:
        raise UserError(f"prompt-side methods need a 2-D attention_mask (batch, length), got shape "
                        f"{tuple(mask.shape)}; pass the tokenizer's attention_mask")
    return insert_constant(mask, index, count, 1)


def _refuse_packed(positions: Tensor | None, mask: Tensor | None) -> None:
    """UserError when positions restart inside a row among attended tokens (packed examples)."""
    if positions is None or positions.shape[-1] < 2:
        return
    steps = positions[..., 1:] - positions[..., :-1]
    restarts = steps != 1
    if mask is not None and mask.dim() == 2:
        attended = mask.bool()
        restarts = restarts & attended[:, 1:] & attended[:, :-1]
    if bool(restarts.any()):
        raise UserError(PACKING_ERROR)


def drop_virtual_positions(output: Any, total: int, index: int, count: int) -> Any:
    """The output without positions index..index+count-1 in every per-token tensor (sequence dim 1 of length
    `total`), including tuples of them (hidden_states); other values (pooled logits, loss, caches) are kept."""

    def trim(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() >= 3 and value.shape[1] == total:
            # At either end a slice (a view) suffices; copying a (batch, length, vocabulary) logits tensor, and its
            # gradient in backward, is a visible share of a causal LM's step.
            if index == 0:
                return value[:, count:]
            if index + count == total:
                return value[:, :index]
            return torch.cat([value[:, :index], value[:, index + count:]], dim=1)
        if isinstance(value, tuple) and value and all(isinstance(item, Tensor) for item in value):
            return tuple(trim(item) for item in value)
        return value

    if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        for key in list(output.keys()):
            output[key] = trim(output[key])
        return output
    if isinstance(output, tuple):
        return tuple(trim(item) for item in output)
    return trim(output)
