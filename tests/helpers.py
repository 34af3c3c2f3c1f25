"""What many test files need, written once: tiny inputs per kind of model, a model's output, a short training run,
and the checks behind the adapter promises (switch, disable, merge) that the registry-generated contract tests and
the method-specific tests share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import deltatune
from deltatune.adapters import adapter_layers, adapter_names
from deltatune.errors import UserError
from deltatune.methods import get_method
from deltatune.models import ImageClassifier
from tests.tiny_models import tiny_bert, tiny_cnn, tiny_llama

Batch = dict[str, torch.Tensor]
Run = Callable[[], torch.Tensor]  # computes the model's output on a fixed batch
KINDS = ("bert", "llama", "cnn", "dual")  # the tiny models every method is tried on (dual: a dual encoder)
MODEL_KIND = {"cnn": "cnn", "dual": "dual-encoder"}  # what each kind is to `Method.model_kinds` (else transformer)


# ---- models and inputs ----------------------------------------------------------------------------------------
def seeded(build: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """`build(*args, **kwargs)` after seeding torch with 0: two calls give the same random weights."""
    torch.manual_seed(0)
    return build(*args, **kwargs)


def token_batch(rows: int, length: int, seed: int = 1, attention_mask: bool = True) -> Batch:
    """Token ids of ordinary MiniLM-vocabulary words (5..99) from a seeded generator, with an all-ones attention
    mask unless `attention_mask` is False."""
    ids = torch.randint(5, 100, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if attention_mask else {"input_ids": ids}


def image_batch(rows: int, seed: int = 1) -> Batch:
    """32x32 RGB images of standard normal pixels, as tiny_cnn takes them."""
    return {"pixel_values": torch.randn(rows, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def class_labels(rows: int, classes: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed))


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: transformers models return an object with `.logits`, plain modules a tensor."""
    return output if torch.is_tensor(output) else output.logits


def logits(model: nn.Module, batch: Batch, pick: Callable[[Any], torch.Tensor] = output_logits) -> torch.Tensor:
    """`pick(model(**batch))` in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        return pick(model(**batch))


def encoder_output(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The last hidden state of a BERT classifier's encoder: where an adapter's change shows when a tiny random
    head's logits are too small to show it."""
    return logits(model.bert, batch, pick=lambda output: output.last_hidden_state)


class TinyCase(NamedTuple):
    """A tiny random model with a batch, what to read from its output (`pick`) and labels for that output."""

    model: nn.Module
    batch: Batch
    pick: Callable[[Any], torch.Tensor]
    labels: torch.Tensor

    def run(self) -> torch.Tensor:
        return logits(self.model, self.batch, self.pick)


def last_position(output: Any) -> torch.Tensor:
    return output.logits[:, -1]


def tiny_dual_encoder(projection_dim: int | None = 8) -> nn.Module:
    """A dual encoder of tiny_cnn (images) and tiny_bert (text), as `model.name: dual-encoder` assembles it."""
    from deltatune.config.schema import ModelConfig
    from deltatune.tasks.image_text import ImageText

    return ImageText().assemble_model(ModelConfig(name="dual-encoder", image="tests.tiny_models:tiny_cnn",
                                                  text="tests.tiny_models:tiny_bert", projection_dim=projection_dim))


def tiny_case(kind: str, method: str | None = None) -> TinyCase:
    """Tiny model `kind` ("bert", "llama", "cnn" or "dual"), seeded with 0, with a batch, an output picker and labels; skips
    the test when method `method` does not work on that kind of model."""
    if method is not None and MODEL_KIND.get(kind, "transformer") not in get_method(method).model_kinds:
        pytest.skip(f"{method} does not support {kind} models")
    if kind == "dual":  # images and their captions; the logits are image-by-caption, the diagonal the match
        batch = {**image_batch(8), **token_batch(8, 12)}
        return TinyCase(seeded(tiny_dual_encoder), batch, output_logits, torch.arange(8))
    if kind == "bert":
        return TinyCase(seeded(tiny_bert, num_labels=3), token_batch(8, 12), output_logits, class_labels(8, 3))
    if kind == "llama":
        # With biases (as in Qwen2-style Llamas) so every method, BitFit included, has something to train.
        model = seeded(tiny_llama, attention_bias=True, mlp_bias=True)
        return TinyCase(model, token_batch(4, 16, attention_mask=False), last_position, class_labels(4, 100))
    return TinyCase(ImageClassifier(seeded(tiny_cnn, num_labels=4)), image_batch(8), output_logits,
                    class_labels(8, 4))


# ---- training ---------------------------------------------------------------------------------------------------
def train_steps(model: nn.Module, batch: Batch, labels: torch.Tensor | None = None, steps: int = 60,
                lr: float = 1e-2, pick: Callable[[Any], torch.Tensor] = output_logits) -> list[float]:
    """AdamW on the trainable parameters for `steps` steps on one batch; returns each step's loss. The loss is the
    cross-entropy of `pick(output)` against `labels`, or the model's own `.loss` when `labels` is None (the batch
    then carries its labels)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        output = model(**batch)
        loss = output.loss if labels is None else nn.functional.cross_entropy(pick(output), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def assert_loss_falls(losses: list[float], below: float = 0.6, what: str = "") -> None:
    """The last loss is under `below` times the first."""
    assert losses[-1] < below * losses[0], f"{what} loss went {losses[0]:.3f} -> {losses[-1]:.3f}".strip()


# ---- adapter promises -------------------------------------------------------------------------------------------
def perturb_trainable(model: nn.Module, seed: int, scale: float = 0.1) -> set[str]:
    """Move every trainable parameter away from its initial value, as training would, so that the adapter they
    belong to changes the output (adapters start neutral); returns their names."""
    generator = torch.Generator().manual_seed(seed)
    moved = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
                moved.add(name)
    return moved


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, by name."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    """`model` holds the same tensors under the same names as `before` (within `atol`)."""
    after = model.state_dict()
    assert after.keys() == before.keys(), f"tensors added or removed: {set(after) ^ set(before)}"
    for name, tensor in before.items():
        assert torch.allclose(after[name], tensor, rtol=0, atol=atol), name


def assert_switches(model: nn.Module, run: Run, first: str = "default", second: str = "second") -> None:
    """Adapters `first` and `second` sit on `model`, `second` active (as applying it leaves it): their outputs
    differ, `deltatune.set_adapter` switches between them exactly, an unknown name is refused, and deleting `second`
    leaves `first` as it was."""
    assert {first, second} <= set(adapter_names(model))
    second_output = run()
    deltatune.set_adapter(model, first)
    first_output = run()
    assert not torch.allclose(first_output, second_output, atol=1e-4), "both adapters give the same output"
    deltatune.set_adapter(model, second)
    assert torch.equal(run(), second_output)
    deltatune.set_adapter(model, first)
    assert torch.equal(run(), first_output)
    with pytest.raises(UserError, match="no adapter named 'missing'"):
        deltatune.set_adapter(model, "missing")
    deltatune.delete_adapter(model, second)
    assert second not in adapter_names(model)
    assert torch.equal(run(), first_output)


def assert_disabled_gives(model: nn.Module, run: Run, base: torch.Tensor, atol: float = 0.0) -> None:
    """The adapter changes the output; inside `deltatune.disabled(model)` it is `base` (within `atol`), and
    afterwards the adapted output is back."""
    adapted = run()
    assert not torch.allclose(adapted, base, atol=1e-4), "the adapter does not change the output"
    with deltatune.disabled(model):
        assert torch.allclose(run(), base, rtol=0, atol=atol)
    assert torch.equal(run(), adapted)


def assert_merge_round_trip(model: nn.Module, run: Run, atol: float = 1e-5, restore_atol: float = 1e-6) -> None:
    """`deltatune.merge` changes the base weights but not the output (within `atol`), a merged model disabled gives
    the base output, and `deltatune.unmerge` restores every base tensor (within `restore_atol`: W + Δ - Δ rounds)
    and the output."""
    unmerged = run()
    with deltatune.disabled(model):
        base = run()
    before = snapshot(model)
    deltatune.merge(model)
    merged_state = model.state_dict()
    assert merged_state.keys() != before.keys() or any(
        not torch.equal(merged_state[name], tensor) for name, tensor in before.items()), "merge changed nothing"
    assert torch.allclose(run(), unmerged, rtol=0, atol=atol)
    with deltatune.disabled(model):  # a merged layer unmerges for the duration
        assert torch.allclose(run(), base, rtol=0, atol=atol)
    assert torch.allclose(run(), unmerged, rtol=0, atol=atol)
    deltatune.unmerge(model)
    assert_unchanged(model, before, atol=restore_atol)
    assert torch.allclose(run(), unmerged, rtol=0, atol=atol)


def has_no_adapters(model: nn.Module) -> bool:
    return not adapter_layers(model)


def tiny_classification_run(root: Path, rows: int = 80, model: str = "tests.tiny_models:tiny_bert", **train: Any) -> None:
    """A workspace for `deltatune train config.yaml` in `root`: data.jsonl of `rows` seeded word-bag reviews
    (label 1 when positive words outnumber negative ones) and config.yaml training `model` in full on it;
    `train` overrides the train section (defaults: 240 steps of 4 rows, accumulation 2, a checkpoint every 10)."""
    import json

    import yaml

    words = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "actor", "scene"]
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(rows):
        picks = torch.randint(0, len(words), (6,), generator=generator).tolist()
        label = int(sum(j < 3 for j in picks) > sum(3 <= j < 6 for j in picks))
        lines.append(json.dumps({"text": " ".join(words[j] for j in picks), "label": label}) + "\n")
    (root / "data.jsonl").write_text("".join(lines))
    settings = {"max_steps": 240, "batch_size": 4, "gradient_accumulation": 2, "lr": 1.0e-3, "eval_every": 20,
                "save_every": 10, "log_every": 5, "num_threads": 1, "progress": False, "seed": 5, **train}
    config = {"model": {"name": model, "task": "classification"},
              "data": {"name": "data.jsonl", "max_length": 16, "split": {"validation": 0.2, "test": 0.2, "seed": 3}},
              "method": {"name": "full"}, "train": settings, "output_dir": "runs"}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
