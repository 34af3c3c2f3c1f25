"""`deltatune tune` (issue 14) on a tiny classifier: trials are run directories, the best config is written out, a
killed search continues its numbering, pruning stops poor trials, and bad search spaces are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from deltatune.cli import main
from deltatune.config.loader import load_config
from tests.bad_input import assert_refused, write_jsonl


def study_args(root: Path, name: str = "study") -> list[str]:
    data = write_jsonl(root / "reviews.jsonl", [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": i % 2}
                                                for i in range(60)])
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
                                     "method.r": {"type": "categorical", "choices": [2, 4]}}))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "tests.tiny_models:tiny_bert", "task": "classification"},
                                      "data": {"name": str(data)}, "method": {"name": "lora", "r": 4},
                                      "train": {"max_steps": 4, "eval_every": 2, "num_threads": 1,
                                                "lr": 3e-3}}))
    return [str(config), f"output_dir={root / 'runs'}", f"run_name={name}", "--space", str(space)]


def trials_of(root: Path, name: str = "study") -> list[dict]:
    return json.loads((root / "runs" / f"tune-{name}" / "trials.json").read_text())


def test_a_study_runs_trials_as_runs_and_writes_the_best_config(tmp_path) -> None:
    assert main(["tune", *study_args(tmp_path), "--trials", "3"]) == 0
    trials = trials_of(tmp_path)
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert trials[0]["params"] == {"train.lr": 3e-3, "method.r": 4}  # the search starts from the config's own
    assert all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
    finished = [t for t in trials if t["state"] == "COMPLETE"]
    assert all((Path(t["run_dir"]) / "summary.json").is_file() for t in finished)
    study_dir = tmp_path / "runs" / "tune-study"
    best = load_config(study_dir / "best.yaml")
    best_trial = max(finished, key=lambda t: t["value"])
    assert best.train.lr == best_trial["params"]["train.lr"] and best.method.r == best_trial["params"]["method.r"]
    assert best.run_name is None and best.train.progress  # `deltatune train best.yaml` makes a new run, as usual
    assert (study_dir / "study.png").read_bytes().startswith(b"\x89PNG")
    page = (study_dir / "index.html").read_text()
    assert "data:image/png;base64," in page and "(best)" in page and "method.r" in page
    assert main(["tune", *study_args(tmp_path), "--trials", "4"]) == 0  # one more, numbered on
    assert [t["number"] for t in trials_of(tmp_path)] == [0, 1, 2, 3]


def test_a_killed_study_resumes_and_continues_numbering(tmp_path) -> None:
    args = study_args(tmp_path, "killed")
    command = [sys.executable, "-m", "deltatune.cli", "tune", *args, "--trials", "3"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    second = tmp_path / "runs" / "killed-trial1"
    deadline = time.time() + 240
    while not second.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert second.exists(), "the search never reached its second trial"
    assert main(["tune", *args, "--trials", "3"]) == 0
    trials = trials_of(tmp_path, "killed")
    states = {t["number"]: t["state"] for t in trials}
    assert states[0] == "COMPLETE" and states[1] == "FAIL"  # the trial cut off by the kill
    assert sum(state in ("COMPLETE", "PRUNED") for state in states.values()) == 3
    assert sorted(states) == list(range(len(states)))  # numbering went on after the killed trial
    params = {t["number"]: t["params"] for t in trials}
    assert params[2] != params[1]  # the resumed sampler does not replay the first session's random draws


def test_search_space_mistakes(tmp_path, capsys) -> None:
    args = study_args(tmp_path)
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}))
    at = args.index("--space")
    bad = [*args[:at], "--space", str(space)]
    assert_refused(["tune", *bad, "--trials", "1"], r"train\.learning_rate.*unknown.*lr", capsys, tmp_path)
    space.write_text(yaml.safe_dump({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}))
    assert_refused(["tune", *bad, "--trials", "1"], r"train\.lr needs numbers low < high", capsys, tmp_path)
    space.write_text(yaml.safe_dump({"method.r": {"type": "categorical", "values": [2]}}))
    assert_refused(["tune", *bad, "--trials", "1"], r"unknown fields \['values'\]", capsys, tmp_path)
    space.write_text(yaml.safe_dump({"train.batch_size": {"type": "categorical", "choices": [8, 0]}}))  # not the first
    assert_refused(["tune", *bad, "--trials", "1"], r"bad\.yaml: train\.batch_size: .*batch_size", capsys, tmp_path)
    space.write_text(yaml.safe_dump({}))
    assert_refused(["tune", *bad, "--trials", "1"], r"must map config keys to ranges", capsys, tmp_path)
    assert_refused(["tune", *args, "--trials", "0"], r"--trials must be at least 1", capsys, tmp_path)
    assert_refused(["tune", *args, "data.split.validation=0", "--trials", "1"],
                   r"validation split; set data\.split\.validation above 0", capsys, tmp_path)


def test_pruning_judges_stalled_trials_by_progress_from_halfway_against_three_finished_ones(tmp_path,
                                                                                           monkeypatch) -> None:
    """Trials of different lengths are compared at the same percent of their own schedules, only from halfway to
    90% of it, only once they stop improving, and only against the median of at least three finished trials that
    reported at that percent. A fake training reports scores so the rule is tested alone: trial 0 (the config's lr,
    20 steps, evaluated at each) scores 0.9; short trials (lr ≥ 2e-3, 20 steps, evaluated at 25%, 95% and their
    end) 0.05, below every median, yet they must finish: at 25% they are not judged yet, at 95% and at their end no
    longer; long trials (lr < 2e-3, 8 steps, evaluated at each) either stall at 0.1 − 100·lr from their first
    evaluation: each one is pruned at halfway if three finished trials scored there and their median is higher, and
    finishes while fewer than three had; or (those numbered by a multiple of 3) rise a little at every evaluation from
    below that, and always finish."""
    import statistics

    import deltatune.runner
    from deltatune.config.loader import config_to_dict

    stopped_at: dict[float, int] = {}

    def rises(number: int) -> bool:
        return number % 3 == 0

    def long_score(lr: float, step: int, number: int) -> float:
        return 0.1 - 100 * lr - (0.05 - 0.001 * step if rises(number) else 0)

    def fake_train(config, echo, on_evaluation):
        lr, number = config.train.lr, int(config.run_name.rpartition("trial")[2])
        if lr == 3e-3:
            steps, scores = 20, {step: 0.9 for step in range(1, 21)}
        elif lr < 2e-3:
            steps, scores = 8, {step: long_score(lr, step, number) for step in range(1, 9)}
        else:
            steps, scores = 20, {5: 0.05, 19: 0.05, 20: 0.05}
        run_dir = tmp_path / "runs" / config.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
        for step, score in scores.items():
            stopped_at[lr] = step
            on_evaluation(step, steps, {"accuracy": score})
        return {"run_dir": str(run_dir), "after": {"validation": {"accuracy": score}}}

    monkeypatch.setattr(deltatune.runner, "train", fake_train)
    assert main(["tune", *study_args(tmp_path), "--trials", "12"]) == 0
    trials = trials_of(tmp_path)
    assert trials[0]["state"] == "COMPLETE" and trials[0]["params"]["train.lr"] == 3e-3
    halfway = [0.9]  # finished trials' scores at 50% of their schedules: trial 0's, then long ones'
    pruned = spared = rising = 0
    for trial in trials[1:]:
        lr, score = trial["params"]["train.lr"], long_score(trial["params"]["train.lr"], 4, trial["number"])
        if lr >= 2e-3:  # short: never judged at 25% or from 90% on
            assert trial["state"] == "COMPLETE" and trial["last_percent"] == 100, trial
        elif rises(trial["number"]):  # below the median, but a new best at every evaluation
            assert trial["state"] == "COMPLETE" and trial["last_percent"] == 100, trial
            rising += len(halfway) >= 3 and score < statistics.median(halfway)
            halfway.append(score)
        elif len(halfway) >= 3 and score < statistics.median(halfway):
            assert trial["state"] == "PRUNED" and trial["last_percent"] == 50, trial
            assert stopped_at[lr] == 4  # step 4 of 8: halfway, not before
            pruned += 1
        else:
            assert trial["state"] == "COMPLETE" and trial["last_percent"] == 100, trial
            spared += len(halfway) < 3 and score < statistics.median(halfway)
            halfway.append(score)
    assert rising, "the seeded sampler should draw a rising trial below the median of three finished ones"
    assert pruned and spared, "the seeded sampler should draw long trials both before and after three finished ones"


def fake_trainer(root: Path, scores_of) -> tuple[list[str], object]:
    """A stand-in for `deltatune.runner.train` that writes a run directory and reports `scores_of(lr, number)`
    (step -> score over 8 steps), or raises what that returns when it is an exception; the names it trained."""
    from deltatune.config.loader import config_to_dict

    trained: list[str] = []

    def fake_train(config, echo, on_evaluation):
        number = int(config.run_name.rpartition("trial")[2])
        trained.append(config.run_name)
        scores = scores_of(config.train.lr, number)
        if isinstance(scores, BaseException):
            raise scores
        run_dir = root / "runs" / config.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
        for step, score in scores.items():
            on_evaluation(step, 8, {"accuracy": score})
        return {"run_dir": str(run_dir), "after": {"validation": {"accuracy": score}}}

    return trained, fake_train


def test_a_diverged_trial_counts_as_pruned_and_the_search_goes_on(tmp_path, monkeypatch, capsys) -> None:
    import deltatune.runner
    from deltatune.errors import TrainingDiverged

    def scores_of(lr: float, number: int):
        if number == 1:
            return TrainingDiverged(f"training diverged: the loss is nan at step 3; lower train.lr (now {lr:g})")
        return {8: 0.5 + lr}

    _, fake_train = fake_trainer(tmp_path, scores_of)
    monkeypatch.setattr(deltatune.runner, "train", fake_train)
    assert main(["tune", *study_args(tmp_path), "--trials", "3"]) == 0
    trials = trials_of(tmp_path)
    assert [t["state"] for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert "loss is nan" in trials[1]["diverged"]
    assert "trial 1: training diverged: the loss is nan at step 3; counted as pruned" in capsys.readouterr().out


def test_without_run_name_the_study_is_named_by_its_config_and_a_cut_off_recipe_runs_again(tmp_path,
                                                                                          monkeypatch) -> None:
    """A search without run_name continues under the same name; when a Ctrl-C cuts off trial 0 (the config's own
    settings), the next session runs them again before searching."""
    import deltatune.runner

    calls = {"count": 0}

    def scores_of(lr: float, number: int):
        calls["count"] += 1
        return KeyboardInterrupt() if calls["count"] == 1 else {8: 0.5}

    trained, fake_train = fake_trainer(tmp_path, scores_of)
    monkeypatch.setattr(deltatune.runner, "train", fake_train)
    args = [arg for arg in study_args(tmp_path) if not arg.startswith("run_name=")]
    try:
        main(["tune", *args, "--trials", "2"])
    except KeyboardInterrupt:
        pass
    assert main(["tune", *args, "--trials", "2"]) == 0
    trials = trials_of(tmp_path, "config")  # named by config.yaml
    assert [t["state"] for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0]["params"] == trials[1]["params"] == {"train.lr": 3e-3, "method.r": 4}
    assert trained == ["config-trial0", "config-trial1", "config-trial2"]


def test_a_study_continues_only_with_the_setup_it_started_with(tmp_path, monkeypatch, capsys) -> None:
    import deltatune.runner

    _, fake_train = fake_trainer(tmp_path, lambda lr, number: {8: 0.5})
    monkeypatch.setattr(deltatune.runner, "train", fake_train)
    args = study_args(tmp_path)
    assert main(["tune", *args, "--trials", "1"]) == 0
    assert_refused(["tune", *args, "train.epochs=2", "--trials", "2"],
                   r"tune-study holds a study of another setup \(train\.epochs: 1\.0 there, 2\.0 now\); set run_name",
                   capsys, tmp_path)
    assert main(["tune", *args, "train.progress=false", "--trials", "2"]) == 0  # a display setting is no new setup
    assert len(trials_of(tmp_path)) == 2


def test_a_partial_recipe_is_queued_once_across_resumed_sessions() -> None:
    """A config whose value lies outside the space (batch_size 8, choices 16/32) gives a recipe of the other keys
    only; once a trial ran it, a resumed study must not queue it again."""
    import optuna

    from deltatune.tune import queue_recipe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):  # three sessions of one trial each
        queue_recipe(study, {"train.batch_size": 16})
        study.optimize(lambda trial: trial.suggest_float("train.lr", 1e-5, 1e-3, log=True)
                       + trial.suggest_categorical("train.batch_size", [16, 32]), n_trials=1)
    assert sum(trial.system_attrs.get("fixed_params") is not None for trial in study.trials) == 1
