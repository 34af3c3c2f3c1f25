"""QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): LoRA on a base model whose
frozen Linear weights are stored in 4-bit NormalFloat (NF4) with double quantisation.

    y = X · dequant(W_NF4)ᵀ + b + s·B(A(dropout(X))),      s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

Each frozen weight keeps only its NF4 codes (two per byte) and its block statistics quantised to 8 bits (blocks of
64 weights, absmax values double-quantised in blocks of 256): ≈ 0.516 bytes per weight instead of 4, and no fp32
copy. Every forward (and backward) dequantises one layer at a time into an fp32 temporary; the LoRA factors A, B
(and DoRA's magnitude) are ordinary fp32 parameters and are the only things that train, besides modules_to_save
and, if asked, biases. The quantisation is deltatune's own (`nf4.py`) and its dequantised weights are bit-identical
to bitsandbytes'; quantising is deterministic, so re-applying qlora to a fresh copy of the base gives the same base.

What is quantised (`quantize`): "blocks" (default, as bitsandbytes' 4-bit loading does for the body of the model)
= every plain nn.Linear that LoRA adapts plus every other frozen nn.Linear inside the model's repeated blocks;
"targets" = only the nn.Linear layers LoRA adapts. Never quantised: the head and other modules_to_save (they
train in full), embeddings and the output layer, weights tied to another module (it still needs them in full),
and targets of other types (Conv1D, Conv2d, Embedding), which get plain LoRA on their fp32 weight.

Same options, files and API as `lora` (this class only quantises the base before LoRA wraps it). The output at
init differs from the fp32 model by the quantisation error only (B = 0, so the adapters add nothing).
`deltatune.merge` does not write into 4-bit: it dequantises and merges into an fp32 Linear (exact `unmerge`
restores the NF4 layer), which is also how an fp32 export of a QLoRA model is made.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods import register_method
from deltatune.methods.lora.lora import LoRA, LoRAConfig, target_modules
from deltatune.methods.lora.lora_layer import LoRALayer
from deltatune.methods.lora.nf4 import BLOCK_SIZES
from deltatune.methods.lora.qlora_layers import NF4Linear
from deltatune.methods.shared.model_surgery import base_modules, replace_module
from deltatune.methods.shared.modules_to_save import choose_modules_to_save
from deltatune.models.families import Family


@dataclass
class QLoRAConfig(LoRAConfig):
    name: str = "qlora"
    quant_block_size: int = 64  # weights per NF4 block (one absmax each); the paper's 64
    double_quant: bool = True  # absmax values to 8 bits in blocks of 256: ≈0.516 instead of 0.5625 bytes per weight
    quantize: str = "blocks"  # blocks: adapted + all other frozen Linears inside the blocks; targets: adapted only


@register_method("qlora")
class QLoRA(LoRA):
    description = "LoRA on a base whose frozen Linear weights are stored 4-bit NF4 with double quantisation"
    config_class: ClassVar[type[MethodConfig]] = QLoRAConfig
    peft_type: ClassVar[str | None] = None  # its adapter files are LoRA files: `lora` reads and writes them
    preserves_output_at_init: ClassVar[bool] = False  # the base itself changes by the NF4 quantisation error

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [*super().contract_bad_options(), ("quant_block_size", 100), ("quantize", "everything")]

    def prepare_targets(self, model: nn.Module, family: Family, targets: dict[str, nn.Module],
                        saved: list[str]) -> dict[str, nn.Module]:
        """Replace the chosen frozen nn.Linear layers by NF4Linear, before LoRA wraps the targets."""
        config: QLoRAConfig = self.config  # type: ignore[assignment]
        _validate(config)
        names = _names_to_quantise(model, family, targets, saved, config)  # none left when quantised while loading
        # Quantise everything first and only then swap modules in, so a failure leaves the model as it was.
        quantised = {name: _quantise(model, name, config) for name in names}
        for name, module in quantised.items():
            replace_module(model, name, module)
        return {name: quantised.get(name, module) for name, module in targets.items()}


    def convert_while_loading(self, model: nn.Module, family: Family) -> dict[str, Callable[[nn.Module], nn.Module]]:
        """Every Linear `prepare_targets` would quantise, quantised as its weight is read (the same NF4 codes:
        quantising is deterministic). Not with `layers`: choosing blocks needs the loaded model first."""
        config: QLoRAConfig = self.config  # type: ignore[assignment]
        if config.layers is not None:
            return {}
        _validate(config)
        saved = choose_modules_to_save(model, family, config.modules_to_save)
        targets = target_modules(model, family, config, excluded=saved)
        return {name: functools.partial(_quantise_loaded, name=name, config=config)
                for name in _names_to_quantise(model, family, targets, saved, config)}


def _names_to_quantise(model: nn.Module, family: Family, targets: dict[str, nn.Module], saved: list[str],
                       config: QLoRAConfig) -> list[str]:
    tied = _tied_weights(model)
    names = [name for name, module in targets.items() if _quantisable(name, module, tied)]
    if config.quantize == "blocks":
        names += [name for name in _frozen_block_linears(model, family, saved, tied) if name not in targets]
    return names


def _quantise_loaded(module: nn.Module, name: str, config: QLoRAConfig) -> NF4Linear:
    try:
        return NF4Linear.from_linear(module, config.quant_block_size, config.double_quant)
    except ValueError as error:
        raise UserError(f"qlora cannot quantise {name!r}: {error}") from None


def _validate(config: QLoRAConfig) -> None:
    if isinstance(config.quant_block_size, bool) or config.quant_block_size not in BLOCK_SIZES:
        raise UserError(f"method.quant_block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got "
                        f"{config.quant_block_size!r}; the paper uses 64")
    if config.quantize not in ("blocks", "targets"):
        raise UserError(f"method.quantize must be blocks or targets, got {config.quantize!r}")


def _quantise(model: nn.Module, name: str, config: QLoRAConfig) -> NF4Linear:
    return _quantise_loaded(model.get_submodule(name), name, config)


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module uses (e.g. an LM head tied to the embedding)."""
    users: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        users[id(param)] = users.get(id(param), 0) + 1
    return {key for key, count in users.items() if count > 1}


def _quantisable(name: str, module: nn.Module, tied: set[int]) -> bool:
    """A plain nn.Linear whose weight no other module shares. Subclasses are left alone: they may compute
    differently or read `.weight` themselves. A target that already carries plain LoRA cannot be quantised."""
    if isinstance(module, LoRALayer):
        if type(module.base_layer) is nn.Linear:
            raise UserError(f"qlora cannot quantise {name!r}: it already carries a LoRA adapter on its fp32 weight; "
                            f"apply qlora first (further adapters then share the 4-bit base) or use lora")
        return False
    return type(module) is nn.Linear and id(module.weight) not in tied


def _frozen_block_linears(model: nn.Module, family: Family, saved: list[str], tied: set[int]) -> list[str]:
    """Names of the plain, untied nn.Linear layers inside the model's blocks, outside the modules_to_save."""
    def outside(name: str) -> bool:
        return not any(name == skip or name.startswith(f"{skip}.") for skip in saved)

    return [name for name, module in base_modules(model)
            if name and outside(name) and family.block_index(f"{name}.") is not None
            and type(module) is nn.Linear and _quantisable(name, module, tied)]
