"""Distillation into students cut from the teacher's own blocks, against the same students trained without a
teacher (issue 13).

    python benchmarks/distill.py train minilm     # teacher, then the students at each learning rate (runs/distill-*)
    python benchmarks/distill.py train minilm cross-fitted   # only the named kinds of student (and their teachers)
    python benchmarks/distill.py table minilm     # parameters, inference tok/s and quality of the three models

Settings:
- minilm: all-MiniLM-L6-v2 on Rotten Tomatoes (examples/minilm_rotten_tomatoes.yaml). Teacher: the full fine-tuning
  recipe of the methods table (3 epochs, lr 1e-4). Students: blocks 0, 2, 4 of the pretrained model (DistilBERT's
  initialisation), 3 epochs; distilled with α = 0.5 on the teacher's soft labels at T = 2 (its logits cached on
  disk once, examples/distill/minilm_student.yaml), or trained on the labels alone. Scored by accuracy.
  The cross-fitted student is distilled the same way, but each training row's soft labels come from one of five
  fold teachers (the teacher's recipe with one fifth of the train split held out, data.split.held_out_fold), the
  one that never trained on it (objective.teacher_folds); validation and test rows keep the teacher's.
- smollm2: SmolLM2-135M-Instruct on chatterbot (examples/smollm2_chatterbot_lora.yaml). Teacher: that LoRA SFT run.
  Students: every other block (15 of 30) of the pretrained model, full fine-tuning; distilled token by
  token on the responses (forward KL at T = 1, α = 0.5 with the SFT loss), or plain SFT; 1 epoch, as the teacher's.
  Scored by perplexity.

Both students of a setting start from the same weights and train for the same steps; each one's learning rate is
chosen on the validation metric from the setting's list, and the test column only reports. Inference speed: the
test split in batches of 32, forward passes only, the three models in alternating rounds in one process (median of
ROUNDS), real (non-padding) tokens.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

from _runs import RUNS, read_json, run_training

ROUNDS = 5


@dataclass(frozen=True)
class Setting:
    config: str
    teacher: list[str]
    student: list[str]
    distilled: list[str]
    learning_rates: tuple[str, ...]
    metric: str
    higher_is_better: bool
    folds: int = 0  # > 0: also a cross-fitted student, taught by this many fold teachers


SETTINGS = {
    "minilm": Setting(
        "examples/minilm_rotten_tomatoes.yaml", ["method.name=full", "train.epochs=3", "train.lr=1e-4"],
        ["method.name=full", "model.student.keep_layers=[0,2,4]", "train.epochs=3"],
        ["objective.temperature=2", "objective.alpha=0.5", "objective.precompute_teacher=true"],
        ("1e-4", "2e-4"), "accuracy", True, folds=5),
    "smollm2": Setting(
        "examples/smollm2_chatterbot_lora.yaml", [],
        ["method={name: full}", "model.student.every_other=true", "train.epochs=1", "train.eval_every=38"],
        ["objective.temperature=1", "objective.alpha=0.5", "objective.divergence=forward_kl"],
        ("3e-4",), "perplexity", False),  # one rate for both students: the goal compares them, not rates
}


def kinds(key: str) -> dict[str, list[str]]:
    setting = SETTINGS[key]
    alone = "objective.name=classification" if setting.metric == "accuracy" else "objective.name=sft"
    teacher = f"objective.teacher_model={RUNS / f'distill-{key}-teacher'}"
    found = {"alone": [alone], "distilled": ["objective.name=distill", teacher, *setting.distilled]}
    if setting.folds:
        folds = ", ".join(str(RUNS / f"distill-{key}-fold{k}") for k in range(setting.folds))
        found["cross-fitted"] = [*found["distilled"], f"objective.teacher_folds=[{folds}]"]
    return found


def train(key: str, only: list[str]) -> None:
    setting = SETTINGS[key]
    unknown = set(only) - set(kinds(key))
    if unknown:
        sys.exit(f"unknown kind {sorted(unknown)[0]!r} of {key} student; choose from {', '.join(kinds(key))}")
    run_training(setting.config, f"distill-{key}-teacher", setting.teacher)
    wanted = {kind: overrides for kind, overrides in kinds(key).items() if not only or kind in only}
    if "cross-fitted" in wanted:
        for k in range(setting.folds):
            run_training(setting.config, f"distill-{key}-fold{k}",
                         [*setting.teacher, f"data.split.folds={setting.folds}", f"data.split.held_out_fold={k}"])
    for lr in setting.learning_rates:
        for kind, overrides in wanted.items():
            run_training(setting.config, f"distill-{key}-{kind}-lr{lr}", [*setting.student, *overrides,
                                                                           f"train.lr={lr}"])


def chosen(key: str, kind: str) -> tuple[str, dict] | None:
    """The run of `kind` with the best validation metric, and its summary; None when none has finished."""
    setting = SETTINGS[key]
    found = {lr: read_json(RUNS / f"distill-{key}-{kind}-lr{lr}" / "summary.json") for lr in setting.learning_rates}
    found = {lr: summary for lr, summary in found.items() if summary}
    if not found:
        return None
    pick = max if setting.higher_is_better else min
    best = pick(found, key=lambda lr: found[lr]["after"]["validation"][setting.metric])
    return f"distill-{key}-{kind}-lr{best}", found[best]


def inference_speed(run_names: list[str]) -> dict[str, float]:
    """Median tokens/s of forward passes over the test split, the runs in alternating rounds."""
    import torch

    from deltatune.runs import load_run
    from deltatune.training.loop import Batches

    runs = {name: load_run(RUNS / name, with_data=True) for name in run_names}
    timings: dict[str, list[float]] = {name: [] for name in run_names}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            batches = list(Batches(run.data.test, run.data.collate).in_order(32))
            tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
            started = time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    run.model(**{key: value for key, value in batch.items() if key != "labels"})
            timings[name].append(tokens / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in timings.items()}


def table(key: str) -> None:
    setting = SETTINGS[key]
    teacher = read_json(RUNS / f"distill-{key}-teacher" / "summary.json")
    rows = [("teacher", f"distill-{key}-teacher", teacher)]
    labels = {"alone": "student without a teacher", "distilled": "student, distilled",
              "cross-fitted": "student, distilled from fold teachers"}
    for kind in kinds(key):
        found = chosen(key, kind)
        if found is None:
            print(f"(no finished {kind} student of {key} under {RUNS}: `python {__file__} train {key} {kind}`)")
            continue
        rows.append((f"{labels[kind]} (lr {found[0].rpartition('lr')[2]})", *found))
    speeds = inference_speed([name for _, name, _ in rows])
    metric, reference = setting.metric, teacher["after"]["test"][setting.metric]
    print(f"| model | parameters | inference tok/s | validation {metric} | test {metric} | of the teacher's |")
    print("|---|---|---|---|---|---|")
    for label, name, summary in rows:
        after = summary["after"]
        print(f"| {label} | {summary['total_parameters']:,} | {speeds[name]:.0f} | "
              f"{after['validation'][metric]:.4f} | {after['test'][metric]:.4f} | "
              f"{100 * after['test'][metric] / reference:.1f}% |")
    for kind in kinds(key):
        for lr in setting.learning_rates:
            summary = read_json(RUNS / f"distill-{key}-{kind}-lr{lr}" / "summary.json")
            if summary:
                print(f"{kind} lr {lr}: validation {summary['after']['validation'][metric]:.4f}, test "
                      f"{summary['after']['test'][metric]:.4f}, {summary['train_seconds']:.0f} s of training")


def main(argv: list[str]) -> None:
    action, key = [*argv, "", ""][:2]
    kinds_wanted = argv[2:]
    if action not in ("train", "table") or key not in SETTINGS or (action == "table" and kinds_wanted):
        sys.exit(f"usage: python benchmarks/distill.py train {'|'.join(SETTINGS)} [KIND ...] | table "
                 f"{'|'.join(SETTINGS)}")
    train(key, kinds_wanted) if action == "train" else table(key)


if __name__ == "__main__":
    main(sys.argv[1:])
