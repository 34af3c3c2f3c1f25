"""Smaller students cut from a model's own architecture: keep a subset of its repeated blocks (DistilBERT's
initialisation, Sanh et al. 2019: "taking one layer out of two" of the teacher, each kept block with its weights).

    model:
      name: minilm-l6
      student: {keep_layers: [0, 2, 4]}     # or {every_other: true}

The blocks are found through the family table (`Family.block`), so this works on any transformers model whose
blocks sit in one `nn.ModuleList` (BERT, Llama, Mistral, Qwen2, GPT-2, ...); the model's config is updated
(`num_hidden_layers`, per-layer lists such as `layer_types`) so that `save_pretrained` writes a plain transformers
directory of the smaller model, and each kept attention layer learns its new position in the KV cache.
"""

from __future__ import annotations

from torch import nn

from deltatune.config.schema import StudentConfig
from deltatune.errors import UserError
from deltatune.models.families import Family, check_block_indices


def wants_student(config: StudentConfig) -> bool:
    """Whether `model.student` asks for a cut-down model at all."""
    return config.keep_layers is not None or config.every_other


def block_list(model: nn.Module, family: Family,
               needed_by: str = "model.student") -> tuple[nn.Module, str, nn.ModuleList]:
    """The `nn.ModuleList` holding the model's repeated blocks: (its parent, its attribute name, the list);
    `needed_by` names the feature asking, for the error when there is none."""
    for name, module in model.named_modules():
        listed = isinstance(module, (nn.ModuleList, nn.Sequential))  # a CNN's stages are often a Sequential
        if listed and len(module) and family.block_index(f"{name}.0.weight") == 0:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attribute, module
    raise UserError(f"{needed_by} needs a model whose blocks sit in one list, and none matches the "
                    f"{family.name!r} family's block pattern {family.block!r}; set model.family to the right family "
                    f"or use another model")


def kept_indices(config: StudentConfig, num_blocks: int) -> list[int]:
    """The block indices the student keeps, checked against the teacher's `num_blocks`."""
    if config.keep_layers is not None and config.every_other:
        raise UserError("model.student sets both keep_layers and every_other; set one of them")
    if config.every_other:
        return list(range(0, num_blocks, 2))
    keep = list(config.keep_layers or [])
    if not keep:
        raise UserError(f"model.student.keep_layers is empty; list the blocks to keep, 0 to {num_blocks - 1}, "
                        f"e.g. [0, 2, 4]")
    check_block_indices(keep, num_blocks, "model.student.keep_layers")
    if len(set(keep)) != len(keep) or keep != sorted(keep):
        raise UserError(f"model.student.keep_layers must list distinct blocks in increasing order, got {keep}")
    return keep


def keep_blocks(model: nn.Module, family: Family, config: StudentConfig) -> nn.Module:
    """`model` with only the blocks `config` keeps, in their order, each with its trained weights; in place."""
    parent, attribute, blocks = block_list(model, family)
    keep = kept_indices(config, len(blocks))
    kept = [blocks[index] for index in keep]
    setattr(parent, attribute, nn.Sequential(*kept) if isinstance(blocks, nn.Sequential) else nn.ModuleList(kept))
    for new_index, block in enumerate(getattr(parent, attribute)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index  # the KV cache is indexed by position in the list
    _shrink_config(getattr(model, "config", None), keep)
    return model


def _shrink_config(config, keep: list[int]) -> None:
    """A transformers config describing the kept blocks only, so save/reload and generation see the student."""
    if config is None:
        return
    old = getattr(config, "num_hidden_layers", None)
    config.num_hidden_layers = len(keep)
    for name, value in list(vars(config).items()):
        # Per-layer settings (layer_types, sliding-window lists) follow the kept blocks.
        if (isinstance(value, list) and old is not None and len(value) == old and not name.startswith("_")
                and name != "architectures"):
            setattr(config, name, [value[index] for index in keep])
