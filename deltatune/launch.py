"""`deltatune train CONFIG --nproc N`: the run on N processes of this machine, launched exactly as
`torchrun --standalone --nproc-per-node N -m deltatune.cli train CONFIG ...` would launch it (torch's own launcher,
called in-process so that a failed rank becomes one line saying what to do, not torchrun's report).

Several machines: run torchrun yourself on each, e.g.
`torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id RUN -m deltatune.cli
train CONFIG run_name=NAME` (a fixed run_name, so every machine writes and resumes the same run; only global rank 0
writes, so the output directory must be on storage the machines share).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from pathlib import Path

from deltatune.errors import UserError

_AGENT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # what torchrun's agent takes over


def launch(config_path: str, overrides: list[str], processes: int, resume: bool, debug: bool = False) -> None:
    """Train on `processes` local ranks. The run directory is chosen here (a name the ranks share, the checks of
    `find_run_dir` made once before any process starts), and a rank that dies takes the job down with a
    UserError naming the rank, how it ended and the checkpoint `--resume` continues from."""
    from deltatune.config.loader import load_config
    from deltatune.distributed import launched_world_size
    from deltatune.runner import find_run_dir
    from deltatune.runs import with_run_as_model

    if launched_world_size() > 1:
        raise UserError("--nproc starts its own processes; under torchrun leave it out (torchrun's "
                        "--nproc-per-node says how many)")
    if processes < 1:
        raise UserError(f"--nproc must be at least 1, got {processes}")
    config = with_run_as_model(load_config(config_path, overrides))
    run_dir = find_run_dir(config, resume)
    arguments = ["train", config_path, *overrides, f"run_name={run_dir.path.name}",
                 f"output_dir={run_dir.path.parent}", *(["--resume"] if resume else []),
                 *(["--debug"] if debug else [])]
    failures = _torchrun(processes, arguments)
    if isinstance(failures, int):
        raise UserError(_stopped_line(f"this launcher received {_signal_name(failures)}, which stopped every rank",
                                      run_dir.path))
    if failures and all(code == 2 for code in failures.values()):
        raise SystemExit(2)  # each rank refused bad input and printed its one line: nothing to add
    if failures:
        rank, code = next(iter(failures.items()))
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        raise UserError(_stopped_line(f"rank {rank} of {processes} {how}", run_dir.path))


def _torchrun(processes: int, arguments: list[str]) -> dict[int, int] | int:
    """torchrun --standalone over `python -m deltatune.cli ARGUMENTS`; {} when every rank succeeded, else the
    failed ranks' exit codes (negative: the signal that ended it), the first rank to fail first, or the number of
    a signal other than SIGINT that this process received (the agent then stopped the ranks)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(["--standalone", f"--nproc-per-node={processes}", "-m", "deltatune.cli", *arguments])
    # What torchrun's `run` does for --standalone: a rendezvous on a free local port, a fresh run id.
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    # torchrun would give each process 1 thread (and say so at length); each gets its share of the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    launch_config, command, command_arguments = config_from_args(args)
    elastic_logger = logging.getLogger("torch.distributed.elastic")
    level = elastic_logger.level
    elastic_logger.setLevel(logging.CRITICAL)  # the ranks' own lines and ours say it; torchrun's report repeats
    # torchrun's agent installs its own SIGINT/SIGTERM/SIGHUP/SIGQUIT handlers in this process and leaves them there;
    # put the caller's back afterwards, so a later Ctrl-C in the same process is a KeyboardInterrupt again.
    saved = {number: signal.getsignal(number) for number in _AGENT_SIGNALS}
    try:
        elastic_launch(launch_config, command)(*command_arguments)
    except ChildFailedError as error:
        # The others fail *because* the first one did (their collectives lose a peer): name the first.
        first, _ = error.get_first_failure()
        ordered = sorted(error.failures.items(), key=lambda item: (item[0] != first, item[0]))
        return {rank: failure.exitcode for rank, failure in ordered}
    except SignalException as error:
        # The agent turns the signals it took over into this exception once it has stopped the ranks.
        if error.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None  # Ctrl-C: exit 130 and "continue with --resume", as in one process
        return int(error.sigval)
    finally:
        elastic_logger.setLevel(level)
        if threading.current_thread() is threading.main_thread():
            for number, handler in saved.items():
                signal.signal(number, handler if handler is not None else signal.SIG_DFL)
    return {}


def _stopped_line(what: str, run_path: Path) -> str:
    """`what` stopped the run, and where it can continue from."""
    from deltatune.training.checkpoint import step_checkpoints

    found = step_checkpoints(run_path / "checkpoints")
    if not found:
        return (f"{what}, which stopped the run before its first checkpoint; fix what the ranks printed above, if "
                "anything, and run the same command again")
    step, _ = found[-1]
    return (f"{what}, which stopped the run; its last complete checkpoint is step {step} in {run_path}: add --resume "
            "to the same command to continue from there")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
