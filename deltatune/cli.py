"""`deltatune` command line: train, eval, generate, export, report, tune, advise, meta-train, meta-eval, methods,
objectives, tasks.

Bad input exits with code 2 and one line on stderr saying what to fix; `--debug` shows the traceback instead.
That holds for the command line itself too: a usage mistake is one `error:` line, not argparse's usage block.
Flags may stand anywhere on a `train` line: `deltatune train cfg.yaml train.lr=1e-4 --resume train.max_steps=400`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

from deltatune.errors import UserError


def _train(args: argparse.Namespace) -> None:
    from deltatune.config.loader import load_config
    from deltatune.runner import train

    if args.nproc is not None:
        from deltatune.launch import launch

        launch(args.config, args.overrides, args.nproc, args.resume, debug=args.debug)
        return
    train(load_config(args.config, args.overrides), resume=args.resume)


def _meta_train(args: argparse.Namespace) -> None:
    from deltatune.config.loader import load_config
    from deltatune.meta_eval import require_meta_learning
    from deltatune.runner import train

    config = load_config(args.config, args.overrides)
    require_meta_learning(config, f"meta-train needs objective.name: meta_learning in {args.config} (with its ways, "
                                  f"shots, meta_test_classes, ...), not {config.objective.name!r}")
    train(config, resume=args.resume)


def _meta_eval(args: argparse.Namespace) -> None:
    from deltatune.meta_eval import meta_evaluate

    meta_evaluate(args.run_dir, args.episodes, args.queries)


def _eval(args: argparse.Namespace) -> None:
    from deltatune.runs import evaluate_run

    evaluate_run(args.run_dir)


def _generate(args: argparse.Namespace) -> None:
    from deltatune.generate import generate_from_run

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    generate_from_run(args.run_dir, args.prompt, compare=args.compare, max_new_tokens=args.max_new_tokens)


def _export(args: argparse.Namespace) -> None:
    from deltatune.export import export_run

    export_run(args.run_dir, args.out_dir)


def _report(args: argparse.Namespace) -> None:
    from deltatune.insight.report import ReportOptions, write_report

    columns = {}
    for pair in args.forgetting_columns:
        role, _, column = pair.partition("=")
        if not role or not column:
            raise UserError(f"--forgetting-columns takes role=column pairs, e.g. text=prompt label=category; got "
                            f"{pair!r}")
        columns[role] = column
    write_report(args.run_dir, ReportOptions(base=args.base, forgetting=args.forgetting, forgetting_columns=columns,
                                             out=args.out, examples=args.examples))


def _tune(args: argparse.Namespace) -> None:
    from deltatune.tune import run_study

    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    run_study(args.config, args.overrides, args.trials, args.space, args.timeout)


def _advise(args: argparse.Namespace) -> None:
    from deltatune.advise import advise

    advise(args.config, args.overrides, args.memory, args.time)


def _methods(args: argparse.Namespace) -> None:
    from deltatune.methods import available_methods

    methods = available_methods()
    width = max(len(name) for name in methods)
    for name, method in methods.items():
        print(f"{name:<{width}}  {method.description}")


def _tasks(args: argparse.Namespace) -> None:
    from deltatune.tasks import available_tasks

    tasks = available_tasks()
    width = max(len(name) for name in tasks)
    for name, task in tasks.items():
        roles = ", ".join(role if column else f"[{role}]" for role, column in task.roles.items())
        print(f"{name:<{width}}  {task.description}; data roles: {roles}; objective: {task.default_objective}")


def _objectives(args: argparse.Namespace) -> None:
    import dataclasses

    from deltatune.objectives import available_objectives

    objectives = available_objectives()
    width = max(len(name) for name in objectives)
    for name, objective in objectives.items():
        defaults = objective.config_class()
        fields = [f"{item.name}={getattr(defaults, item.name)!r}" for item in dataclasses.fields(defaults)
                  if item.name != "name"]
        models = [f"{role} (objective.{spec.config_key(role)}, default {spec.default or 'required'})"
                  for role, spec in objective.models.items()]
        summary = objective.description or next(iter((objective.__doc__ or "").strip().splitlines()), "")
        line = f"{name:<{width}}  {summary}"
        line += f"; reads: {objective.task} rows" if objective.task else ""
        line += f"; options: {', '.join(fields) or 'none'}"
        line += f"; main metric: {objective.main_metric} ({'higher' if objective.greater_is_better else 'lower'} is better)"
        print(line + (f"; models: {', '.join(models)}" if models else ""))


class _OneLineParser(argparse.ArgumentParser):
    """argparse, except that a usage mistake raises a UserError (one line, exit 2) instead of printing usage, and a
    flag must be spelt out (`--resum` is a typo, not `--resume`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="deltatune", description="Fine-tune pretrained models, one config away.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(commands)
    _add_run_commands(commands)
    _add_strategy_commands(commands)
    for name, handler, help_text in (
            ("methods", _methods, "list the registered fine-tuning methods"),
            ("objectives", _objectives, "list the registered objectives with their options"),
            ("tasks", _tasks, "list the registered tasks with their data roles ([optional])")):
        commands.add_parser(name, help=help_text).set_defaults(handler=handler)
    return parser


def _command(commands: Any, name: str, handler: Callable[[argparse.Namespace], int],
             help_text: str) -> argparse.ArgumentParser:
    """A subcommand that also accepts `--debug` after its name (the top-level flag keeps its value otherwise)."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    command.set_defaults(handler=handler)
    return command


def _config_arguments(command: argparse.ArgumentParser, config_help: str = "YAML config file (see examples/)") -> None:
    command.add_argument("config", help=config_help)
    command.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides, e.g. train.lr=3e-5 "
                         "method.name=bitfit")


def _add_training_commands(commands: Any) -> None:
    train = _command(commands, "train", _train, "fine-tune as a YAML config says")
    _config_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    train.add_argument("--nproc", type=int, help="train on N processes of this machine (torchrun --standalone; "
                       "gloo on CPU, NCCL with one GPU per process); train.batch_size stays the global batch")

    meta_train = _command(commands, "meta-train", _meta_train, "meta-learn a start that adapts fast (objective "
                          "meta_learning: Reptile or first-order MAML over N-way K-shot episodes)")
    _config_arguments(meta_train, "YAML config file with objective.name: meta_learning")
    meta_train.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")

    meta_eval = _command(commands, "meta-eval", _meta_eval, "episode accuracy on unseen classes: the meta-learned "
                         "start against the pretrained one, with 95%% confidence intervals")
    meta_eval.add_argument("run_dir", help="a run directory of `deltatune meta-train`")
    meta_eval.add_argument("--episodes", type=int, default=100, help="episodes to draw from the meta-test classes")
    meta_eval.add_argument("--queries", default=None,
                           help="query examples per class in each episode: a number (at most: a class with fewer "
                                "gives all it has beyond the shots) or 'all'; default: the run's objective.queries")


def _add_run_commands(commands: Any) -> None:
    run_dir_help = "the run directory printed by `deltatune train`"
    _command(commands, "eval", _eval, "report the test metrics of a finished run").add_argument(
        "run_dir", help=run_dir_help)

    generate = _command(commands, "generate", _generate, "generate text with a finished causal-LM run")
    generate.add_argument("run_dir", help=run_dir_help)
    generate.add_argument("--prompt", action="append", required=True, help="a user message; repeat for several")
    generate.add_argument("--compare", action="store_true", help="also show the base model's answer")
    generate.add_argument("--max-new-tokens", type=int, default=48)

    export = _command(commands, "export", _export, "save a finished run as a plain merged model (no deltatune needed)")
    export.add_argument("run_dir", help=run_dir_help)
    export.add_argument("out_dir", help="a new directory for the merged model")

    report = _command(commands, "report", _report, "what a finished run changed: weights, representations (CKA), "
                      "errors or samples, forgetting; an offline HTML page in RUN_DIR/report")
    report.add_argument("run_dir", help=run_dir_help)
    report.add_argument("--base", help="compare with this model instead of the run's own pretrained model")
    report.add_argument("--forgetting", metavar="DATA", help="a second dataset (alias or file) the run did not "
                        "train on: the base and tuned models are measured on it")
    report.add_argument("--forgetting-columns", nargs="+", default=[], metavar="ROLE=COLUMN",
                        help="the second dataset's columns for the task's roles, e.g. text=prompt label=category")
    report.add_argument("--out", type=Path, help="where to write the report (default RUN_DIR/report)")
    report.add_argument("--examples", type=int, default=256, help="validation rows whose representations are "
                        "compared (default 256)")


def _add_strategy_commands(commands: Any) -> None:
    tune = _command(commands, "tune", _tune, "search hyperparameters with optuna; every trial is a run directory")
    _config_arguments(tune)
    tune.add_argument("--trials", type=int, required=True, help="finished trials wanted in the study, in all")
    tune.add_argument("--space", help="YAML search space: config path -> {type, low, high, log, choices}")
    tune.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")

    advise = _command(commands, "advise", _advise, "measure a few real steps of each method here and rank them by "
                      "predicted time, memory and expected quality")
    _config_arguments(advise)
    advise.add_argument("--memory", help="memory budget, e.g. 8GB")
    advise.add_argument("--time", help="time budget for the whole run, e.g. 1h or 30m")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line. `key=value` words after a flag are train overrides too (argparse alone would stop
    collecting the positional overrides at the first flag and reject the rest)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [word for word in extra if "=" in word and not word.startswith("-")]
    takes_overrides = args.command in ("train", "meta-train", "tune", "advise")
    if extra and (not takes_overrides or len(overrides) != len(extra)):
        unknown = [word for word in extra if not takes_overrides or word not in overrides]
        raise UserError(f"unrecognized arguments: {' '.join(unknown)}; see `deltatune {args.command} --help`")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def _ctrl_c_interrupts() -> None:
    """Make Ctrl-C raise KeyboardInterrupt (exit 130, a resumable run) even when something earlier in this process
    installed its own SIGINT handler or blocked the signal (the full test suite twice swallowed a Ctrl-C in a
    training run; a later run logging every test's SIGINT disposition found none changing it, so the cause is not
    known). The command line owns its process; `deltatune.train` called from Python leaves the caller's handlers
    alone."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    # The embedded models and data are local; never let a library reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        args = parse_arguments(argv)
        handler: Callable[[argparse.Namespace], None] = args.handler
        _ctrl_c_interrupts()
        handler(args)
    except UserError as error:
        if debug:
            traceback.print_exc()
        rank = os.environ.get("RANK", "0")  # under torchrun every rank reports; rank 0's line reads as usual
        print(f"error: {'' if rank == '0' else f'rank {rank}: '}{error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = args.command in ("train", "meta-train", "tune") if "args" in locals() else False
        print("interrupted; continue with --resume" if resumable else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`deltatune objectives | head -1`): stop quietly, as Unix tools do. Python would
        # flush stdout again at exit and print a second error, so it is pointed at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
