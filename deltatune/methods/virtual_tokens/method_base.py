"""The `Method` side shared by the prompt-side methods: applying one, and PEFT's files for it.

Applying freezes the whole base, attaches the method's `VirtualTokenLayer` (see `virtual_token_layer.py`) with the
method's encoder of the virtual tokens as adapter `adapter_name`, and gives the modules_to_save (default: the
family's new task head, LoRA's rule) a trainable copy each, as LoRA does. A subclass says which layer it feeds
(`layer_class`), which PEFT type its files have, and how to build its encoder.

Input-side prompts on a model that does not generate (a BERT-style classifier) go after its first token by
default (`keep_first_token`): the head pools position 0 ([CLS]), and a virtual token there would hide the input
from it (on a freshly initialised encoder the pooled vector barely depends on the text; the P-tuning v2 authors
pool [CLS] for the same reason). PEFT always puts prompts first, so such adapters are not saved in PEFT's format;
`keep_first_token: false` trains one that is.

PEFT's files for these types (peft 0.21, `get_peft_model_state_dict` / `PeftModel.get_prompt_embedding_to_save`)
hold one tensor, `prompt_embeddings`: the *resolved* virtual tokens, (n, token_dim) for prompt/P-tuning and
(n, num_layers·2·token_dim) for prefix tuning, whatever encoder produced them (PEFT loads them for inference as a
plain table). Modules_to_save sit under "base_model." (not "base_model.model." as for LoRA) because a prompt-
learning PeftModel holds the transformers model directly. Loading therefore gives a plain table, trainable on
request: the encoder's MLP/LSTM is a training-time reparameterisation that the file does not keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods.base import Method, set_trainable
from deltatune.methods.shared.model_surgery import check_new_name, set_adapter
from deltatune.methods.shared.modules_to_save import add_copies, choose_modules_to_save
from deltatune.methods.shared.protocol import AdapterLayer
from deltatune.methods.virtual_tokens.encoders import PromptTable, VirtualTokenEncoder
from deltatune.methods.virtual_tokens.input_prompt_layer import InputPromptLayer
from deltatune.methods.virtual_tokens.virtual_token_layer import VirtualTokenLayer
from deltatune.models.families import Family

PROMPT_LEARNING_PREFIX = "base_model."  # where PEFT keeps base-model modules (the new head) in these files


@dataclass
class VirtualTokenConfig(MethodConfig):
    num_virtual_tokens: int = 20
    modules_to_save: list[str] | None = None  # None: the family's new task head (e.g. BERT's classifier + pooler)


@dataclass
class InputPromptConfig(VirtualTokenConfig):
    # Insert the virtual tokens after the first token, so a head reading position 0 ([CLS]) reads a real token.
    # None: yes for models that do not generate (encoders), no for causal LMs. false = PEFT's place (its files).
    keep_first_token: bool | None = None


def check_positive_int(key: str, value: Any, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{key} must be a positive whole number, got {value!r}; e.g. {example}")


class VirtualTokenMethod(Method):
    """Base of prompt, ptuning, prefix and ptuning_v2: subclasses set the ClassVars and implement build_encoder."""

    config_class: ClassVar[type[MethodConfig]] = VirtualTokenConfig
    model_kinds: ClassVar[frozenset[str]] = frozenset({"transformer"})
    preserves_output_at_init: ClassVar[bool] = False  # virtual tokens have no neutral value
    init_change_from: ClassVar[str] = "adapter"  # ... but the base is untouched: disabled(model) is the original
    named_adapters: ClassVar[bool] = True
    saves_adapter_files: ClassVar[bool] = True  # PEFT's files (on encoders only with keep_first_token: false)
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "train.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
        "method.num_virtual_tokens": {"type": "categorical", "choices": [10, 20, 30]}}
    layer_class: ClassVar[type[VirtualTokenLayer]]
    file_type: ClassVar[str]  # the PEFT type of this method's adapter files
    peft_type: ClassVar[str | None] = None  # the type `load_adapter` maps to this class (None: another class reads)
    peft_key_prefix: ClassVar[str] = PROMPT_LEARNING_PREFIX
    peft_config_omits: ClassVar[tuple[str, ...]] = ("bias",)  # PEFT's prompt-learning configs have no bias field
    # PEFT runs virtual tokens only in its task-specific PeftModel classes; a plain PeftModel ignores them.
    needs_task_type: ClassVar[bool] = True
    peft_field_names: ClassVar[tuple[str, ...]] = ()  # this type's own fields of adapter_config.json

    def __init__(self, config: MethodConfig, adapter_name: str = "default") -> None:
        super().__init__(config)
        self.adapter_name = adapter_name

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [("num_virtual_tokens", 0), ("num_virtual_tokens", -3), ("modules_to_save", ["no_such_head"])]

    def apply(self, model: nn.Module, family: Family) -> None:
        config: VirtualTokenConfig = self.config  # type: ignore[assignment]
        check_positive_int("method.num_virtual_tokens", config.num_virtual_tokens, "20")
        check_new_name(model, self.adapter_name)
        encoder = self.build_encoder(model)  # may raise a UserError: before anything changes
        encoder.insert_at = self.insert_at(model)
        # Which modules train in full follows LoRA's rule (names, suffixes or regexes; default the new head).
        saved = choose_modules_to_save(model, family, config.modules_to_save)
        set_trainable(model, lambda name: False)
        layer = self.layer_class.attach(model, self.file_type)
        layer.add_adapter(self.adapter_name, encoder.to(_device_of(model)))
        add_copies(model, saved, self.adapter_name)
        set_adapter(model, self.adapter_name)

    def build_encoder(self, model: nn.Module) -> VirtualTokenEncoder:
        """The trainable encoder of this method's virtual tokens for `model` (UserError for bad settings)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_encoder()")

    def insert_at(self, model: nn.Module) -> int:
        """Where in the sequence the virtual tokens go (key/value prefixes always come first)."""
        return 0

    # ---- PEFT's files (see deltatune.methods.shared.protocol.PeftFormat) -------------------------------------
    @classmethod
    def peft_config(cls, model: nn.Module, layers: dict[str, AdapterLayer], name: str) -> dict[str, Any]:
        (layer,) = layers.values()  # one virtual-token layer per PEFT type
        assert isinstance(layer, VirtualTokenLayer)
        encoder: VirtualTokenEncoder = layer.encoders[name]  # type: ignore[assignment]
        if encoder.insert_at != 0:
            raise UserError(f"adapter {name!r} puts its virtual tokens after the first token, which PEFT's files "
                            f"cannot express; train it with method.keep_first_token: false to save it for PEFT")
        return {"num_virtual_tokens": encoder.num_virtual_tokens, "num_transformer_submodules": 1,
                **type(layer).peft_dimensions(model), **encoder.peft_fields}

    @classmethod
    def plan_peft_load(cls, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], name: str,
                       trainable: bool) -> tuple[Callable[[], None], set[str]]:
        if config.get("num_transformer_submodules") not in (None, 1):
            raise UserError("the adapter is for an encoder-decoder model (num_transformer_submodules=2), which "
                            "deltatune's prompt-side methods do not support")
        table = tensors.get("prompt_embeddings")
        if table is None:
            raise UserError(f"the adapter file holds no prompt_embeddings; it is not a {cls.file_type} adapter")
        width, count = cls.layer_class.token_width(model), config.get("num_virtual_tokens")
        if table.dim() != 2 or table.shape[1] != width or (count is not None and table.shape[0] != count):
            raise UserError(f"the adapter's prompt_embeddings have shape {tuple(table.shape)} but this model needs "
                            f"({count or 'n'}, {width}); it was saved for a different base model")
        for key, needed in cls.layer_class.peft_dimensions(model).items():
            # a file for another model can share the total width (layers × heads × head size) and still not fit
            if config.get(key) is not None and needed is not None and config[key] != needed:
                raise UserError(f"the adapter was saved for a model with {key}={config[key]}, this one has "
                                f"{key}={needed}; it was saved for a different base model")
        fields = {key: config[key] for key in cls.peft_field_names if key in config}

        def apply() -> None:
            encoder = PromptTable(table.float().to(_device_of(model)), fields, trainable)
            cls.layer_class.attach(model, cls.file_type).add_adapter(name, encoder)

        return apply, {"prompt_embeddings"}


class InputPromptMethod(VirtualTokenMethod):
    """Base of prompt and ptuning: virtual tokens in the input embeddings."""

    config_class: ClassVar[type[MethodConfig]] = InputPromptConfig
    layer_class: ClassVar[type[VirtualTokenLayer]] = InputPromptLayer

    def insert_at(self, model: nn.Module) -> int:
        keep_first = self.config.keep_first_token  # type: ignore[attr-defined]
        generates = callable(getattr(model, "can_generate", None)) and bool(model.can_generate())
        if keep_first and generates:
            raise UserError("method.keep_first_token: true is for encoders whose head reads the first token; a "
                            "generating model needs the virtual tokens first (set it to false or leave it unset)")
        return int(not generates if keep_first is None else keep_first)


def _device_of(model: nn.Module) -> Any:
    return next(model.parameters()).device
