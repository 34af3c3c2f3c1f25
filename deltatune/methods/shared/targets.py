"""Choosing the modules a method adapts, by the rules LoRA and sparse fine-tuning share (PEFT's where it has one).

`target_modules` None = the family's attention and MLP modules the method can adapt, or, when the family names
none that exist, every module it can adapt inside the family's blocks; "all-linear" = every Linear/Conv1D except
the output layer; a list = module names, name suffixes (PEFT's rule) or regular expressions matching the whole
name. What "can adapt" means is the method's own `TargetRule`. The same name rule selects `modules_to_save`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from deltatune.errors import UserError, closest_names
from deltatune.methods.shared.model_surgery import base_modules
from deltatune.models.families import Family


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' GPT-2 style Conv1D (a Linear storing its weight as (in, out))."""
    # No Conv1D can exist unless transformers.pytorch_utils was imported, so never import it here (no side effects).
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def matches(entry: str, name: str) -> bool:
    """A module name, a trailing part of one (PEFT's rule), or a regular expression matching the whole name."""
    if name == entry or name.endswith(f".{entry}"):
        return True
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def select_modules(model: nn.Module, entries: list[str], key: str) -> list[str]:
    """Module names matching any entry; a UserError for an entry that matches nothing, naming the closest."""
    names = [name for name, _ in base_modules(model) if name]
    selected: list[str] = []
    for entry in entries:
        found = [name for name in names if matches(entry, name)]
        if not found:
            candidates = sorted(set(names) | {name.rsplit(".", 1)[-1] for name in names})
            close = ", ".join(closest_names(entry, candidates, limit=5))
            raise UserError(f"{key}: {entry!r} matches no module of this model; closest names: {close}")
        selected += [name for name in found if name not in selected]
    return selected


@dataclass(frozen=True)
class TargetRule:
    """What one method can adapt. Each test gets a module as the model holds it: the method's own layer around a
    base module when an earlier adapter of the same method wrapped it (`base_of` unwraps that), else the module."""

    method: str  # the method's name, for the error when nothing is selected
    verb: str  # what it does to a module ("adapt", "update"), for that error
    example: str  # target names that suit it, for that error (e.g. "[q_proj, v_proj]")
    base_of: Callable[[nn.Module], nn.Module]
    by_default: Callable[[nn.Module], bool]  # among the family's attention and MLP modules
    in_blocks: Callable[[nn.Module], bool]  # inside the blocks, when the family names no attention/MLP module
    linear: Callable[[nn.Module], bool]  # what "all-linear" selects
    check: Callable[[str, nn.Module], None]  # a UserError for a module named in target_modules it cannot adapt


def choose_targets(model: nn.Module, family: Family, target_modules: str | list[str] | None, excluded: list[str],
                   rule: TargetRule) -> dict[str, nn.Module]:
    """Module name -> module (or the method's existing layer around it) for every module to adapt, leaving out
    the `excluded` ones (the modules_to_save, which train in full) and everything inside them."""

    def outside(name: str) -> bool:
        return not any(name == skip or name.startswith(f"{skip}.") for skip in excluded)

    modules = {name: module for name, module in base_modules(model) if name and outside(name)}
    wanted = target_modules
    if wanted == ["all-linear"]:
        wanted = "all-linear"  # the same shorthand whether written as a string or a one-item list
    if wanted is None:
        chosen = [name for name, module in modules.items()
                  if (family.is_attention(name) or family.is_mlp(name)) and rule.by_default(module)]
        if not chosen:
            chosen = [name for name, module in modules.items()
                      if family.in_selected_block(f"{name}.") and rule.in_blocks(module)]
    elif wanted == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [name for name, module in modules.items()
                  if rule.linear(module) and output is not module and output is not rule.base_of(module)]
    else:
        entries = [wanted] if isinstance(wanted, str) else wanted
        chosen = [name for name in select_modules(model, entries, "method.target_modules") if name in modules]
        for name in chosen:
            rule.check(name, modules[name])
    chosen = _without_bypassed(model, chosen, explicit=wanted not in (None, "all-linear"))
    if family.selected_blocks is not None:  # method.layers: only inside the chosen blocks
        chosen = [name for name in chosen if family.in_selected_block(f"{name}.")]
    if not chosen:
        raise UserError(f"method {rule.method} found no module to {rule.verb} with target_modules="
                        f"{target_modules!r}; set method.target_modules to module names (e.g. {rule.example}) or "
                        f"all-linear")
    return {name: modules[name] for name in chosen}


def _without_bypassed(model: nn.Module, chosen: list[str], explicit: bool) -> list[str]:
    """`chosen` less the Linears whose parent never calls them: nn.MultiheadAttention hands `out_proj.weight` to
    F.multi_head_attention_forward, so a layer wrapped around out_proj would never run (PEFT has the same trap). A
    UserError when target_modules named one; left out of the defaults and all-linear."""
    bypassed = {f"{name}.out_proj" if name else "out_proj" for name, module in model.named_modules()
                if isinstance(module, nn.MultiheadAttention)}
    named = [name for name in chosen if name in bypassed]
    if named and explicit:
        raise UserError(f"method.target_modules: {named[0]} is the out_proj of an nn.MultiheadAttention, which reads "
                        f"its weight directly and would never run an adapter around it; leave it out of "
                        f"method.target_modules")
    return [name for name in chosen if name not in bypassed]
