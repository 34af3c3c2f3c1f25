"""`deltatune tune CONFIG --trials N`: hyperparameter search with optuna (Akiba et al. 2019).

Every trial is a normal run directory (`<output_dir>/<run_name>-trial<k>`), trained by the one training loop with
the config plus the trial's choices. The sampler is TPE (seeded by train.seed); trial 0 is the config's own
settings, so the search starts from the recipe the user has and its best is never a step back from it. The pruner
is optuna's median rule fed by every validation the loop makes, reported at the trial's *progress* through its own
schedule (percent of its steps), not at its step number: trials of 1 and 3 epochs decay their learning rate on
different clocks, and a 3-epoch trial at step 160 (rate still high) is no peer of a 1-epoch trial at step 160
(nearly done). A trial is judged only from halfway to 90% through its schedule, against the median of at least
three finished trials at the same progress, and only once it stops improving (its latest score no new best); never
near or at its end (stopping it then would save little and discard its result). The study lives in SQLite
(`<output_dir>/tune-<run_name>/study.db`), so a search that is killed continues when the same command runs again:
the trial that was cut off is marked failed, numbering goes on, and `--trials N` counts the finished (complete or
pruned) trials wanted in all.

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
    for key, spec in space.items():
        check_spec(key, spec, source)
        try:  # the strict config parser names the valid keys when this one is not among them
            load_config(config_path, [*overrides, f"{key}={json.dumps(example_value(spec))}"])
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


def example_value(spec: dict[str, Any]) -> Any:
    return spec["choices"][0] if spec["type"] == "categorical" else spec["low"]


def suggest(trial: Any, key: str, spec: dict[str, Any]) -> Any:
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))


def run_study(config_path: str | None, overrides: list[str], trials: int, space_file: str | None = None,
              timeout: float | None = None, echo=print) -> dict[str, Any]:
    """Run (or continue) the study until `trials` trials have finished or `timeout` seconds have passed."""
    import optuna

    from deltatune.objectives import build_objective
    from deltatune.preparation import run_task
    from deltatune.runner import train

    base = load_config(config_path, overrides)
    space = search_space(config_path, overrides, space_file)
    objective = build_objective(base.objective, run_task(base))
    metric = objective.main_metric if base.train.metric == "auto" else base.train.metric
    direction = "maximize" if objective.higher_is_better(metric) else "minimize"
    study_dir = Path(base.output_dir) / f"tune-{base.run_name}"
    study_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{study_dir / 'study.db'}"
    study = optuna.create_study(study_name=base.run_name, storage=storage, direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=_sampler_seed(base.train.seed, storage,
                                                                                      base.run_name),
                                                                   n_startup_trials=startup_trials(trials)),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2,
                                                                   n_warmup_steps=JUDGE_FROM_PERCENT,
                                                                   n_min_trials=MIN_TRIALS_TO_JUDGE))
    _fail_interrupted(study, echo)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(config_values(base, space), skip_if_exists=True)

    def run_trial(trial: optuna.Trial) -> float:
        params = {key: suggest(trial, key, spec) for key, spec in space.items()}
        name = f"{base.run_name}-trial{trial.number}"
        shutil.rmtree(Path(base.output_dir) / name, ignore_errors=True)  # a cut-off earlier attempt of this number
        config = load_config(config_path, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in params.items()),
                                           f"run_name={name}", "train.progress=false"])
        echo(f"trial {trial.number}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in params.items()))

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
                echo(f"trial {trial.number}: pruned at step {step} of {total_steps} ({metric} {metrics[metric]:.4f})")
                raise optuna.TrialPruned()

        summary = train(config, echo=lambda *_: None, on_evaluation=report)
        trial.set_user_attr("run_dir", summary["run_dir"])
        value = summary["after"]["validation"][metric]
        echo(f"trial {trial.number}: validation {metric} {value:.4f} ({summary['run_dir']})")
        return value

    done = _finished(study)
    if done < trials:
        study.optimize(run_trial, n_trials=trials - done, timeout=timeout, catch=())
    return _write_results(study, study_dir, metric, echo)


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
    """Trials left RUNNING by a killed search never finish; mark them failed so the search goes on after them."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        echo(f"trial {trial.number} was interrupted; marked failed, the search continues after it")


def _write_results(study: Any, study_dir: Path, metric: str, echo) -> dict[str, Any]:
    import optuna
    import yaml

    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "run_dir": t.user_attrs.get("run_dir"),
             "last_percent": max(t.intermediate_values) if t.intermediate_values else None}
            for t in study.get_trials(deepcopy=False)]
    (study_dir / "trials.json").write_text(json.dumps(rows, indent=1))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UserError(f"no trial of the study in {study_dir} finished; run more trials (--trials)")
    best = study.best_trial
    best_config = yaml.safe_load((Path(best.user_attrs["run_dir"]) / "config.yaml").read_text())
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
        "TPE sampler, trial 0 the config's own settings; pruned trials (dotted) stopped when their score, between "
        "50% and 90% of their schedule, fell below the median of earlier trials at the same progress (percent of "
        "their steps). best.yaml holds the best trial's full config.", note=True)
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
