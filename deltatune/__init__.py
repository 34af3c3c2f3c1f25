"""deltatune: fine-tune pretrained models with any established method, behind one config, CLI and Python API.

    import deltatune
    config = deltatune.load_config("examples/minilm_rotten_tomatoes.yaml", ["train.lr=3e-5"])
    summary = deltatune.train(config)

    method = deltatune.apply(model, {"name": "freeze", "last_n_blocks": 2})
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from deltatune.adapters import (
    add_weighted_adapter,
    delete_adapter,
    disabled,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
    unmerge,
)
from deltatune.config.loader import load_config, method_config, objective_config, parse_config
from deltatune.config.schema import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
)
from deltatune.errors import UserError
from deltatune.methods import available_methods, register_method
from deltatune.methods.base import LossFunction, Method

__version__ = "0.1.0"


def apply(model: nn.Module, config: MethodConfig | dict[str, Any], family: str = "auto",
          calibration: Iterable[dict[str, Any]] | None = None, loss_fn: LossFunction | None = None) -> Method:
    """Apply a fine-tuning method to `model` in place; returns the method object (for its saved state).

    `calibration`: a few batches (dicts, called as `model(**batch)`) for methods that choose what trains from data,
    e.g. {"name": "sparse", "selection": "fisher"}; `loss_fn(model, batch)` gives a batch's loss, by default the
    output's `.loss` (so include labels). Such a method given no calibration is a UserError; the model is then
    left untouched."""
    from deltatune.methods import get_method
    from deltatune.methods.shared.model_surgery import check_unmerged
    from deltatune.models.families import family_of

    method_cfg = method_config(config)
    method = get_method(method_cfg.name)(method_cfg)
    method.check_model_kind(model)
    if type(method).named_adapters:  # beside a merged adapter a new one would never train, or unmerge it silently
        check_unmerged(model, getattr(method, "adapter_name", "default"))
    reason = method.calibration_needed()
    if calibration is None and reason is not None:
        raise UserError(f"{reason}: pass calibration=<a few batches> to deltatune.apply (and loss_fn= unless "
                        f"model(**batch) returns .loss)")
    method.apply(model, family_of(model, family))
    if calibration is not None:
        method.calibrate(model, calibration, loss_fn or _output_loss)
    return method


def _output_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The loss a transformers model returns for a batch with labels."""
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise UserError("the model returned no .loss for a calibration batch; put labels in the batches or pass "
                        "loss_fn=lambda model, batch: ... to deltatune.apply")
    return loss


def train(config: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Run the training a config describes; returns the run summary."""
    from deltatune.runner import train as run_training

    return run_training(config, resume=resume)


def evaluate_run(run_dir: str) -> dict[str, dict[str, float]]:
    """Metrics of a finished run on its saved validation/test splits."""
    from deltatune.runs import evaluate_run as run_evaluation

    return run_evaluation(run_dir)


def load_run(run_dir: str, with_data: bool = False) -> Any:
    """A finished run back as a `deltatune.runs.LoadedRun`: its config, task, model (method applied, trained weights
    loaded, eval mode), method, objective and processor; `with_data` rebuilds its saved splits too."""
    from deltatune.runs import load_run as load_finished_run

    return load_finished_run(run_dir, with_data=with_data)


def load(path: str) -> Any:
    """A trained dual encoder, from its run directory or its `deltatune export` directory, as a
    `deltatune.models.dual_encoder.ImageTextEncoder`: `encode_image(images)` and `encode_text(texts)` return
    unit-length embeddings whose dot products score image–text matches. Other runs load with `load_run`."""
    from pathlib import Path

    from deltatune.models.dual_encoder import CONFIG_FILE, DualEncoder, ImageTextEncoder

    if (Path(path) / CONFIG_FILE).is_file():
        from deltatune.tasks.image_text import load_dual_encoder

        from deltatune.runs import exported_data_settings

        model, processor = load_dual_encoder(path)
        data = exported_data_settings(path)  # encode as the run did; older exports fall back to the defaults
        return ImageTextEncoder(model, processor, data.get("image_size"), data.get("max_length", 128))
    run = load_run(path)
    if not isinstance(run.model, DualEncoder):
        raise UserError(f"{path} is a run of a single model, not a dual encoder; load it with deltatune.load_run")
    return ImageTextEncoder(run.model, run.processor, run.config.data.image_size, run.config.data.max_length)


__all__ = [
    "DataConfig", "Method", "MethodConfig", "ModelConfig", "ObjectiveConfig", "RunConfig", "SplitConfig",
    "TrainConfig", "UserError", "apply", "available_methods", "evaluate_run", "load", "load_config", "load_run",
    "objective_config", "parse_config", "register_method", "train",
    "add_weighted_adapter", "delete_adapter", "disabled", "load_adapter", "merge", "save_adapter", "set_adapter",
    "unmerge",
]
