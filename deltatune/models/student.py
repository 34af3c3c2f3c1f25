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
    check_blocks_chain(list(blocks), keep)  # before anything changes, so a refusal leaves the model whole
    kept = [blocks[index] for index in keep]
    setattr(parent, attribute, nn.Sequential(*kept) if isinstance(blocks, nn.Sequential) else nn.ModuleList(kept))
    for new_index, block in enumerate(getattr(parent, attribute)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index  # the KV cache is indexed by position in the list
    _shrink_config(getattr(model, "config", None), keep)
    return model


def check_blocks_chain(blocks: list[nn.Module], keep: list[int]) -> None:
    """UserError when a kept block would receive another width than it takes.

    A transformer's blocks all keep one width, but a CNN's stages widen (EfficientNet: 16, 24, 40... channels), so
    cutting the blocks between two of them builds a model that crashes at its first forward, mid-training. What
    reaches a kept block has the width the teacher's block after the previous kept one took (the stem's output
    for the first: what block 0 took); what leaves the last kept block must have the teacher's last block's width.
    """
    widths = [_widths(block) for block in blocks]
    if any(given != taken for (_, given), (taken, _) in zip(widths, widths[1:])):
        # The teacher's own blocks do not chain by this reading (e.g. a MoE block whose last Linear is its router):
        # the widths read here do not describe its data flow, so they cannot condemn a student either.
        return
    # (what feeds, the width it gives, what takes it, the width that takes)
    links: list[tuple[str, int | None, str, int | None]] = []
    for position, index in enumerate(keep):
        before = keep[position - 1] if position else None
        feeder = 0 if before is None else before + 1
        source = "the layers before the blocks" if before is None else f"block {before}"
        links.append((source, widths[feeder][0], f"block {index}", widths[index][0]))
    links.append((f"block {keep[-1]}", widths[keep[-1]][1], "the layers after the blocks", widths[-1][1]))
    for source, given, target, taken in links:
        if given is not None and taken is not None and given != taken:
            raise UserError(f"model.student keeps blocks {keep}, but {source} would give width {given} to {target}, "
                            f"which takes {taken} (the blocks cut between them change the width); keep blocks "
                            f"whose neighbours share a width, or cut a model whose blocks keep one width")


def _widths(block: nn.Module) -> tuple[int | None, int | None]:
    """(input width, output width) of a block: its first Linear/Conv layer's input and its last one's output, in
    registration order, which follows the data in the blocks of BERT, Llama and EfficientNet; None where it has
    neither (nothing to compare, so nothing is refused)."""
    layers = [module for module in block.modules() if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not layers:
        return None, None
    first, last = layers[0], layers[-1]
    taken = first.in_features if isinstance(first, nn.Linear) else first.in_channels
    given = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    return taken, given


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
