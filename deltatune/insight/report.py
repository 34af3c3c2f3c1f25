"""`deltatune report RUN_DIR`: what a fine-tuning run changed, as one offline HTML page (RUN_DIR/report/index.html),
its figures as PNGs beside it, every number in report.json, and a short text summary.

Sections: training curves; weight change per block (relative ‖ΔW‖/‖W‖, effective rank of ΔW, intruder dimensions;
a LoRA-family run folded into its weights first) or, for methods that add modules instead of changing weights
(bottleneck adapters, virtual tokens), the change of each block's hidden states; CKA between the base and the tuned
model's blocks on validation inputs; for classifiers the confusion matrix and the most confident errors, for
language models before/after samples; with --forgetting, the base and tuned models on a dataset the run never saw.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.errors import UserError
from deltatune.insight import plots
from deltatune.insight.changes import change_by_block, weight_changes
from deltatune.insight.page import Section, render
from deltatune.insight.representations import block_features, relative_feature_change
from deltatune.insight.similarity import cka_matrix
from deltatune.training.batches import Batches
from deltatune.training.checkpoint import fsync_dir
from deltatune.training.loop import to_device


@dataclass
class ReportOptions:
    base: str | None = None  # another model source to compare with; default: the run's own pretrained model
    forgetting: str | None = None  # a second dataset (alias or file) the run did not train on
    forgetting_columns: dict[str, str] = field(default_factory=dict)
    out: Path | None = None  # default RUN_DIR/report
    examples: int = 256  # validation rows whose representations are compared
    samples: int = 3  # before/after generations of a language model
    errors: int = 10  # most confident mistakes of a classifier


def write_report(run_path: str | Path, options: ReportOptions | None = None, echo=print) -> dict[str, Any]:
    """Build the report of a finished run; returns its numbers (what report.json holds)."""
    from deltatune.models.families import family_of
    from deltatune.runs import open_run

    options = options or ReportOptions()
    if options.examples < 4:
        raise UserError(f"--examples must be at least 4 (CKA's unbiased estimator needs 4 inputs), got "
                        f"{options.examples}")
    saved = open_run(run_path)
    if options.forgetting is not None and saved.task.name not in ("classification", "image-classification") \
            and not saved.task.can_generate:
        raise UserError(f"--forgetting measures classifiers and language models; {saved.run_dir.path} is a "
                        f"{saved.task.name} run")
    out = Path(options.out) if options.out is not None else saved.run_dir.path / "report"
    _check_out(out)
    run = saved.load(with_data=True)
    validation = _compared_rows(run, saved.run_dir.path, options.examples)
    base = _base_model(saved, options.base, run.data.num_labels)
    family = family_of(base, run.config.model.family)
    numbers: dict[str, Any] = {"run": str(saved.run_dir.path), "method": run.method.name, "task": run.task.name}
    figures: dict[str, bytes] = {}
    sections = [_curves(saved.run_dir.metrics_file, figures)]
    base_features = block_features(base, _inputs(validation, run), run.config.model.family)
    tuned_features = block_features(run.model, _inputs(validation, run), run.config.model.family)
    sections.append(_weights(base, run.model, family, len(base_features), numbers, figures))
    sections.append(_hidden_change(base_features, tuned_features, numbers, figures))
    sections.append(_similarity(base_features, tuned_features, numbers, figures))
    if run.task.labelled:
        sections.append(_classification(run, validation, options.errors, numbers, figures))
    elif run.task.can_generate:
        sections.append(_samples(run, base, options.samples, numbers))
    if options.forgetting is not None:
        sections.append(_forgetting(run, base, options, numbers, figures))
    _write(out, render(f"What fine-tuning changed: {saved.run_dir.path}", sections), figures, numbers)
    echo(summary_text(numbers, out))
    return numbers


def _check_out(out: Path) -> None:
    """The report replaces `out` whole: refuse a folder that holds anything but an earlier report."""
    earlier = (out / "report.json").is_file() and (out / "index.html").is_file()
    if out.exists() and not earlier and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an earlier report (the report replaces its folder whole); "
                        "give a new or empty folder")


def _compared_rows(run: Any, run_path: Path, examples: int) -> list[dict]:
    """The rows whose representations are compared: validation, or test when validation has fewer than 4; each
    must be one model input (pairs of inputs, as reward and preference runs hold, have no single representation)."""
    validation = run.data.validation if len(run.data.validation or []) >= 4 else run.data.test
    rows = list((validation or [])[:examples])
    if len(rows) < 4:
        raise UserError(f"{run_path} has {len(rows)} validation/test rows; the report compares representations on "
                        "at least 4 (give the run a validation split)")
    if any(isinstance(value, dict) for value in run.data.collate(rows[:1]).values()):
        raise UserError(f"{run_path} is a {run.task.name} run, whose examples are pairs of model inputs; the report "
                        "compares one input at a time: report on the run that trained the model from single rows")
    return rows


def _base_model(saved: Any, source: str | None, num_labels: int | None) -> nn.Module:
    if source is None:
        return saved.load_base_model(num_labels)
    import dataclasses

    from deltatune.models import load_model, load_processor
    from deltatune.models.hf import align_padding
    from deltatune.preparation import start_seeded
    from deltatune.training.loop import resolve_device

    config = dataclasses.replace(saved.config.model, name=source, student=dataclasses.replace(
        saved.config.model.student, keep_layers=None, every_other=False))
    start_seeded(saved.config)  # a new head starts as the run's did, as load_base_model does
    model = load_model(config, saved.task, saved.config.model.num_labels or num_labels)
    align_padding(model, load_processor(saved.config.model, saved.task))  # it reads the run's batches
    return model.to(resolve_device(saved.config.train.device)).eval()


def _inputs(examples: list[dict], run: Any, batch_size: int = 32):
    for batch in Batches(examples, run.data.collate).in_order(batch_size):
        yield to_device({key: value for key, value in batch.items() if key != "labels"}, run.device)


# ---- sections ---------------------------------------------------------------------------------------------------
def _curves(metrics_file: Path, figures: dict[str, bytes]) -> Section:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
        if metrics_file.exists() else []
    section = Section("Training curves")
    png = plots.training_curves(records)
    if png is None:
        return section.text("metrics.jsonl holds no training records.")
    figures["curves.png"] = png
    return section.figure(png, "training curves")


def _weights(base: nn.Module, tuned: nn.Module, family: Any, num_blocks: int, numbers: dict,
             figures: dict[str, bytes]) -> Section:
    from deltatune.adapters import merge_and_unload

    section = Section("Weight change")
    try:
        folded = merge_and_unload(copy.deepcopy(tuned))
    except UserError as error:
        numbers["weights"] = None
        return section.text(f"This method adds modules rather than changing weights ({error}); the next section "
                            "shows how each block's hidden states moved instead.")
    changes = weight_changes(_held_base(tuned, base) or base, folded, family)
    del folded
    per_block = change_by_block(changes, num_blocks)
    numbers["weights"] = {"per_block": per_block, "changed_tensors": len(changes),
                          "tensors": [vars(change) for change in changes]}
    figures["weight_change.png"] = plots.per_block_bars(per_block, "mean ‖ΔW‖ / ‖W‖ of the block's changed tensors",
                                                        "relative change")
    section.figure(figures["weight_change.png"], "weight change per block")
    section.text(f"{len(changes)} tensors changed. Effective rank: exp(entropy of ΔW's normalised singular values). "
                 "Intruder dimensions: of the tuned matrix's top-10 singular vectors, those with |cos| < 0.5 to "
                 "every singular vector of the base matrix (Shuttleworth et al. 2024).", note=True)
    largest = sorted(changes, key=lambda change: change.relative, reverse=True)[:25]
    return section.table(["tensor", "block", "shape", "‖ΔW‖/‖W‖", "effective rank of ΔW", "intruders"],
                         [(c.name, c.block, "×".join(map(str, c.shape)), c.relative, c.effective_rank, c.intruders)
                          for c in largest])


def _hidden_change(base: list[torch.Tensor], tuned: list[torch.Tensor], numbers: dict,
                   figures: dict[str, bytes]) -> Section:
    change = relative_feature_change(base, tuned)
    numbers["hidden_change"] = change
    figures["hidden_change.png"] = plots.per_block_bars(change, "‖H_tuned − H_base‖ / ‖H_base‖ on validation inputs",
                                                        "relative change")
    return Section("Hidden-state change").figure(figures["hidden_change.png"], "hidden-state change per block")


def _similarity(base: list[torch.Tensor], tuned: list[torch.Tensor], numbers: dict,
                figures: dict[str, bytes]) -> Section:
    matrix = cka_matrix(base, tuned)
    numbers["cka"] = {"diagonal": torch.diagonal(matrix).tolist(), "matrix": matrix.tolist(),
                      "examples": int(base[0].shape[0])}
    figures["cka.png"] = plots.cka_figures(matrix)
    return (Section("Representation similarity (linear CKA)")
            .figure(figures["cka.png"], "CKA between base and tuned blocks")
            .text(f"Linear CKA with the unbiased HSIC (Kornblith et al. 2019) over {base[0].shape[0]} validation "
                  "examples, one mean-pooled feature row each: 1 = the same representation up to rotation and "
                  "scale, ~0 = unrelated.", note=True))


def _classification(run: Any, examples: list[dict], errors: int, numbers: dict, figures: dict[str, bytes]) -> Section:
    from deltatune.objectives.base import model_logits

    names = list(run.data.label_names or [str(i) for i in range(run.data.num_labels or 0)])
    truths, predictions, confidences, texts = [], [], [], []
    with torch.no_grad():
        for batch in Batches(examples, run.data.collate).in_order(32):
            batch = to_device(batch, run.device)
            probabilities = torch.softmax(model_logits(run.model, batch).float(), dim=-1)
            confidence, predicted = probabilities.max(dim=-1)
            truths += batch["labels"].tolist()
            predictions += predicted.tolist()
            confidences += confidence.tolist()
            texts += _texts(batch, run.processor)
    size = max(len(names), max(truths + predictions) + 1)
    names += [str(i) for i in range(len(names), size)]
    matrix = [[0] * size for _ in range(size)]
    for truth, predicted in zip(truths, predictions):
        matrix[truth][predicted] += 1
    wrong = sorted((i for i, (t, p) in enumerate(zip(truths, predictions)) if t != p), key=lambda i: -confidences[i])
    numbers["confusion"] = {"labels": names, "matrix": matrix,
                            "accuracy": sum(t == p for t, p in zip(truths, predictions)) / max(1, len(truths))}
    figures["confusion.png"] = plots.confusion_figure(matrix, names)
    return (Section(f"Confusion matrix and most confident errors ({len(truths)} validation examples)")
            .figure(figures["confusion.png"], "confusion matrix")
            .table(["input", "true", "predicted", "confidence"],
                   [(texts[i], names[truths[i]], names[predictions[i]], confidences[i]) for i in wrong[:errors]]))


def _texts(batch: dict[str, Any], processor: Any) -> list[str]:
    if "input_ids" in batch and hasattr(processor, "decode"):
        return [processor.decode(ids[mask.bool()], skip_special_tokens=True)
                for ids, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]
    return ["(image)"] * len(batch["labels"])


def _samples(run: Any, base: nn.Module, count: int, numbers: dict) -> Section:
    from deltatune.data.sources import load_rows
    from deltatune.generate import generate_text

    rows = load_rows(run.config.data)
    splits = run.run_dir.read_splits() or {}
    prompt_column = run.task.columns(run.config.data).get("prompt")
    picked = [rows[i][prompt_column] for i in (splits.get("validation") or splits.get("test") or [])[:count]] \
        if prompt_column else []
    samples = [{"prompt": prompt, "base": generate_text(base, run.processor, prompt),
                "tuned": generate_text(run.model, run.processor, prompt)} for prompt in picked]
    numbers["samples"] = samples
    return Section("Before and after: greedy samples on validation prompts").table(
        ["prompt", "base model", "tuned model"], [(s["prompt"], s["base"], s["tuned"]) for s in samples])


def _forgetting(run: Any, base: nn.Module, options: ReportOptions, numbers: dict, figures: dict[str, bytes]) -> Section:
    from deltatune.insight.forgetting import forgetting_data, forgetting_scores

    bundle = forgetting_data(run, options.forgetting, options.forgetting_columns)
    scores = forgetting_scores(run, base, run.model, bundle)
    numbers["forgetting"] = {"data": options.forgetting, **scores,
                             "difference": {key: scores["tuned"][key] - scores["base"][key] for key in scores["base"]}}
    figures["forgetting.png"] = plots.forgetting_figure(scores)
    how = ("a logistic-regression probe on the final block's features (fit on its train split, scored on its test "
           "split)" if run.task.labelled else "the task's loss on its test split")
    return (Section(f"Forgetting: {options.forgetting}, which the run did not train on")
            .figure(figures["forgetting.png"], "forgetting")
            .table(["metric", "base", "tuned", "tuned − base"],
                   [(key, scores["base"][key], scores["tuned"][key], numbers["forgetting"]["difference"][key])
                    for key in scores["base"]])
            .text(f"Measured with {how}.", note=True))


def _held_base(tuned: nn.Module, base: nn.Module) -> nn.Module | None:
    """The run's frozen weights as it held them, adapters off, when it holds some in another form than the base
    model (a 4-bit stand-in, as QLoRA's): ΔW is then measured against them, so quantisation's rounding (a relative
    change near 0.1 on every frozen matrix) is not reported as fine-tuning's change. What the run trained in place
    (biases under bias="all", a head) is taken from `base`, or its change would read as zero. None when it holds
    no stand-in."""
    from deltatune.adapters import disabled, merge_and_unload

    if not any(callable(getattr(module, "to_standard_module", None)) for module in tuned.modules()):
        return None
    held = copy.deepcopy(tuned)
    with disabled(held):
        merge_and_unload(held)
    pretrained = dict(base.named_parameters())
    with torch.no_grad():
        for name, param in held.named_parameters():
            if param.requires_grad and name in pretrained and pretrained[name].shape == param.shape:
                param.copy_(pretrained[name])
    return held


# ---- output -----------------------------------------------------------------------------------------------------
def _write(out: Path, page: str, figures: dict[str, bytes], numbers: dict[str, Any]) -> None:
    """Everything into a temporary sibling first, then one rename: an interrupted report leaves the old one."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "index.html").write_text(page, encoding="utf-8")
    for name, png in figures.items():
        (tmp / name).write_bytes(png)
    (tmp / "report.json").write_text(json.dumps(numbers, indent=1, default=float))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(out.parent)


def summary_text(numbers: dict[str, Any], out: Path) -> str:
    lines = [f"report of {numbers['run']} ({numbers['method']}, {numbers['task']}): {out / 'index.html'}"]
    weights = numbers.get("weights")
    if weights:
        per_block = weights["per_block"]
        top = sorted(range(len(per_block)), key=lambda i: -per_block[i])[:3]
        lines.append(f"  weights: {weights['changed_tensors']} tensors changed; most-changed blocks "
                     + ", ".join(f"{i} ({per_block[i]:.3g})" for i in top))
    diagonal = numbers["cka"]["diagonal"]
    lines.append(f"  CKA base vs tuned by block: " + " ".join(f"{value:.2f}" for value in diagonal))
    if "confusion" in numbers:
        lines.append(f"  validation accuracy {numbers['confusion']['accuracy']:.4f}")
    if "forgetting" in numbers:
        lines.append(f"  forgetting on {numbers['forgetting']['data']}: " + ", ".join(
            f"{key} {numbers['forgetting']['base'][key]:.4f} -> {numbers['forgetting']['tuned'][key]:.4f}"
            for key in numbers["forgetting"]["base"]))
    return "\n".join(lines)
