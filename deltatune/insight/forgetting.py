"""Catastrophic forgetting: how the base and the tuned model do on a second dataset the run never trained on.

- Language models: the task's own loss and perplexity on the second dataset's test split (the base model's
  against the tuned model's).
- Classifiers (text or images): their heads answer the run's question, not the second dataset's, so what is
  measured is what the representation still knows: a linear probe (logistic regression) trained on the final
  block's features of the second dataset's train split, scored on its test split (accuracy and log-loss), for the
  base and the tuned encoder alike (Kumar et al. 2022 and the continual-learning literature measure forgetting of
  representations this way).

The second dataset is read with the run's task and tokenizer/image settings; one that does not fit the task (another
kind of data) is a one-line error naming the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from deltatune.errors import UserError
from deltatune.insight.representations import block_features
from deltatune.training.batches import Batches
from deltatune.training.loop import evaluate, to_device

PROBE_ROWS = 4000  # rows of the second dataset read at most: a probe needs a few thousand, not millions


def forgetting_data(run: Any, name: str, columns: dict[str, str]) -> Any:
    """The second dataset as the run's task encodes it (a DatasetBundle)."""
    from deltatune.tasks import build_datasets

    config = dataclasses.replace(run.config.data, name=name, columns=dict(columns), unlabelled=None,
                                 labelled_fraction=None, max_examples=PROBE_ROWS, packing=False)
    try:
        bundle = build_datasets(config, run.task, run.processor)
    except UserError as error:
        raise UserError(f"--forgetting {name}: it cannot be read as {run.task.name} rows like the run's data ({error})"
                        f"; give a {run.task.name} dataset, or map its columns with --forgetting-columns "
                        f"role=column") from None
    if not bundle.test or (run.task.labelled and not bundle.train):
        raise UserError(f"--forgetting {name}: too few rows to split into train and test; give a larger dataset")
    return bundle


def forgetting_scores(run: Any, base: nn.Module, tuned: nn.Module, bundle: Any) -> dict[str, dict[str, float]]:
    """{"base": metrics, "tuned": metrics} on the second dataset (see the module docstring for which metrics)."""
    if run.task.labelled:
        return {label: probe_scores(model, bundle, run.device, run.config.model.family)
                for label, model in (("base", base), ("tuned", tuned))}
    from deltatune.objectives import build_objective
    from deltatune.config.schema import ObjectiveConfig

    objective = build_objective(ObjectiveConfig(), run.task)  # the task's own default loss
    data = Batches(bundle.test, bundle.collate)
    return {label: evaluate(model, objective, data, run.config.train, run.device)
            for label, model in (("base", base), ("tuned", tuned))}


def probe_scores(model: nn.Module, bundle: Any, device: torch.device, family: str = "auto",
                 batch_size: int = 64) -> dict[str, float]:
    """Accuracy and log-loss of a logistic-regression probe on the final block's features (train+validation rows
    fit it, test rows score it)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    fit_rows = bundle.train + bundle.validation
    fit_features, fit_labels = _final_features(model, fit_rows, bundle, device, family, batch_size)
    test_features, test_labels = _final_features(model, bundle.test, bundle, device, family, batch_size)
    check_probe_classes(set(fit_labels.tolist()), set(test_labels.tolist()))
    scaler = StandardScaler().fit(fit_features)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(fit_features), fit_labels)
    probabilities = probe.predict_proba(scaler.transform(test_features))
    predictions = probe.classes_[probabilities.argmax(axis=1)]
    return {"probe_accuracy": float((predictions == test_labels).mean()),
            "probe_loss": float(log_loss(test_labels, probabilities, labels=probe.classes_))}


def check_probe_classes(fitted: set[int], tested: set[int]) -> None:
    """The probe learns from the forgetting dataset's train and validation rows and is scored on its test rows: it
    needs two classes to learn and must have seen every class it is scored on."""
    if len(fitted) < 2:
        raise UserError(f"the --forgetting dataset's train and validation rows hold {len(fitted)} class; the probe "
                        "needs at least 2: give a dataset with several labels")
    unseen = sorted(tested - fitted)
    if unseen:
        raise UserError(f"the --forgetting dataset's test rows hold class {unseen[0]}, which none of its train and "
                        "validation rows has; give a larger dataset, or one where every class appears more often")


def _final_features(model: nn.Module, rows: list[dict], bundle: Any, device: torch.device, family: str,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    labels: list[torch.Tensor] = []

    def batches():  # batched by length, so the labels are taken in the order the features come
        for batch in Batches(rows, bundle.collate).in_order(batch_size):
            labels.append(batch["labels"])
            yield to_device({key: value for key, value in batch.items() if key != "labels"}, device)

    was_training = model.training
    model.eval()
    try:
        features = block_features(model, batches(), family)[-1]
    finally:
        model.train(was_training)
    return features.double().numpy(), torch.cat(labels).numpy()
