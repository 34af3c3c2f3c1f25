"""`deltatune tune CONFIG --trials N`: hyperparameter search with optuna (Akiba et al. 2019).

Every trial is a normal run directory (`<output_dir>/<run_name>-trial<k>`), trained by the one training loop with
the config plus the trial's choices. The sampler is TPE (seeded by train.seed); trial 0 is the config's own
settings, so the search starts from the recipe the user has and its best is never a step back from it. The pruner
is optuna's median rule fed by every validation the loop makes, reported at the trial's *progress* through its own
schedule (percent of its steps), not at its step number: trials of 1 and 3 epochs decay their learning rate on
different clocks, and a 3-epoch trial at step 160 (rate still high) is no peer of a 1-epoch trial at step 160
(nearly done). A trial is judged only from halfway to 90% through its schedule, only once it stops improving (its
latest score no new best), and then by optuna's median rule: pruned when its best score so far is below the median
of at least three finished trials' scores at the same progress; never near or at its end (stopping it then would
save little and discard its result). A trial whose training diverges (non-finite loss or weights) counts as pruned
and the search goes on. The study lives in SQLite (`<output_dir>/tune-<run_name>/study.db`; without run_name, named
by the config file), so a search that is killed continues when the same command runs again: the trial that was cut
off is marked failed (the recipe is queued again if it was that trial), numbering goes on, and `--trials N` counts
the finished (complete or pruned) trials wanted in all. A study continues only with the config, space and metric it
started with.

Search space: the method's own (`Method.search_space`: LoRA's r and alpha, adapters' reduction factor, virtual
tokens' count, each with a learning-rate range suited to it) on top of epochs and batch size; or a YAML file
(`--space`) mapping config paths to {type: float|int|categorical, low, high, log, choices}. The best trial's
resolved config is written to `tune-<run_name>/best.yaml`, a plot of the study to `study.png`, the trials to
`trials.json`, and both to an offline page, `index.html`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from deltatune.config.loader import load_config, read_yaml
from deltatune.errors import UserError

SHARED_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "train.epochs": {"type": "categorical", "choices": [1, 2, 3]},
    "train.batch_size": {"type": "categorical", "choices": [16, 32]},
}
# Pruning judges a trial between these points (percent) of its schedule: earlier, the rate is still warm and scores
# say more about the schedule than about the settings; later, stopping saves little and discards a near-finished
# result (the last study pruned a trial 2 steps before its end).
JUDGE_FROM_PERCENT, JUDGE_UNTIL_PERCENT = 50, 90
# ...and only against at least this many finished trials that reported at the same progress. optuna's median rule
# takes the median over *complete* trials only, so with one of them at a given percent a trial is judged against a
# single noisy curve: a study pruned the recipe's twin (lr +0.8%) 0.07 points below the recipe's own score there.
MIN_TRIALS_TO_JUDGE = 3
# A trial is judged only when its latest score is no new best of its own (it has stalled): a still-rising trial runs
# on even below the median. Validation scores move by about a point between evaluations, and the third study pruned
# the recipe's twin (lr +0.8%) at 66% for being one example under the median while it was rising (0.8064 → 0.8205);
# the recipe itself stood at 0.8212 there and ended at 0.8353, the study's best.
SPEC_KEYS = {"float": {"type", "low", "high", "log"}, "int": {"type", "low", "high", "log"},
             "categorical": {"type", "choices"}}


def search_space(config_path: str | None, overrides: list[str], space_file: str | None) -> dict[str, dict]:
    """The space to search: the file's, or the shared one updated by the config's method's own."""
    from deltatune.methods import get_method

    if space_file is not None:
        space = read_yaml(space_file)
        source = f"search space {space_file}"
    else:
        method = load_config(config_path, overrides).method.name
        space = {**SHARED_SPACE, **get_method(method).search_space}
        source = f"the default search space of method {method!r}"
    if not isinstance(space, dict) or not space:
        raise UserError(f"{source} must map config keys to ranges, e.g. train.lr: {{type: float, low: 1.0e-4, "
                        f"high: 3.0e-3, log: true}}")
    for key, spec in space.items():
        check_spec(key, spec, source)
        for value in extreme_values(spec):  # every choice and both bounds: a bad one would stop the search midway
            try:  # the strict config parser names the valid keys when this one is not among them
                load_config(config_path, [*overrides, f"{key}={json.dumps(value)}"])
            except UserError as error:
                raise UserError(f"{source}: {key}: {error}") from None
    return space


def check_spec(key: str, spec: Any, source: str) -> None:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in SPEC_KEYS:
        raise UserError(f"{source}: {key} needs a mapping with type: float, int or categorical, got {spec!r}")
    unknown = set(spec) - SPEC_KEYS[kind]
    if unknown:
        raise UserError(f"{source}: {key} has unknown fields {sorted(unknown)}; a {kind} takes "
                        f"{sorted(SPEC_KEYS[kind])}")
    if kind == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise UserError(f"{source}: {key} needs a non-empty list of choices")
    elif not (isinstance(spec.get("low"), (int, float)) and isinstance(spec.get("high"), (int, float))
              and spec["low"] < spec["high"]) or (spec.get("log") and spec["low"] <= 0):
        raise UserError(f"{source}: {key} needs numbers low < high (and low > 0 with log: true), got {spec!r}")


def extreme_values(spec: dict[str, Any]) -> list[Any]:
    """The values of a range a trial can take that are worth checking: every choice, or both bounds."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    cast = int if spec["type"] == "int" else float
    return [cast(spec["low"]), cast(spec["high"])]


def suggest(trial: Any, key: str, spec: dict[str, Any]) -> Any:
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))


def run_study(config_path: str | None, overrides: list[str], trials: int, space_file: str | None = None,
              timeout: float | None = None, echo=print) -> dict[str, Any]:
    """Run (or continue) the study until `trials` trials have finished or `timeout` seconds have passed."""
    from deltatune.objectives import build_objective
    from deltatune.preparation import run_task

    base = load_config(config_path, overrides)
    if base.data.split.validation <= 0:
        raise UserError("tune scores every trial on the validation split; set data.split.validation above 0 "
                        "(e.g. 0.1)")
    name = base.run_name or default_study_name(config_path, base)
    space = search_space(config_path, overrides, space_file)
    objective = build_objective(base.objective, run_task(base))
    metric = objective.main_metric if base.train.metric == "auto" else base.train.metric
    direction = "maximize" if objective.higher_is_better(metric) else "minimize"
    study_dir = Path(base.output_dir) / f"tune-{name}"
    study = open_study(study_dir, name, direction, base.train.seed, trials)
    check_same_study(study, study_dir, study_definition(base, space, metric))
    _fail_interrupted(study, echo)
    queue_recipe(study, config_values(base, space))
    run_trial = trial_runner(config_path, overrides, Path(base.output_dir) / name, space, metric, direction, echo)
    done = _finished(study)
    if done < trials:
        study.optimize(run_trial, n_trials=trials - done, timeout=timeout, catch=())
    return _write_results(study, study_dir, metric, base.train.progress, echo)


def default_study_name(config_path: str | None, config: Any) -> str:
    """A study without run_name is named by its config file (or model and method): stable, so running the same
    command again finds the study and continues it."""
    stem = Path(config_path).stem if config_path else f"{config.model.name}-{config.method.name}"
    return "".join(char if char.isalnum() or char in "-_." else "-" for char in stem)


def open_study(study_dir: Path, name: str, direction: str, seed: int, trials: int) -> Any:
    """The study in `study_dir/study.db`, created or loaded, with the TPE sampler and the median pruner."""
    import optuna

    study_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{study_dir / 'study.db'}"
    sampler = optuna.samplers.TPESampler(seed=_sampler_seed(seed, storage, name),
                                         n_startup_trials=startup_trials(trials))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=JUDGE_FROM_PERCENT,
                                         n_min_trials=MIN_TRIALS_TO_JUDGE)
    return optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True,
                               sampler=sampler, pruner=pruner)


def trial_runner(config_path: str | None, overrides: list[str], runs: Path, space: dict[str, dict], metric: str,
                 direction: str, echo) -> Any:
    """The function optuna calls per trial: train the config plus the trial's choices as run `<runs>-trial<k>`,
    reporting each validation at the trial's progress, and return its final validation score."""
    import optuna

    from deltatune.errors import TrainingDiverged
    from deltatune.runner import train

    def run_trial(trial: optuna.Trial) -> float:
        params = {key: suggest(trial, key, spec) for key, spec in space.items()}
        name = f"{runs.name}-trial{trial.number}"
        shutil.rmtree(runs.with_name(name), ignore_errors=True)  # a cut-off earlier attempt of this number
        config = load_config(config_path, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in params.items()),
                                           f"run_name={name}", "train.progress=false"])
        echo(f"trial {trial.number}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in params.items()))
        try:
            summary = train(config, echo=lambda *_: None, on_evaluation=pruning_reporter(trial, metric, direction,
                                                                                         echo))
        except TrainingDiverged as error:  # settings this model cannot train with: a poor trial, not a broken search
            trial.set_user_attr("diverged", str(error))
            echo(f"trial {trial.number}: {str(error).split(';')[0]}; counted as pruned, the search goes on")
            raise optuna.TrialPruned() from None
        trial.set_user_attr("run_dir", summary["run_dir"])
        value = summary["after"]["validation"][metric]
        echo(f"trial {trial.number}: validation {metric} {value:.4f} ({summary['run_dir']})")
        return value

    return run_trial


def pruning_reporter(trial: Any, metric: str, direction: str, echo) -> Any:
    """The training loop's `on_evaluation` hook for one trial: report the score at the trial's progress (percent of
    its steps) and stop the trial when optuna's median rule says so, but only while it has stalled."""
    import optuna

    reported: set[int] = set()
    scores: list[float] = []  # the trial's reported scores so far

    def report(step: int, total_steps: int, metrics: dict[str, float]) -> None:
        percent = math.floor(100 * step / total_steps)
        if percent in reported:
            return  # two evaluations in one percent of the schedule: the first one speaks for it
        reported.add(percent)
        value = metrics[metric]
        rising = not scores or (value > max(scores) if direction == "maximize" else value < min(scores))
        scores.append(value)
        trial.report(value, percent)
        if percent < JUDGE_UNTIL_PERCENT and not rising and trial.should_prune():
            echo(f"trial {trial.number}: pruned at step {step} of {total_steps} ({metric} {value:.4f})")
            raise optuna.TrialPruned()

    return report


def config_values(config: Any, space: dict[str, dict]) -> dict[str, Any]:
    """The config's own value of every searched key (`train.lr` → config.train.lr) that lies in the space: the
    search's first trial. A value outside it (an lr below the range, an r not among the choices) is left to TPE."""
    values = {}
    for key, spec in space.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        inside = (value in spec["choices"] if spec["type"] == "categorical"
                  else isinstance(value, (int, float)) and spec["low"] <= value <= spec["high"])
        if inside:
            values[key] = value
    return values


def _finished(study: Any) -> int:
    import optuna

    return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
               for t in study.get_trials(deepcopy=False))


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the results: optuna's default is 10, which would leave a 12-trial study all
    but random; a third of the study (at least 3, at most 10) gives TPE most of a small budget to steer."""
    return min(10, max(3, trials // 3))


def _sampler_seed(seed: int, storage: str, study_name: str) -> int:
    """The sampler's seed for this session of the study: train.seed plus the trials already in it. A resumed study
    must not replay the random start-up draws of the first session (a fresh RandomState(seed) would suggest trial 1's
    values again as the first trial after the resume); offsetting by the trial count keeps it reproducible."""
    import optuna

    try:
        existing = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # a new study
        return seed
    return seed + len(existing.get_trials(deepcopy=False))


def _fail_interrupted(study: Any, echo) -> None:
    """Trials left RUNNING by a killed search never finish; mark them failed so the search goes on after them. One
    `tune` process per study: a second one running on the same study would see the first one's trial as cut off."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        echo(f"trial {trial.number} was interrupted; marked failed, the search continues after it")


def queue_recipe(study: Any, recipe: dict[str, Any]) -> None:
    """Queue the config's own settings as the next trial unless a trial already finished with them (or one is
    queued): the first session's trial 0, and again when a kill or Ctrl-C cut that trial off (it failed)."""
    import optuna

    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == state.WAITING for t in trials)
    # The recipe may fix only some of the searched keys (a config value outside the space is left to the sampler):
    # a trial ran it when those keys agree.
    tried = any(all(t.params.get(key) == value for key, value in recipe.items())
                and t.state in (state.COMPLETE, state.PRUNED) for t in trials)
    if recipe and not (waiting or tried):
        study.enqueue_trial(recipe)


IGNORED_BY_STUDY = {"run_name", "output_dir", "train.progress"}  # they name or show a run; they change no score


def study_definition(config: Any, space: dict[str, dict], metric: str) -> dict[str, Any]:
    """What a study searches, as flat `key: value` pairs: the resolved config, the space and the metric."""
    from deltatune.config.loader import config_to_dict

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value and key != "columns":
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[f"{prefix}{key}"] = value
        return items

    settings = {key: value for key, value in flat(config_to_dict(config)).items() if key not in IGNORED_BY_STUDY}
    return json.loads(json.dumps({**settings, **{f"space {key}": spec for key, spec in space.items()},
                                  "metric": metric}, default=str))


def check_same_study(study: Any, study_dir: Path, definition: dict[str, Any]) -> None:
    """A study continues only with the config, space and metric it started with: trials of another setup would be
    ranked together with its own. The first session stores the definition; later ones must match it."""
    stored = study.user_attrs.get("definition")
    if stored is None:
        study.set_user_attr("definition", definition)
        return
    changed = sorted(key for key in stored.keys() | definition.keys() if stored.get(key) != definition.get(key))
    if changed:
        key = changed[0]
        raise UserError(f"{study_dir} holds a study of another setup ({key}: {stored.get(key)!r} there, "
                        f"{definition.get(key)!r} now{f', and {len(changed) - 1} more' if len(changed) > 1 else ''})"
                        f"; set run_name to start a new study, or put the setting back to continue this one")


def _write_results(study: Any, study_dir: Path, metric: str, progress: bool, echo) -> dict[str, Any]:
    import optuna
    import yaml

    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "run_dir": t.user_attrs.get("run_dir"),
             "last_percent": max(t.intermediate_values) if t.intermediate_values else None,
             "diverged": t.user_attrs.get("diverged")}
            for t in study.get_trials(deepcopy=False)]
    (study_dir / "trials.json").write_text(json.dumps(rows, indent=1))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UserError(f"no trial of the study in {study_dir} finished; run more trials (--trials)")
    best = study.best_trial
    best_config = yaml.safe_load((Path(best.user_attrs["run_dir"]) / "config.yaml").read_text())
    # Ready for `deltatune train best.yaml`: a new run's name (the trial's run exists) and the user's progress bar.
    best_config["run_name"], best_config["train"]["progress"] = None, progress
    (study_dir / "best.yaml").write_text(yaml.safe_dump(best_config, sort_keys=False))
    figure = study_figure(rows, metric, study.direction.name == "MAXIMIZE")
    (study_dir / "study.png").write_bytes(figure)
    (study_dir / "index.html").write_text(study_page(study_dir, rows, metric, best.number, figure), encoding="utf-8")
    echo(f"best: trial {best.number}, validation {metric} {best.value:.4f}: {best.params}")
    echo(f"best config: {study_dir / 'best.yaml'}; all trials: {study_dir / 'trials.json'}")
    return {"best_trial": best.number, "best_value": best.value, "best_params": best.params,
            "best_run_dir": best.user_attrs["run_dir"], "trials": rows}


def study_page(study_dir: Path, rows: list[dict[str, Any]], metric: str, best: int, figure: bytes) -> str:
    """The study as an offline HTML page: the plot and every trial with its settings and outcome."""
    from deltatune.insight.page import Section, render

    keys = sorted({key for row in rows for key in row["params"]})
    trials = Section("Trials").table(
        ["trial", "state", f"validation {metric}", *keys, "last report (% of its steps)", "run"],
        [(row["number"], row["state"] + (" (best)" if row["number"] == best else ""), row["value"],
          *(row["params"].get(key) for key in keys), row["last_percent"], row["run_dir"]) for row in rows])
    plot = Section("Study").figure(figure, "validation score per trial").text(
        "TPE sampler, trial 0 the config's own settings; pruned trials (dotted) stopped when, stalled between 50% "
        "and 90% of their schedule, their best score was below the median of finished trials at the same progress "
        "(percent of their steps), or when their training diverged. best.yaml holds the best trial's full config.",
        note=True)
    return render(f"Hyperparameter search: {study_dir}", [plot, trials])


def study_figure(rows: list[dict[str, Any]], metric: str, maximize: bool) -> bytes:
    """Each trial's validation score (pruned ones at their last reported step, hollow), and the best so far."""
    from deltatune.insight.plots import _png, _pyplot

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 3.5))
    complete = [(r["number"], r["value"]) for r in rows if r["state"] == "COMPLETE"]
    pruned = [r["number"] for r in rows if r["state"] == "PRUNED"]
    if complete:
        axis.scatter(*zip(*complete), label="complete", color="#4477aa")
        best, running = [], -math.inf if maximize else math.inf
        for number, value in complete:
            running = max(running, value) if maximize else min(running, value)
            best.append((number, running))
        axis.step(*zip(*best), where="post", color="#cc6677", label="best so far")
    for number in pruned:
        axis.axvline(number, color="#bbbbbb", linestyle=":", linewidth=1)
    axis.set_xlabel("trial (dotted: pruned)")
    axis.set_ylabel(f"validation {metric}")
    axis.legend()
    axis.grid(alpha=0.3)
    return _png(figure)
