"""What `--resume` may change, and whether a run directory can be continued at all.

A resumed run continues with the config saved in its directory. The config given now must match that one except
in `RESUMABLE` keys: the step budget (`train.max_steps`, `train.epochs`; extending a finished or interrupted run is
the common wish) and settings that do not change what is computed (progress bar, CPU threads, device). Any other
difference is refused by name, so a resume never silently ignores what the command line asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune.config.loader import config_to_dict, parse_config, read_yaml
from deltatune.config.schema import DataConfig, RunConfig
from deltatune.errors import UserError
from deltatune.tasks import get_task, resolve_task
from deltatune.tasks.base import Task
from deltatune.training.run_dir import RunDir
from deltatune.training.state import latest_loop_state

RESUMABLE = ("train.max_steps", "train.epochs", "train.progress", "train.num_threads", "train.device",
             "train.distributed")  # checkpoints hold full tensors whichever way the ranks shared the work
LOCATION = ("run_name", "output_dir")  # where the run is, not what it computes: never compared
_ABSENT = object()


def flatten(config_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.1, ...}: one dotted key per leaf value of a nested config dict."""
    flat: dict[str, Any] = {}
    for key, value in config_dict.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "extra":
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def changed_keys(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (location keys left out), in config order."""
    one, two = flatten(first), flatten(second)
    keys = list(one) + [key for key in two if key not in one]
    return [key for key in keys if key not in LOCATION and one.get(key, _ABSENT) != two.get(key, _ABSENT)]


def read_saved_config(run_dir: RunDir) -> RunConfig:
    """The config a run directory was started with; a UserError naming the file when it no longer parses.

    Runs saved before `data.columns` are read with their per-role column keys mapped onto it, and runs saved
    before the `objective:` section with their `train.objective` moved to `objective.name`."""
    path = run_dir.path / "config.yaml"
    try:
        raw = read_yaml(path)
        _move_legacy_objective(raw)
        legacy_columns = _take_legacy_columns(raw)
        config = parse_config(raw)
        if legacy_columns:
            task = get_task(resolve_task(config.model))()
            config.data.columns = _upgraded_columns(legacy_columns, task) | config.data.columns
        return config
    except UserError as error:
        message = str(error)
        raise UserError(message if str(path) in message else f"{path}: {message}") from None


def _move_legacy_objective(raw: dict[str, Any]) -> None:
    """Runs saved before the `objective:` section named their objective as `train.objective`: move it there."""
    train = raw.get("train")
    if isinstance(train, dict) and "objective" in train:
        name = train.pop("objective")
        objective = raw.setdefault("objective", {})
        if isinstance(objective, dict):
            objective.setdefault("name", name)


def _take_legacy_columns(raw: dict[str, Any]) -> dict[str, str]:
    """Runs saved before `data.columns` wrote one key per role (text_column: text, ...): remove those keys from
    `raw` and return the role -> column pairs they set, so such runs still load."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return {}
    columns = {}
    for key, new_key in DataConfig.replaced_keys.items():
        value = data.pop(key, None)
        if value is not None:
            columns[new_key.rpartition(".")[2]] = str(value)
    return columns


def _upgraded_columns(legacy: dict[str, str], task: Task) -> dict[str, str]:
    """The legacy pairs that matter to `task`: its roles, where they differ from its defaults (the old config
    listed every role of every task, most of them unused)."""
    return {role: column for role, column in legacy.items() if role in task.roles and column != task.roles[role]}


def resumed_config(run_dir: RunDir, requested: RunConfig) -> RunConfig:
    """The saved config with the requested values of the changed `RESUMABLE` keys; refuses any other change."""
    saved = config_to_dict(read_saved_config(run_dir))
    wanted = config_to_dict(requested)
    changes = changed_keys(saved, wanted)
    refused = [key for key in changes if key not in RESUMABLE]
    if refused:
        key = refused[0]
        was, now = flatten(saved).get(key, "unset"), flatten(wanted).get(key, "unset")
        raise UserError(f"--resume continues {run_dir.path} as it was configured, but {key} changed ({was!r} -> "
                        f"{now!r}); on resume only {', '.join(RESUMABLE)} may change: undo that change, or give "
                        f"the run a new run_name to start it afresh")
    merged = saved
    for key in changes:
        *sections, name = key.split(".")
        node = merged
        for section in sections:
            node = node[section]
        node[name] = flatten(wanted)[key]
    return parse_config(merged)


def check_resume_point(run_dir: RunDir, total_steps: int) -> None:
    """Refuse a resume that would train nothing: a finished run without a larger step budget, or a budget below
    the steps already taken. A run killed while finishing (after its last step, before its summary) may finish."""
    latest = latest_loop_state(run_dir.checkpoints)
    if latest is None:
        return
    if latest.step > total_steps:
        raise UserError(f"{run_dir.path} already took {latest.step} steps but the config given now asks for "
                        f"{total_steps} in all; resume with train.max_steps={latest.step} or more (its config.yaml "
                        f"has the budget it was last given)")
    finished = (run_dir.path / "summary.json").exists() and (run_dir.weights / "state.json").exists()
    if not finished:
        return
    if latest.stopped_early:
        raise UserError(f"{run_dir.path} stopped early at step {latest.step} (no validation improvement for "
                        f"train.early_stopping_patience evaluations); more steps would stop again, so start a new "
                        f"run (new run_name) instead")
    if latest.step == total_steps:
        raise UserError(f"{run_dir.path} already finished its {total_steps} steps; to train further, resume with a "
                        f"larger budget, e.g. train.max_steps={2 * total_steps}")


def run_names(root: Path) -> list[str]:
    """Names of the run directories (those holding a config.yaml) under `root`."""
    return sorted(path.parent.name for path in root.glob("*/config.yaml")) if root.is_dir() else []
