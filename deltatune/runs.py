"""Finished runs read back from their directories: the one loader behind `eval`, `export` and `generate`.

    run = load_run("runs/minilm-l6-lora-20260101-120000", with_data=True)
    run.model        # the pretrained model with the run's method applied and its trained weights loaded
    run.task, run.method, run.processor, run.data    # data: the saved splits rebuilt (None without with_data)

`open_run` only reads the directory's config and resolves its task, so a command can refuse an unsuitable run before
loading any model; `SavedRun.load` then builds the model, `SavedRun.load_base_model` the model without the method.
Every unusable directory (not a run, unfinished, unreadable config) is a one-line UserError.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.adapters import AdaptersDisabled, merge_and_unload, switches_off_fully
from deltatune.config.schema import ModelConfig, RunConfig
from deltatune.errors import UserError
from deltatune.methods.base import Method
from deltatune.objectives import BASE, POLICY_DISABLED, ModelRole, build_objective
from deltatune.objectives.base import Objective, model_logits
from deltatune.objectives.scorers import FunctionScorer, TextScorer
from deltatune.preparation import build_model, format_metrics, metrics_on_splits, prepare, run_task, start_seeded
from deltatune.resume import read_saved_config
from deltatune.tasks import get_task
from deltatune.tasks.base import Task
from deltatune.models.hf import align_padding
from deltatune.training.device import to_device
from deltatune.training.checkpoint import fsync_dir
from deltatune.training.loop import Batches, resolve_device
from deltatune.training.run_dir import RunDir
from deltatune.training.state import load_weights


@dataclass
class LoadedRun:
    """A finished run's model, ready for inference (eval mode, on the run's device), and what it was built from."""

    run_dir: RunDir
    config: RunConfig
    task: Task
    model: nn.Module
    method: Method
    objective: Objective
    processor: Any  # the tokenizer or ImageProcessor the model's inputs need
    device: torch.device
    data: Any = None  # deltatune.data.DatasetBundle of the saved splits, when loaded with_data


@dataclass(frozen=True)
class SavedRun:
    """A finished run directory whose config is read and whose task is known; no model is loaded yet."""

    run_dir: RunDir
    config: RunConfig
    task: Task

    def load(self, with_data: bool = False) -> LoadedRun:
        """The run's model with its method applied and trained weights loaded.

        `with_data` rebuilds the saved splits too. A labelled task without model.num_labels always reads its data,
        because the label count sizes the head the weights were trained in.
        """
        weights, _ = self.run_dir.read_final_weights()
        if with_data or (self.task.labelled and self.config.model.num_labels is None):
            prepared = prepare(self.config, self.run_dir.read_splits(), training=False)
            run = LoadedRun(self.run_dir, self.config, self.task, prepared.model, prepared.method,
                            prepared.objective, prepared.processor, prepared.device,
                            prepared.data if with_data else None)
        else:
            run = self._load_without_data()
        load_weights(run.model, run.method, weights)
        run.model.eval()
        return run

    def load_base_model(self, num_labels: int | None = None) -> nn.Module:
        """The pretrained model as the run started from it, without the method: what `--compare` shows as "base".

        Seeded like training, so a freshly initialised head starts as it did there; `num_labels` sizes that head
        when the config leaves it to the data.
        """
        from deltatune.models import load_model, load_processor

        start_seeded(self.config)
        model = load_model(self.config.model, self.task, self.config.model.num_labels or num_labels)
        align_padding(model, load_processor(self.config.model, self.task))  # it reads the run's batches
        return model.to(resolve_device(self.config.train.device)).eval()

    def _load_without_data(self) -> LoadedRun:
        """Model, method and processor built as `prepare` builds them, skipping the dataset."""
        from deltatune.models import load_processor

        start_seeded(self.config)
        objective = build_objective(self.config.objective, self.task)
        processor = load_processor(self.config.model, self.task)
        model, method = build_model(self.config, self.task, self.config.model.num_labels)
        align_padding(model, processor)
        device = resolve_device(self.config.train.device)
        return LoadedRun(self.run_dir, self.config, self.task, model.to(device), method, objective, processor, device)


def open_run(path: str | Path) -> SavedRun:
    """The finished run in `path`: config parsed, task resolved; a UserError when the directory cannot be used."""
    run_dir = RunDir(path)
    run_dir.check_is_run()
    run_dir.check_finished()
    config = read_saved_config(run_dir)
    return SavedRun(run_dir, config, run_task(config))


def load_run(path: str | Path, with_data: bool = False) -> LoadedRun:
    """`open_run(path).load(with_data)`: a finished run's model, method, task, processor (and saved splits)."""
    return open_run(path).load(with_data)


def evaluate_run(path: str | Path, echo=print) -> dict[str, dict[str, float]]:
    """Rebuild a finished run's model from its directory and report its metrics on the saved splits."""
    run = load_run(path, with_data=True)
    setup_objective(run.config, run.objective, run.model, run.method, run.device, run.data.num_labels,
                    run.processor, run.data.label_names)
    data = run.data
    run.objective.attach_examples(data.by_split(),
                                  lambda examples: to_device(data.collate(examples), run.device))
    metrics = metrics_on_splits(run.model, run.objective, run.data, run.config.train, run.device)
    echo(format_metrics("eval", metrics))
    return metrics


# ---- the extra models an objective declares ------------------------------------------------------------------
def setup_objective(config: RunConfig, objective: Objective, policy_model: nn.Module, method: Method,
                    device: torch.device, num_labels: int | None = None, processor: Any = None,
                    label_names: list[str] | None = None) -> None:
    """Load every model `objective` declares (`Objective.models`), frozen and in eval mode on `device`, and hand
    them by role to its `setup` (after giving it the policy's `processor`). Loading never touches the run's random
    streams. `num_labels` sizes a frozen copy of a labelled base."""
    objective.processor, objective.label_names = processor, label_names
    objective.load_run_model = lambda source: _frozen(load_run(source).model).to(device)
    models = {}
    with torch.random.fork_rng(devices=[]):
        for role, spec in type(objective).models.items():
            model = _role_model(config, objective, role, spec, policy_model, method, num_labels)
            if not spec.scores_text:  # a teacher or reference reads the policy's batches, padded as they are
                align_padding(model, processor)
            models[role] = _frozen(model).to(device)
    objective.setup(models, policy_model, method)


def role_source(config: RunConfig, objective: Objective, role: str, spec: ModelRole) -> str:
    """Where the `role` model comes from: `objective.<role>_model`, else the role's default; required otherwise."""
    key = ModelRole.config_key(role)
    source = getattr(config.objective, key, None) or spec.default
    if source is None:
        raise UserError(f"objective {objective.name!r} needs a {role} model; set objective.{key} to a run directory, "
                        f"a model alias, a transformers directory, a .gguf file or package.module:function")
    return source


def _role_model(config: RunConfig, objective: Objective, role: str, spec: ModelRole, policy_model: nn.Module,
                method: Method, num_labels: int | None) -> nn.Module:
    from deltatune.models import load_model

    source = role_source(config, objective, role, spec)
    if spec.scores_text:
        return load_scorer(source, f"objective.{ModelRole.config_key(role)}")
    if source in (POLICY_DISABLED, BASE) and config.model.init_from is not None:
        # The policy starts from that run's weights (an SFT stage): the reference is that start, as TRL keeps a
        # "ref" copy of a re-trained adapter; switching the adapters off would leave the model before that stage.
        if source == POLICY_DISABLED:
            raise UserError(f"objective.{ModelRole.config_key(role)}={POLICY_DISABLED} switches the adapters off, "
                            f"which leaves the model before model.init_from={config.model.init_from}; set it to "
                            f"{BASE} (the run's start) or to a run directory")
        return load_run(config.model.init_from).model
    if source in (POLICY_DISABLED, BASE):
        if switches_off_fully(policy_model):
            return AdaptersDisabled(policy_model)
        if source == POLICY_DISABLED:
            key = ModelRole.config_key(role)
            raise UserError(f"objective.{key}={POLICY_DISABLED} needs a method that can switch itself off, but "
                            f"{method.name!r} changes the base model's own weights; use an adapter method (lora, "
                            f"...) or set objective.{key}={BASE} (a frozen copy) or another model")
        start_seeded(config)  # a copy of the base exactly as the policy started (a new head included)
        return load_model(config.model, run_task(config), num_labels)
    if (Path(source) / "config.yaml").is_file():
        return load_run(source).model
    if spec.task == "auto":  # a model for the run's own task (a distillation teacher): as many outputs as saved
        task, outputs = run_task(config), spec.num_labels if spec.num_labels is not None else num_labels
        outputs = _saved_label_count(source) or outputs
    else:
        task, outputs = get_task(spec.task)(), spec.num_labels
    return load_model(ModelConfig(name=source, task=task.name), task, outputs)


def load_scorer(source: str, key: str) -> nn.Module:
    """A reward as `scorer(prompts, responses) -> scores`: a reward-model run, a one-output sequence classifier
    directory, or a Python function; anything else (a language model, a pretrained model without a trained reward
    head) is a one-line error naming `key`."""
    from deltatune.models import load_model, load_processor, sources

    advice = ("a reward is a run trained with objective.name=reward, a transformers directory of a one-output "
              "sequence classifier, or package.module:function(prompts, responses) returning one score per response")
    if (Path(source) / "config.yaml").is_file():
        run = load_run(source)
        if run.task.auto_class != sources.SEQUENCE_CLASSIFIER_HEAD or _outputs(run.model) != 1:
            raise UserError(f"{key}={source} is a {run.task.name} run, not a reward model; {advice}")
        return TextScorer(run.model, run.processor, run.config.data.max_length)
    parsed = sources.parse_source(source)
    if parsed.kind == sources.IMPORT:
        _, function = sources.import_target(source, key, "a function (prompts, responses) -> one score per response")
        return FunctionScorer(function, source)
    # Only a saved transformers directory can hold a trained head (an alias is a pretrained base); transformers
    # writes one id2label entry per output, and a classifier saved without any has its default two.
    trained_head = parsed.alias is None and parsed.kind == sources.TRANSFORMERS
    if not trained_head or len(sources.read_model_config(parsed.path).get("id2label") or "01") != 1 or not any(
            name.endswith("ForSequenceClassification") for name in sources.saved_architectures(parsed) or []):
        raise UserError(f"{key}={source} is not a trained reward model (no one-output sequence-classification "
                        f"head); {advice}")
    task = get_task("reward-pairs")()
    model = load_model(ModelConfig(name=source, task=task.name), task, 1)
    return TextScorer(model, load_processor(ModelConfig(name=source, task=task.name), task), 512)


def _saved_label_count(source: str) -> int | None:
    """How many labels a saved transformers classifier directory was trained for (its id2label), else None: a
    teacher keeps its own head, so a label count other than the run's is caught instead of replaced by a new head."""
    from deltatune.models import sources

    parsed = sources.parse_source(source)
    if parsed.alias is not None or parsed.kind != sources.TRANSFORMERS:
        return None
    names = sources.read_model_config(parsed.path).get("id2label")
    return len(names) if names else None


def _outputs(model: nn.Module) -> int | None:
    """How many outputs a transformers classifier's head has (config.num_labels), None when it does not say."""
    return getattr(getattr(model, "config", None), "num_labels", None)


def _frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no parameter left trainable (the policy's own parameters are never reached: an
    AdaptersDisabled view holds it outside its module tree)."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()



# ---- a finished run as a plain model: `deltatune export`, and a run directory as the next run's model.name ------
# Max |logit difference| between the run's model and its plain reload, relative to the largest |logit|: folding a
# LoRA update into 30 blocks of fp32 weights moves a 49k-vocabulary LM's logits (|z| ~ 30) by ~1e-4 through
# rounding alone, while a method that does not fold (virtual tokens) moves them by whole units.
EXPORT_TOLERANCE = 1e-5
# The run's resolved config, beside an export: where it came from, and how its inputs were encoded (data.max_length,
# data.image_size), which `deltatune.load` applies. Not config.yaml: an export is no run directory.
EXPORT_CONFIG = "deltatune_config.yaml"


def write_plain_model(run: LoadedRun, out: Path) -> float:
    """Fold `run`'s adapters into the weights (`adapters.merge_and_unload`) and save the result at `out` as a plain
    model (a transformers directory with its tokenizer; a safetensors state dict for other modules). The copy is
    reloaded from disk and its logits compared with the run's model on a test batch before `out` appears; a method
    that cannot be folded into plain weights (virtual tokens, bottleneck adapters) is a UserError and leaves nothing.
    Returns the largest logit difference."""
    examples = run.data.test or run.data.validation or run.data.train
    batch = next(Batches(examples, run.data.collate).in_order(4))
    # Compared where the saved copy is computed, in fp32 on the CPU: a GPU's TF32 convolutions and other reduction
    # orders would differ by more than the tolerance and refuse a fold that is right.
    run.model.to("cpu").float()
    with torch.no_grad():
        expected = model_logits(run.model, batch).float()
    merge_and_unload(run.model)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_plain(run.model, run.task, run.processor, tmp)
    _save_export_config(run.config, tmp)
    difference = float((_reload_logits(tmp, run.task, run.model, batch) - expected).abs().max())
    if difference > EXPORT_TOLERANCE * max(1.0, float(expected.abs().max())):
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"method {run.method.name!r} of {run.run_dir.path} cannot be folded into plain weights (the "
                        f"plain model's logits differ by {difference:.2e}); only runs of methods that change or merge "
                        "into the base weights (full, freeze, bitfit, lora, dora, qlora, sparse) can be exported")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return difference


def _save_export_config(config: RunConfig, directory: Path) -> None:
    import yaml

    from deltatune.config.loader import config_to_dict

    (directory / EXPORT_CONFIG).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def exported_data_settings(directory: str | Path) -> dict[str, Any]:
    """The data section of the run an export came from ({} for exports written before it was saved with them)."""
    import yaml

    path = Path(directory) / EXPORT_CONFIG
    return dict((yaml.safe_load(path.read_text()) or {}).get("data") or {}) if path.is_file() else {}


def _save_plain(model: nn.Module, task: Task, processor: Any, directory: Path) -> None:
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


def _reload_logits(directory: Path, task: Task, model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of the saved copy as read back from disk (a fresh load with the task's Auto class when the model is a
    transformers model)."""
    if hasattr(model, "save_pretrained") and task.auto_class is not None:
        import transformers

        reloaded = getattr(transformers, task.auto_class).from_pretrained(directory, dtype=torch.float32)
    else:
        reloaded = model
        reloaded.load_state_dict(load_file(str(directory / "model.safetensors")))
    reloaded.eval()
    with torch.no_grad():
        return model_logits(reloaded, batch)


def with_run_as_model(config: RunConfig) -> RunConfig:
    """`config` with a finished run directory in model.name replaced by that run's model as a plain transformers
    directory, `<run>/merged/` (written once by `write_plain_model`, verified, reused afterwards): a run directory
    is then a base model like any other, and stages chain by run directories (SFT, then PPO or DPO on top).

    A folded copy is never changed once written, because later runs name it as their base: when the run trained on
    since (--resume), its new weights are folded into `<run>/merged-<sha256 prefix>/` and `merged/` stays as it was."""
    path = Path(config.model.name).expanduser()
    if not (path / "config.yaml").is_file():
        return config
    saved = open_run(path)
    stamp = _weights_stamp(saved.run_dir)
    first, later = path / "merged", path / f"merged-{stamp[:16]}"
    for merged in (first, later):
        if (merged / "config.json").is_file() and _read_stamp(merged) == stamp:
            return replace(config, model=replace(config.model, name=str(merged)))
    merged = later if first.exists() else first
    shutil.rmtree(merged, ignore_errors=True)  # a fold of these very weights that was cut off before its stamp
    loaded = saved.load(with_data=True)
    if not hasattr(loaded.model, "save_pretrained"):
        raise UserError(f"{path} trained a {type(loaded.model).__name__}, not a transformers model, so it cannot be "
                        "model.name of another run; name its base model and start from the run's weights with "
                        f"model.init_from={path}")
    write_plain_model(loaded, merged)
    (merged / "deltatune-source.json").write_text(json.dumps({"weights_sha256": stamp}))
    return replace(config, model=replace(config.model, name=str(merged)))


def _weights_stamp(run_dir: RunDir) -> str:
    """sha256 of the run's final weights file: what `<run>/merged/` was folded from."""
    digest = hashlib.sha256()
    with open(run_dir.weights / "model.safetensors", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_stamp(merged: Path) -> str | None:
    try:
        return json.loads((merged / "deltatune-source.json").read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
