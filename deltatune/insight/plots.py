"""The report's figures, each a PNG as bytes (matplotlib's Agg backend, no display needed; imported lazily so that
deltatune itself does not need matplotlib)."""

from __future__ import annotations

import io
from typing import Any, Sequence

import torch


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    _pyplot().close(figure)
    return buffer.getvalue()


def training_curves(records: list[dict[str, Any]]) -> bytes | None:
    """Train loss, validation metrics, learning rate and tokens/s against the optimizer step."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    panels: list[tuple[str, list[tuple[str, list[float], list[float]]]]] = []
    if train:
        panels.append(("training loss", [("loss", [r["step"] for r in train], [r.get("loss") for r in train])]))
    metrics = sorted({key for r in evals for key, value in r.items()
                      if isinstance(value, (int, float)) and key not in ("step", "epoch")})
    for metric in metrics:
        panels.append((f"validation {metric}", [(metric, [r["step"] for r in evals if metric in r],
                                                 [r[metric] for r in evals if metric in r])]))
    for key, title in (("lr", "learning rate"), ("tokens_per_s", "tokens / s")):
        if any(key in r for r in train):
            panels.append((title, [(key, [r["step"] for r in train if key in r], [r[key] for r in train if key in r])]))
    if not panels:
        return None
    plt = _pyplot()
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (title, series) in zip(axes.flat, panels):
        for label, steps, values in series:
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    return _png(figure)


def per_block_bars(values: Sequence[float], title: str, ylabel: str) -> bytes:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(6.0, 0.3 * len(values) + 2), 3.2))
    axis.bar(range(len(values)), values, color="#4477aa")
    axis.set_xlabel("block")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    return _png(figure)


def cka_figures(matrix: torch.Tensor) -> bytes:
    """Layer-by-layer CKA (the diagonal) beside the base-block × tuned-block heat map."""
    plt = _pyplot()
    figure, (curve, heat) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    diagonal = torch.diagonal(matrix).tolist()
    curve.plot(range(len(diagonal)), diagonal, marker="o")
    curve.set_ylim(min(0.0, min(diagonal)) - 0.02, 1.02)
    curve.set_xlabel("block")
    curve.set_ylabel("CKA(base, tuned)")
    curve.set_title("same block, base vs tuned")
    curve.grid(alpha=0.3)
    image = heat.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
    heat.set_xlabel("tuned model block")
    heat.set_ylabel("base model block")
    heat.set_title("every pair of blocks")
    figure.colorbar(image, ax=heat, fraction=0.046)
    return _png(figure)


def confusion_figure(matrix: list[list[int]], names: list[str]) -> bytes:
    plt = _pyplot()
    size = max(3.5, 0.45 * len(names) + 2)
    figure, axis = plt.subplots(figsize=(size, size * 0.85))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(names) <= 12:
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                axis.text(j, i, str(count), ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axis, fraction=0.046)
    return _png(figure)


def forgetting_figure(scores: dict[str, dict[str, float]]) -> bytes:
    plt = _pyplot()
    metrics = list(scores["base"])
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        values = [scores["base"][metric], scores["tuned"][metric]]
        axis.bar(["base", "tuned"], values, color=["#999999", "#4477aa"])
        axis.set_title(metric)
        axis.grid(axis="y", alpha=0.3)
    return _png(figure)
