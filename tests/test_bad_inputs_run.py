"""The bad-input catalogue, part A: config values, the command line, --resume, training and output directories.

Each case: exit code 2, one `error:` line naming the fix, no traceback, and every file that existed before the
command unchanged (tests/bad_input.py). Cases that need a finished run copy one trained once for this module.
"""

import errno
import json
import shutil

import pytest
import torch

from deltatune.cli import main
from deltatune.errors import UserError
from tests.bad_input import TINY_BERT, assert_refused, config_file, make_workspace

RUN = TINY_BERT + "data: {name: good.jsonl}\ntrain: {max_steps: 3, batch_size: 4, progress: false, num_threads: 1}\n"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_workspace(tmp_path)
    config_file(tmp_path, RUN)
    return tmp_path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A workspace where `runs/done` trained its 3 steps to the end."""
    import os

    root = tmp_path_factory.mktemp("finished")
    make_workspace(root)
    config_file(root, RUN)
    here = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "config.yaml", "run_name=done"]) == 0
    finally:
        os.chdir(here)
    return root / "runs" / "done"


@pytest.fixture
def done(workspace, finished_run):
    """A copy of the finished run inside this test's workspace, as runs/done."""
    shutil.copytree(finished_run, workspace / "runs" / "done")
    return workspace / "runs" / "done"


# name: (overrides after `train config.yaml`, the error line's pattern)
CONFIG_CASES = {
    "misspelt dtype": (["train.dtype=fp61"], r"unknown train\.dtype 'fp61' \(did you mean 'fp16'\?\); valid: auto, "
                                             r"fp32, bf16, fp16$"),
    "misspelt schedule": (["train.schedule=cosin"], r"unknown train\.schedule 'cosin' \(did you mean 'cosine'\?\); "
                                                    r"valid: linear, cosine, constant$"),
    "misspelt device": (["train.device=gpu"], r"unknown train\.device 'gpu'; valid: auto, cpu, cuda, cuda:N, mps$"),
    "misspelt metric": (["train.metric=acuracy"], r"unknown train\.metric 'acuracy' \(did you mean 'accuracy'\?\); "
                                                  r"the classification objective reports: auto, loss, accuracy$"),
    "zero batch_size": (["train.batch_size=0"], r"train\.batch_size must be at least 1, got 0; write e\.g\. "
                                                r"train\.batch_size=32$"),
    "zero eval_batch_size": (["train.eval_batch_size=0"], r"train\.eval_batch_size must be at least 1, got 0"),
    "zero gradient_accumulation": (["train.gradient_accumulation=0"], r"train\.gradient_accumulation must be at "
                                                                      r"least 1, got 0"),
    "zero log_every": (["train.log_every=0"], r"train\.log_every must be at least 1, got 0"),
    "zero epochs": (["train.max_steps=null", "train.epochs=0"], r"train\.epochs must be above 0, got 0"),
    "zero max_steps": (["train.max_steps=0"], r"train\.max_steps must be at least 1, got 0$"),
    "negative lr": (["train.lr=-1e-3"], r"train\.lr must be above 0, got -0\.001; write e\.g\. train\.lr=5e-05$"),
    "nan lr": (["train.lr=nan"], r"train\.lr must be a finite number, got nan"),
    "infinite max_grad_norm": (["train.max_grad_norm=.inf"], r"train\.max_grad_norm must be a finite number"),
    "negative warmup_ratio": (["train.warmup_ratio=-0.1"], r"train\.warmup_ratio must be in \[0, 1\], got -0\.1"),
    "adam beta of 1": (["train.adam_betas=[0.9,1]"], r"train\.adam_betas\[1\] must be in \[0, 1\), got 1"),
    "split fraction above 1": (["data.split.validation=1.5"], r"data\.split\.validation must be in \[0, 1\), got 1\.5"),
    "negative split seed": (["data.split.seed=-1"], r"data\.split\.seed must be in \[0, 4294967295\], got -1"),
    "zero max_length": (["data.max_length=0"], r"data\.max_length must be at least 1, got 0"),
    "zero max_examples": (["data.max_examples=0"], r"data\.max_examples must be at least 1, got 0"),
    "zero num_labels": (["model.num_labels=0"], r"model\.num_labels must be at least 1, got 0"),
    "override without =": (["train.lr"], r"override 'train\.lr' is not key=value; write e\.g\. train\.lr=3e-5"),
    "misspelt flag": (["--resum"], r"unrecognized arguments: --resum; see `deltatune train --help`$"),
    "output_dir is a file": (["output_dir=good.jsonl"], r"good\.jsonl is a file, not a directory; set output_dir"),
    "output_dir inside a file": (["output_dir=good.jsonl/runs"], r"good\.jsonl is a file, not a directory"),
    "resume a missing run": (["run_name=earlir", "--resume"], r"--resume found no run in runs/earlir \(it has no "
                                                              r"config\.yaml\) \(did you mean run_name=earlier\?\)"),
    "resume with no earlier run": (["--resume"], r"--resume found no earlier run of this config under runs; set "
                                                 r"run_name"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_and_command_line_mistakes(case, workspace, capsys):
    overrides, message = CONFIG_CASES[case]
    assert_refused(["train", "config.yaml", *overrides], message, capsys, workspace)
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == ["earlier"], "a run directory was left behind"


def test_binary_config_file(workspace, capsys):
    (workspace / "model.bin").write_bytes(bytes(range(256)) * 4)
    assert_refused(["train", "model.bin"], r"model\.bin is not a text file \(byte 128 is not UTF-8\); give a YAML "
                                           r"config file$", capsys, workspace)


def test_cuda_on_a_machine_without_cuda(workspace, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_refused(["train", "config.yaml", "train.device=cuda"], r"train\.device=cuda but torch finds no CUDA GPU on "
                   r"this machine; set train\.device=auto or cpu$", capsys, workspace)


def test_cuda_index_beyond_the_gpus_there_are(workspace, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_refused(["train", "config.yaml", "train.device=cuda:7"], r"train\.device=cuda:7 but this machine has 1 "
                   r"CUDA GPU\(s\), cuda:0 to cuda:0; pick one of those$", capsys, workspace)


def test_one_cuda_index_for_every_rank_is_refused():
    from unittest import mock

    from deltatune import distributed
    from deltatune.training.device import resolve_device

    with mock.patch.object(distributed, "launched_world_size", lambda: 2), pytest.raises(
            UserError, match=r"train\.device=cuda:1 would put every rank on one GPU; with several processes set "
                             r"train\.device=cuda"):
        resolve_device("cuda:1")


def test_read_only_output_dir(workspace, capsys, monkeypatch):
    # Root writes through chmod 555, so the refusal comes from the probe file the check creates.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert_refused(["train", "config.yaml"], r"cannot write in .*runs \(Permission denied\); make it writable or set "
                   r"output_dir to a writable directory$", capsys, workspace)


def test_read_only_output_dir_for_real(workspace, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    (workspace / "runs").chmod(0o555)
    try:
        assert_refused(["train", "config.yaml"], r"cannot write in .*runs \(Permission denied\)", capsys, workspace)
    finally:
        (workspace / "runs").chmod(0o755)


def test_disk_too_full_for_one_checkpoint(workspace, capsys, monkeypatch):
    import collections

    import deltatune.training.preflight as preflight

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**5, 10**5))
    assert_refused(["train", "config.yaml"], r"runs has 0\.1 MiB free but one checkpoint of this run needs about "
                   r"[\d.]+ MiB; free space there or set output_dir to a bigger disk$", capsys, workspace)
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == ["earlier"]


def test_divergence_stops_at_the_first_non_finite_loss(workspace, capsys):
    err = assert_refused(["train", "config.yaml", "run_name=wild", "train.lr=1e30", "train.max_grad_norm=null",
                          "train.save_every=1", "train.log_every=1"],
                         r"training diverged: the loss is nan at step 2; lower train\.lr \(now 1e\+30\) or set "
                         r"train\.max_grad_norm \(e\.g\. 1\.0\) and run again$", capsys, workspace)
    run = workspace / "runs" / "wild"
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000001"], err  # the last finite checkpoint is kept
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(checkpoints[0] / "model.safetensors").values())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))
    assert not (run / "weights").exists() and not (run / "best").exists() and not (run / "summary.json").exists()


def test_disk_full_during_a_checkpoint(workspace, capsys, monkeypatch):
    import deltatune.training.checkpoint as checkpoint

    real_save = checkpoint.save_file

    def fill_disk_at_step_2(tensors, path, metadata=None):
        if "step-00000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", fill_disk_at_step_2)
    argv = ["train", "config.yaml", "run_name=full", "train.save_every=1"]
    assert_refused(argv, r"cannot write runs/full/checkpoints/\.step-00000002\.tmp/model\.safetensors \(No space left "
                   r"on device\); free space on that disk, then run again$", capsys, workspace)
    checkpoints = workspace / "runs" / "full" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000001"], "the partial copy must be gone"
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0  # space freed: the run continues from its intact checkpoint
    assert "resumed from step 1 of 3" in capsys.readouterr().out


# name: (how to damage the finished run, the command after `train config.yaml run_name=done`, the error pattern)
DAMAGED = {
    "step state.json": ("checkpoints/step-00000003/state.json", ["--resume", "train.max_steps=5"],
                        r"runs/done/checkpoints/step-00000003/state\.json is damaged \(not valid JSON: .*\); delete "
                        r"runs/done/checkpoints/step-00000003 to resume from the checkpoint before it$"),
    "step safetensors": ("checkpoints/step-00000003/model.safetensors", ["--resume", "train.max_steps=5"],
                         r"runs/done/checkpoints/step-00000003/model\.safetensors is damaged \(.*\); delete "
                         r"runs/done/checkpoints/step-00000003 \(or restore it from a backup\) and run again$"),
    "splits.json": ("splits.json", ["--resume", "train.max_steps=5"], r"runs/done/splits\.json is damaged"),
    "saved config.yaml": ("config.yaml", ["--resume"], r"runs/done/config\.yaml is not a text file"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_run_files_on_resume(case, done, capsys):
    name, extra, message = DAMAGED[case]
    target = done / name
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2] + b"\xff")
    assert_refused(["train", "config.yaml", "run_name=done", *extra], message, capsys, done.parent.parent)


@pytest.mark.parametrize("name", ["state.json", "model.safetensors"])
def test_damaged_final_weights_on_eval(name, done, capsys):
    target = done / "weights" / name
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    assert_refused(["eval", "runs/done"], rf"runs/done/weights/{name.replace('.', '[.]')} is damaged", capsys, done)


RESUME_CASES = {
    "finished run": ([], r"runs/done already finished its 3 steps; to train further, resume with a larger budget, "
                         r"e\.g\. train\.max_steps=6$"),
    "fewer steps than taken": (["train.max_steps=2"], r"runs/done already took 3 steps but the config given now asks "
                                                      r"for 2 in all; resume with train\.max_steps=3 or more"),
    "changed lr": (["train.lr=0.1"], r"--resume continues runs/done as it was configured, but train\.lr changed "
                                     r"\(5e-05 -> 0\.1\); on resume only train\.max_steps, train\.epochs, "
                                     r"train\.progress, train\.num_threads, train\.device, train\.distributed "
                                     r"may change"),
    "changed method": (["method.name=bitfit"], r"but method\.name changed \('full' -> 'bitfit'\)"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_refusals(case, done, capsys):
    overrides, message = RESUME_CASES[case]
    assert_refused(["train", "config.yaml", "run_name=done", "--resume", *overrides], message, capsys,
                   done.parent.parent)


def test_a_failed_start_leaves_nothing_so_the_corrected_rerun_works(workspace, capsys):
    """The resume trap: a run that fails before its first checkpoint must not block the corrected command."""
    assert_refused(["train", "config.yaml", "run_name=again", "train.lr=1e30", "train.max_grad_norm=null"],
                   r"training diverged", capsys, workspace)
    assert not (workspace / "runs" / "again").exists()
    assert main(["train", "config.yaml", "run_name=again"]) == 0
    summary = json.loads((workspace / "runs" / "again" / "summary.json").read_text())
    assert summary["steps"] == 3


def test_nothing_is_built_before_a_config_time_refusal(workspace, capsys, monkeypatch):
    import deltatune.runner as runner

    monkeypatch.setattr(runner, "prepare", lambda *a, **k: pytest.fail("prepare ran before the metric was checked"))
    assert_refused(["train", "config.yaml", "train.metric=f1"], r"unknown train\.metric 'f1'", capsys, workspace)


def test_cli_overrides_and_flags_mix_in_any_order(done, capsys):
    code = main(["train", "config.yaml", "train.progress=true", "--resume", "run_name=done", "train.max_steps=4",
                 "train.progress=false"])
    assert code == 0, capsys.readouterr().err
    assert "resumed from step 3 of 4" in capsys.readouterr().out


def test_a_run_started_at_the_same_moment_keeps_its_directory(workspace, capsys, monkeypatch):
    """Two runs that chose the same directory: the one that writes config.yaml second refuses and deletes nothing."""
    import deltatune.runner as runner

    real_metrics_before = runner._metrics_before
    winner = workspace / "runs" / "raced"

    def other_run_claims_first(*args, **kwargs):
        winner.mkdir(parents=True, exist_ok=True)
        (winner / "config.yaml").write_text("model: {name: the-other-run}\n")
        (winner / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
        return real_metrics_before(*args, **kwargs)

    monkeypatch.setattr(runner, "_metrics_before", other_run_claims_first)
    assert_refused(["train", "config.yaml", "run_name=raced"], r"another run started in .*raced at the same time",
                   capsys, workspace / "runs" / "earlier")
    assert (winner / "config.yaml").read_text() == "model: {name: the-other-run}\n"
    assert sorted(path.name for path in winner.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_automatic_names_of_the_same_second_are_numbered(tmp_path, monkeypatch):
    import deltatune.runner as runner
    from deltatune.config.loader import load_config

    monkeypatch.setattr(runner.time, "strftime", lambda _: "20261201-120000")
    config = load_config(None, [f"output_dir={tmp_path}", "method.name=lora"])
    first = runner.find_run_dir(config, resume=False).path
    assert first.name == "minilm-l6-lora-20261201-120000"
    first.mkdir()
    assert runner.find_run_dir(config, resume=False).path.name == "minilm-l6-lora-20261201-120000-2"
    (tmp_path / "minilm-l6-lora-20261201-120000-2").mkdir()
    assert runner.find_run_dir(config, resume=False).path.name == "minilm-l6-lora-20261201-120000-3"


def test_run_commands_refuse_unusable_arguments(done, capsys):
    assert_refused(["export", "runs/done", "good.jsonl"], r"good\.jsonl is a file; choose a new output directory",
                   capsys, done.parent.parent)
    assert_refused(["generate", "runs/done", "--prompt", "hi", "--max-new-tokens", "0"],
                   r"--max-new-tokens must be at least 1, got 0$", capsys, done.parent.parent)


def test_meta_train_takes_overrides_after_its_flags(workspace, capsys):
    """Overrides after --resume reach meta-train as they reach train (its objective check answers, not argparse)."""
    assert_refused(["meta-train", "config.yaml", "--resume", "train.max_steps=4"], r"meta-train needs objective\.name: "
                   r"meta_learning", capsys, workspace)


def test_a_new_run_claims_its_directory_where_hard_links_are_refused(workspace, capsys, monkeypatch):
    """FAT and some network mounts refuse hard links (EPERM / EOPNOTSUPP): the claim falls back to an exclusive
    create and the run trains as anywhere else."""
    import errno as errors
    import os

    def no_links(*_):
        raise OSError(errors.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "link", no_links)
    assert main(["train", "config.yaml", "run_name=on-fat"]) == 0, capsys.readouterr().err
    assert (workspace / "runs" / "on-fat" / "config.yaml").read_text().startswith("model:")
