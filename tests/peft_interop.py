"""PEFT interoperability checks shared by test_lora_peft.py and test_prompt_peft.py (peft 0.21 is a test-only
dependency, imported by the callers through pytest.importorskip).

Each check saves a tiny random base with save_pretrained, builds the adapter with one library, loads it with the other
onto a fresh copy of that base and compares the logits (max abs diff <= TOLERANCE)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune
from tests.helpers import Batch, seeded
from tests.tiny_models import tiny_bert, tiny_llama

TOLERANCE = 1e-5
# Parameters that start at a value where they change nothing (DoRA's magnitude, the head's copy) are moved first, so
# a file that loses them shows in the logits.
PERTURBED = ("lora_magnitude_vector", "modules_to_save")
Read = Callable[[nn.Module, Batch], torch.Tensor]  # the logits of a model on a batch, comparable across libraries


def save_base(kind: str, directory: Path) -> None:
    model = seeded(tiny_llama) if kind == "llama" else seeded(tiny_bert, num_labels=3)
    model.save_pretrained(directory)


def load_base(kind: str, directory: Path) -> nn.Module:
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    model_class = LlamaForCausalLM if kind == "llama" else BertForSequenceClassification
    return model_class.from_pretrained(directory).eval()


def perturb(model: nn.Module, words: tuple[str, ...] = PERTURBED) -> None:
    """Move parameters whose names contain any of `words` away from their init, so they matter in the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(word in name for word in words):
                param.mul_(1 + 0.2 * torch.randn_like(param))


def peft_reads_ours(tmp_path: Path, kind: str, options: dict[str, Any], batch: Batch,
                    read: Read) -> tuple[dict[str, Any], set[str]]:
    """deltatune applies method `options` to the base and saves the adapter; peft's PeftModel.from_pretrained
    gives the same logits. Returns the written adapter_config.json and the names of the saved tensors."""
    from peft import PeftModel
    from safetensors.torch import load_file

    save_base(kind, tmp_path / "base")
    ours = load_base(kind, tmp_path / "base")
    deltatune.apply(ours, options)
    perturb(ours)
    expected = read(ours, batch)
    deltatune.save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(load_base(kind, tmp_path / "base"), tmp_path / "adapter")
    assert (read(theirs, batch) - expected).abs().max() <= TOLERANCE
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    return config, set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))


def we_read_peft(tmp_path: Path, kind: str, peft_config: Any, batch: Batch,
                 read: Read) -> tuple[nn.Module, torch.Tensor]:
    """peft builds an adapter from `peft_config` on the base and saves it; deltatune loads it as "from_peft" onto
    a fresh base with the same logits, the adapter changes them, and disabled it gives the base's. Returns the
    model that loaded it and peft's logits."""
    from peft import get_peft_model

    save_base(kind, tmp_path / "base")
    theirs = get_peft_model(load_base(kind, tmp_path / "base"), peft_config)
    perturb(theirs)
    expected = read(theirs, batch)
    theirs.save_pretrained(tmp_path / "adapter")

    ours = load_base(kind, tmp_path / "base")
    base = read(ours, batch)
    deltatune.load_adapter(ours, tmp_path / "adapter", name="from_peft")
    assert (read(ours, batch) - expected).abs().max() <= TOLERANCE
    assert (expected - base).abs().max() > 1e-4  # the adapter does change the output
    with deltatune.disabled(ours):
        assert (read(ours, batch) - base).abs().max() <= TOLERANCE
    return ours, expected
