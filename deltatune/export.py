"""`deltatune export RUN_DIR OUT_DIR`: the fine-tuned model as a plain model that needs no deltatune to load.

Adapters are folded into the weights and their layers replaced by the modules they then equal
(`adapters.merge_and_unload`), so the saved model has the base architecture: `AutoModel*.from_pretrained(OUT_DIR)`
in plain transformers loads it. Before anything is published, the export is reloaded from disk and its logits are
compared with the adapter model's on a test batch; the directory appears only when that check passes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from deltatune.adapters import merge_and_unload
from deltatune.errors import UserError
from deltatune.objectives.base import model_logits
from deltatune.runs import open_run
from deltatune.tasks.base import Task
from deltatune.training.checkpoint import fsync_dir
from deltatune.training.loop import Batches

TOLERANCE = 1e-4


def export_run(run_path: str | Path, out_path: str | Path, echo=print) -> dict[str, Any]:
    saved, out = open_run(run_path), Path(out_path)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose a new output directory")
    run = saved.load(with_data=True)
    model = run.model
    examples = run.data.test or run.data.validation
    batch = next(Batches(examples, run.data.collate).in_order(4))
    with torch.no_grad():
        expected = model_logits(model, batch)
    merge_and_unload(model)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save(model, run.task, run.processor, tmp)
    difference = float((_reload_logits(tmp, run.task, model, batch) - expected).abs().max())
    if difference > TOLERANCE:
        raise RuntimeError(f"exported model disagrees with the adapter model (max |Δlogit| = {difference:.2e})")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    fsync_dir(out.parent)
    echo(f"exported {saved.run_dir.path} to {out}: merged, reloaded, max |logit difference| = {difference:.2e}")
    return {"path": str(out), "max_abs_logit_difference": difference}


def _save(model: torch.nn.Module, task: Task, processor: Any, directory: Path) -> None:
    """transformers models as a transformers directory (+ tokenizer); other modules as a safetensors state dict."""
    directory.mkdir(parents=True)
    model = model.to("cpu").float()
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
        if hasattr(processor, "save_pretrained"):
            processor.save_pretrained(directory)
    else:
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"task": task.name})


def _reload_logits(directory: Path, task: Task, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits of the export as read back from disk (a fresh load with the task's Auto class when the model is a
    transformers model)."""
    from safetensors.torch import load_file

    if hasattr(model, "save_pretrained") and task.auto_class is not None:
        import transformers

        reloaded = getattr(transformers, task.auto_class).from_pretrained(directory, dtype=torch.float32)
    else:
        reloaded = model
        reloaded.load_state_dict(load_file(str(directory / "model.safetensors")))
    reloaded.eval()
    with torch.no_grad():
        return model_logits(reloaded, batch)
