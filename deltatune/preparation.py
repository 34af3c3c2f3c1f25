"""Building a run's pieces from its config: the seeded start, the data, the model with its method applied, and the
objective built with its options; and measuring a model on the data's splits.

Shared by training (`deltatune.runner`) and by reading finished runs back (`deltatune.runs`), so neither imports the
other. Extra models an objective declares are not loaded here: `deltatune.runs.setup_objective` does that, once the
policy exists.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.config.schema import RunConfig, TrainConfig
from deltatune.errors import UserError
from deltatune.methods import get_method
from deltatune.methods.base import Method
from deltatune.objectives import build_objective, objective_task
from deltatune.objectives.base import Objective
from deltatune.training.loop import Batches, evaluate, resolve_device

if TYPE_CHECKING:
    from deltatune.tasks.base import Task


@dataclass
class Prepared:
    """A model with its method applied, its data, and its objective: everything but the optimizer."""

    config: RunConfig
    model: nn.Module
    method: Method
    objective: Objective
    task: str  # the registered task's name (deltatune.tasks)
    data: Any  # deltatune.data.DatasetBundle
    device: torch.device
    processor: Any = None  # the tokenizer or ImageProcessor the data was encoded with
    num_labels: int | None = None  # the head's outputs, for labelled tasks


def start_seeded(config: RunConfig) -> None:
    """Apply the thread count and seed torch, so the same config always builds the same start."""
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    torch.manual_seed(config.train.seed)


def run_task(config: RunConfig) -> Task:
    """The task a run trains: model.task when set; else, when the objective reads a task of its own (dpo reads
    `preference` rows), that task, checked to fit the model's heads; else the task the model was built for. An
    explicit model.task the objective cannot read is a one-line error."""
    from deltatune.tasks import get_task, resolve_task

    wanted = objective_task(config.objective.name)
    if wanted is not None and config.model.task == "auto":
        return get_task(resolve_task(replace(config.model, task=wanted)))()
    name = resolve_task(config.model)
    if wanted is not None and name != wanted:
        raise UserError(f"objective {config.objective.name!r} reads {wanted!r} rows but model.task is {name!r}; set "
                        f"model.task={wanted} or leave it auto")
    return get_task(name)()


def prepare(config: RunConfig, splits: dict[str, list[int]] | None = None, training: bool = True) -> Prepared:
    """Load data and model and apply the method, seeded so the same config always builds the same start. With
    `training` false (a finished run read back) what only training needs is not checked."""
    from deltatune.models import load_processor
    from deltatune.data.sft import check_packing_keeps_examples_apart
    from deltatune.models.hf import align_padding
    from deltatune.models.positions import check_max_length, virtual_token_count
    from deltatune.tasks import build_datasets

    start_seeded(config)
    task = run_task(config)
    objective = build_objective(config.objective, task)
    get_method(config.method.name)  # an unknown method fails before any data is read
    processor = load_processor(config.model, task)
    data = build_datasets(config.data, task, processor, splits, config.model.num_labels,
                          objective.reads_unlabelled)
    num_labels = config.model.num_labels or data.num_labels
    if num_labels is not None and data.num_labels is not None and num_labels < data.num_labels:
        raise UserError(f"model.num_labels={num_labels} but the data has {data.num_labels} labels; "
                        f"raise model.num_labels or leave it unset")
    model, method = build_model(config, task, num_labels)
    align_padding(model, processor)
    check_max_length(model, config.data.max_length, processor, virtual_token_count(method.config))
    if training and getattr(data, "packed", False):  # the task packed its train split
        check_packing_keeps_examples_apart(model)
    device = resolve_device(config.train.device)
    return Prepared(config, model.to(device), method, objective, task.name, data, device, processor, num_labels)


def build_model(config: RunConfig, task: Task, num_labels: int | None) -> tuple[nn.Module, Method]:
    """The pretrained model with the run's method applied; seeded, so a new head starts the same every time."""
    from deltatune.models import load_model
    from deltatune.models.families import family_of

    method = get_method(config.method.name)(config.method)
    torch.manual_seed(config.train.seed)

    def converting(skeleton: nn.Module) -> dict:  # e.g. qlora quantising each Linear as its weight is read
        return method.convert_while_loading(skeleton, family_of(skeleton, config.model.family))

    converts = type(method).convert_while_loading is not Method.convert_while_loading
    model = load_model(config.model, task, num_labels, converting if converts else None)
    method.check_model_kind(model)
    method.apply(model, family_of(model, config.model.family))
    return model, method


def start_from_run(model: nn.Module, method: Method, config: RunConfig) -> None:
    """`model.init_from`: load a finished run's trained weights into the freshly built model, whose model and method
    must be the run's (the saved weights are that method's state on that model). Called when a training run starts,
    not when a finished run is loaded: its own saved weights hold everything its method trains."""
    from deltatune.config.loader import config_to_dict
    from deltatune.resume import read_saved_config
    from deltatune.training.run_dir import RunDir
    from deltatune.training.state import load_weights

    path = config.model.init_from
    run_dir = RunDir(str(path))
    run_dir.check_is_run()
    run_dir.check_finished()
    saved = read_saved_config(run_dir)
    if saved.model.name != config.model.name:
        raise UserError(f"model.init_from {path} trained model {saved.model.name!r}, not {config.model.name!r}; set "
                        f"model.name={saved.model.name} (to fold that run into a new base instead: model.name={path})")
    if config_to_dict(saved.method) != config_to_dict(config.method):
        raise UserError(f"model.init_from {path} was trained with another method section ({saved.method.name}); "
                        f"copy its method: section, whose weights these are, into this config")
    weights, _ = run_dir.read_final_weights()
    try:
        load_weights(model, method, dict(weights))
    except ValueError as error:
        raise UserError(f"model.init_from {path} does not fit this model ({error}); a head trained for another "
                        f"number of classes needs model.num_labels set to the run's") from None



def split_metrics(prepared: Prepared) -> dict[str, dict[str, float]]:
    """Validation and test metrics of the prepared model as it is now."""
    return metrics_on_splits(prepared.model, prepared.objective, prepared.data, prepared.config.train,
                             prepared.device)


def metrics_on_splits(model: nn.Module, objective: Objective, data: Any, train_config: TrainConfig,
                      device: torch.device) -> dict[str, dict[str, float]]:
    """Validation and test metrics of `model` on `data` (a DatasetBundle), as `objective` measures them."""
    results = {}
    for split in ("validation", "test"):
        examples = getattr(data, split)
        if examples:
            results[split] = evaluate(model, objective, Batches(examples, data.collate, split=split), train_config,
                                      device)
    return results



def format_metrics(label: str, metrics: dict[str, dict[str, float]]) -> str:
    # A metric saved as null (non-finite, see run_dir) reads back as None.
    parts = [f"{split} " + " ".join(f"{k}={v if v is None else format(v, '.4f')}" for k, v in values.items())
             for split, values in metrics.items() if values]  # {}: a split the objective could not score
    return f"{label}: " + " | ".join(parts)
