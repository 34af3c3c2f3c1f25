"""Image classification: an image per row (array, file path or encoded bytes) and a class label.

Roles: `image` (default column "image") and `label` (default "label"). Examples keep the raw image; resizing and
normalisation happen per batch in the collate function (see `deltatune.data.images`). A CNN whose forward takes the
tensor positionally is wrapped in `ImageClassifier` so it is called as `model(pixel_values=...)` like transformers
image models. Trained with cross-entropy by default (objective `classification`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from deltatune.config.schema import DataConfig
from deltatune.data import DatasetBundle
from deltatune.data.images import encode_images, image_collator
from deltatune.data.splits import SPLIT_NAMES
from deltatune.data.table import Table
from deltatune.errors import UserError
from deltatune.tasks import register_task
from deltatune.tasks.base import Task
from deltatune.tasks.classification import mark_tasks

_PROCESSOR_FIELDS = ("image_size", "mean", "std", "channels")


@register_task("image-classification")
class ImageClassification(Task):
    description = "image classification with a new head"
    roles = {"image": "image", "label": "label", "task": None}  # task: meta-learning's episodes
    default_objective = "classification"
    auto_class = "AutoModelForImageClassification"
    labelled = True
    architecture_suffixes = ("ForImageClassification",)

    def encode(self, table: Table, splits: dict[str, list[int]], data: DataConfig, processor: Any,
               num_labels: int | None) -> DatasetBundle:
        """Raw-image examples; the collate function resizes and normalises each batch as `processor` says."""
        if not all(hasattr(processor, name) for name in _PROCESSOR_FIELDS):
            raise UserError("image classification needs an image model (e.g. model.name: efficientnet-lite0)")
        labels = table.labels("label", num_labels)
        parts = {name: encode_images(table.values("image", splits[name]), [labels.ids[i] for i in splits[name]],
                                     table.base_dir)
                 for name in SPLIT_NAMES}
        for name in SPLIT_NAMES:
            mark_tasks(parts[name], table, splits[name])
        return DatasetBundle(parts["train"], parts["validation"], parts["test"],
                             image_collator(processor, data.image_size), labels.num_labels, labels.label_names, splits)

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Wrap a CNN that takes the image tensor positionally, so every model is called with `pixel_values=`."""
        from deltatune.models.image import ImageClassifier, takes_pixel_values

        if isinstance(model, ImageClassifier) or takes_pixel_values(model):
            return model
        return ImageClassifier(model)

    def directory_processor(self, directory: Path) -> Any:
        """The resize/normalise settings from the directory's preprocessor_config.json."""
        from deltatune.models.image import processor_from_directory

        return processor_from_directory(directory)
