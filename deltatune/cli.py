"""`deltatune` command line: train, eval, methods.

Bad input exits with code 2 and one line on stderr saying what to fix; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from deltatune.errors import UserError


def _train(args: argparse.Namespace) -> None:
    from deltatune.config.loader import load_config
    from deltatune.runner import train

    train(load_config(args.config, args.overrides), resume=args.resume)


def _eval(args: argparse.Namespace) -> None:
    from deltatune.runs import evaluate_run

    evaluate_run(args.run_dir)


def _generate(args: argparse.Namespace) -> None:
    from deltatune.generate import generate_from_run

    generate_from_run(args.run_dir, args.prompt, compare=args.compare, max_new_tokens=args.max_new_tokens)


def _export(args: argparse.Namespace) -> None:
    from deltatune.export import export_run

    export_run(args.run_dir, args.out_dir)


def _methods(args: argparse.Namespace) -> None:
    from deltatune.methods import available_methods

    methods = available_methods()
    width = max(len(name) for name in methods)
    for name, method in methods.items():
        print(f"{name:<{width}}  {method.description}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Fine-tune pretrained models, one config away.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune as a YAML config says")
    train.add_argument("config", help="YAML config file (see examples/)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-5 method.name=bitfit")
    train.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="report the test metrics of a finished run")
    evaluate.add_argument("run_dir", help="the run directory printed by `deltatune train`")
    evaluate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    evaluate.set_defaults(handler=_eval)

    generate = commands.add_parser("generate", help="generate text with a finished causal-LM run")
    generate.add_argument("run_dir", help="the run directory printed by `deltatune train`")
    generate.add_argument("--prompt", action="append", required=True, help="a user message; repeat for several")
    generate.add_argument("--compare", action="store_true", help="also show the base model's answer")
    generate.add_argument("--max-new-tokens", type=int, default=48)
    generate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    generate.set_defaults(handler=_generate)

    export = commands.add_parser("export", help="save a finished run as a plain merged model (no deltatune needed)")
    export.add_argument("run_dir", help="the run directory printed by `deltatune train`")
    export.add_argument("out_dir", help="a new directory for the merged model")
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    export.set_defaults(handler=_export)

    methods = commands.add_parser("methods", help="list the registered fine-tuning methods")
    methods.set_defaults(handler=_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    # The embedded models and data are local; never let a library reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        handler(args)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
