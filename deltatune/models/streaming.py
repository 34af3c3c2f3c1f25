"""Loading a transformers directory tensor by tensor, converting chosen modules as their weights arrive, so the
fp32 model never exists whole (QLoRA: each frozen Linear is quantised to 4 bits the moment its weight is read).

    skeleton  = the task's Auto class from the config, under transformers' `no_init_weights` (parameters allocated,
                never written: untouched pages take no memory)
    chosen    = converting(skeleton)                       # module name -> converter, e.g. NF4 quantisation
    pass 1    : every other tensor of the safetensors files replaces its parameter's storage (one tensor at a time)
    pass 2    : for each chosen module, its tensors are read, the converter builds the replacement, the fp32 weight
                is dropped again

Peak memory is then the unconverted weights + the converted ones + one fp32 weight, instead of the whole fp32
model first. Anything this path cannot do exactly as `from_pretrained` would (a checkpoint missing a tensor the
model has, other than tied ones; a tensor name the model does not have; an LM head the config ties but the
checkpoint stores separately; no safetensors) returns None and the caller loads the usual way, so results never
depend on which path ran. The directory gets the same checks as on the usual path first
(`weight_files.check_model_directory`), so what is refused there is refused here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from deltatune.models.weight_files import SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS, check_model_directory, index_shards

Converter = Callable[[nn.Module], nn.Module]
Converting = Callable[[nn.Module], "dict[str, Converter] | None"]


def weight_files(directory: Path) -> list[Path] | None:
    """The directory's safetensors files (one, or the shards its index names); None when it has none.
    The index is read as `check_model_directory` reads it: a malformed one, or a shard name leading outside the
    directory, is a UserError."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return [directory / shard for shard in index_shards(index)]
    single = directory / SAFETENSORS_WEIGHTS
    return [single] if single.is_file() else None


def load_converting(directory: Path, auto_class: str, num_labels: int | None,
                    converting: Converting) -> nn.Module | None:
    """The model in `directory` with the modules `converting(skeleton)` names converted while loading; None when
    this path does not apply (see the module docstring)."""
    import transformers
    from transformers.initialization import no_init_weights

    from deltatune.models.hf import quiet_transformers

    # The usual path's checks (an adapter inside, a bad index, damaged safetensors). allow_pickle=True: a
    # pickle-only directory is not refused here but handed back to the usual loader, which applies model.allow_pickle.
    if check_model_directory(directory, allow_pickle=True) is not None:
        return None
    files = weight_files(directory)
    if files is None:
        return None
    try:
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the usual loader turns an unreadable config into a UserError saying what to fix
    if num_labels is not None:
        config.num_labels = num_labels
    auto = getattr(transformers, auto_class)
    if type(config) not in auto._model_mapping:
        return None
    with no_init_weights(), quiet_transformers():
        model = auto.from_config(config, dtype=torch.float32)
    # no_init_weights skips init_weights, which is what ties the LM head to the embeddings: tie now, so `converting`
    # sees a tied head as `from_pretrained` would give it (and leaves it in full precision, as it is shared).
    model.tie_weights()
    converters = converting(model) or {}
    if not converters or not _checkpoint_fits(model, files):
        return None
    _load_unconverted(model, files, set(converters))
    model.tie_weights()
    _load_converted(model, files, converters)
    model.eval()  # as from_pretrained returns it
    return model


def _tensor_names(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    names = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names.update({key: path for key in handle.keys()})
    return names


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


def _checkpoint_fits(model: nn.Module, files: list[Path]) -> bool:
    """Every tensor of the checkpoint is one of the model's, of the same shape, and every persistent tensor of the
    model is in the checkpoint or tied to one that is (an LM head tied to the embeddings)."""
    shapes = _tensor_shapes(files)
    in_file, state = set(shapes), model.state_dict()
    wanted = set(state)
    if in_file - wanted or any(tuple(state[key].shape) != shape for key, shape in shapes.items()):
        return False  # another architecture, or a head of another size (from_pretrained gives it a fresh one)
    owners: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), set()).add(name)
    tied_elsewhere = {name for names in owners.values() if names & in_file for name in names}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(model.config, "tie_word_embeddings", False):  # tied by `tie_weights` below
        output_names = {f"{name}.weight" for name, module in model.named_modules() if module is output}
        if output_names & in_file:
            # The config ties, yet the file stores the head too: from_pretrained ties it only when both are equal,
            # and keeps a different head apart. That comparison is the usual path's to make, not ours.
            return False
        tied_elsewhere |= output_names
    return not (wanted - in_file - tied_elsewhere)


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Point the parameter or buffer `name` at `value` (fp32), dropping its uninitialised storage."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, attribute)
    value = value.to(torch.float32) if value.is_floating_point() else value
    if value.shape != current.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)}, model {tuple(current.shape)}")
    current.data = value


def _load_unconverted(model: nn.Module, files: list[Path], converted: set[str]) -> None:
    from safetensors import safe_open

    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if _module_of(key) not in converted:
                        _assign(model, key, handle.get_tensor(key))


def _load_converted(model: nn.Module, files: list[Path], converters: dict[str, Converter]) -> None:
    """One module at a time: read its tensors, convert, put the result in its place."""
    from safetensors import safe_open

    located = _tensor_names(files)
    with torch.no_grad():
        for module_name, convert in converters.items():
            module = model.get_submodule(module_name)
            for attribute, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                key = f"{module_name}.{attribute}"
                if key in located:
                    with safe_open(str(located[key]), framework="pt") as handle:
                        _assign(model, key, handle.get_tensor(key))
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, convert(module))
