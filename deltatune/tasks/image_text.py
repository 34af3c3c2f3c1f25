"""Image–text pairs for a dual encoder (`model.name: dual-encoder`, objective `contrastive`).

Roles: `image` (default column "image": an array, a file path relative to the data file, or encoded bytes), and at
least one of `caption` (the image's text; name its column in data.columns) and `label` (a class; the objective then
makes captions from its templates and the class names, and measures zero-shot accuracy). An image folder with one
subfolder per class reads as images with labels, without data.columns naming the label.

This task also assembles the model: `model.image` is loaded as an image classifier whose head is then dropped
(the family table names it), `model.text` as a text encoder without its pooler; `deltatune.models.dual_encoder`
adds the projections and the temperature.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.config.schema import DataConfig, ModelConfig
from deltatune.data import DatasetBundle
from deltatune.data.aliases import ALIASES
from deltatune.data.images import ImageCollator, encode_images, image_collator
from deltatune.data.splits import SPLIT_NAMES
from deltatune.data.table import Table
from deltatune.data.text import ClassificationCollator, pad_token_id
from deltatune.data.unlabelled import UNLABELLED
from deltatune.errors import UserError
from deltatune.models.dual_encoder import CONFIG_FILE, TEXT_DIRECTORY, WEIGHTS_FILE, DualEncoder, DualProcessor
from deltatune.tasks import get_task, register_task
from deltatune.tasks.base import Task

IMAGE_TOWER_TASK, TEXT_TOWER_TASK = "image-classification", "classification"


@dataclass
class ImageTextCollator:
    """pixel_values (and labels) as image classification batches them, plus padded caption tokens when examples
    carry them."""

    images: ImageCollator
    texts: ClassificationCollator  # pads input_ids / attention_mask; its labels are the images' labels again

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = self.images(batch)
        if "input_ids" in batch[0]:
            texts = self.texts(batch)
            out["input_ids"], out["attention_mask"] = texts["input_ids"], texts["attention_mask"]
        return out


@register_task("image-text")
class ImageText(Task):
    description = "images paired with captions (or class labels) for a dual encoder"
    roles = {"image": "image", "caption": None, "label": None}
    default_objective = "contrastive"

    def columns(self, data: DataConfig) -> dict[str, str]:
        """The task's columns; an image folder's rows always carry their class (the subfolder name) under the label
        column, so there the label role is read without data.columns naming it."""
        chosen = super().columns(data)
        if "label" not in chosen and data.name not in ALIASES and Path(data.name).expanduser().is_dir():
            chosen["label"] = "label"  # the column `load_image_folder` writes the class to by default
        return chosen

    def encode(self, table: Table, splits: dict[str, list[int]], data: DataConfig, processor: Any,
               num_labels: int | None) -> DatasetBundle:
        if not isinstance(processor, DualProcessor):
            raise UserError("task image-text trains a dual encoder; set model.name=dual-encoder with model.image and "
                            "model.text")
        if not table.has("caption") and not table.has("label"):
            raise UserError("task image-text needs captions or labels: set data.columns.caption to the caption "
                            "column (pairs), or data.columns.label to a class column (captions are then made from "
                            "objective.templates)")
        if data.image_size is not None:  # the size trained at is the size an export must resize to
            processor.image = dataclasses.replace(processor.image, image_size=int(data.image_size))
        labels = table.labels("label", num_labels) if table.has("label") else None
        parts: dict[str, list[dict]] = {}
        for name in SPLIT_NAMES:
            indices = splits[name]
            ids = [labels.ids[i] for i in indices] if labels is not None else [UNLABELLED] * len(indices)
            examples = encode_images(table.values("image", indices), ids, table.base_dir)
            if table.has("caption") and indices:
                tokens = processor.text(table.filled_texts("caption", indices), truncation=True,
                                        max_length=data.max_length)
                for example, token_ids, mask in zip(examples, tokens["input_ids"], tokens["attention_mask"]):
                    example["input_ids"], example["attention_mask"] = list(token_ids), list(mask)
            parts[name] = examples
        collate = ImageTextCollator(image_collator(processor.image, data.image_size),
                                    ClassificationCollator(pad_token_id(processor.text)))
        return DatasetBundle(parts["train"], parts["validation"], parts["test"], collate,
                             labels.num_labels if labels else None, labels.label_names if labels else None, splits)

    def assemble_model(self, cfg: ModelConfig) -> DualEncoder:
        """Both towers loaded as their own tasks load them, the image head and the text pooler dropped."""
        from deltatune.models import load_model
        from deltatune.models.dual_encoder import drop_head
        from deltatune.models.families import family_of

        image_config, text_config = tower_configs(cfg)
        image = load_model(image_config, get_task(IMAGE_TOWER_TASK)(), 1)
        image_features = drop_head(image, family_of(image).is_head)
        text = load_model(text_config, get_task(TEXT_TOWER_TASK)(), 1).base_model
        if getattr(text, "pooler", None) is not None:
            text.pooler = None  # mean pooling reads the hidden states; an unused pooler would only idle in the optimizer
        return DualEncoder(image, text, image_features, int(text.config.hidden_size), cfg.projection_dim,
                           description={"image": cfg.image, "text": cfg.text})

    def assemble_processor(self, cfg: ModelConfig) -> DualProcessor:
        from deltatune.models import load_processor

        image_config, text_config = tower_configs(cfg)
        return DualProcessor(load_processor(image_config, get_task(IMAGE_TOWER_TASK)()),
                             load_processor(text_config, get_task(TEXT_TOWER_TASK)()))


def tower_configs(cfg: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """The image and text towers' own model configs; a UserError naming the key when one is missing."""
    for key in ("image", "text"):
        if not getattr(cfg, key):
            example = "efficientnet-lite0" if key == "image" else "minilm-l6"
            raise UserError(f"model.name dual-encoder needs model.{key}: the {key} tower (e.g. {example})")
    assert cfg.image is not None and cfg.text is not None
    return (ModelConfig(name=cfg.image, task=IMAGE_TOWER_TASK, allow_pickle=cfg.allow_pickle),
            ModelConfig(name=cfg.text, task=TEXT_TOWER_TASK, allow_pickle=cfg.allow_pickle))


def load_dual_encoder(directory: str | Path) -> tuple[DualEncoder, DualProcessor]:
    """A dual encoder written by `deltatune export` (its `save_pretrained`): the towers rebuilt (the text tower from
    the export's own text/ directory) and every weight read back."""
    from deltatune.models.image import ImageProcessor
    from deltatune.models.weight_files import read_safetensors

    directory = Path(directory)
    description = json.loads((directory / CONFIG_FILE).read_text())
    text_directory = str(directory / TEXT_DIRECTORY)
    config = ModelConfig(name="dual-encoder", image=description["image"], text=text_directory,
                         projection_dim=description["projection_dim"])
    task = ImageText()
    model = task.assemble_model(config)
    model.load_state_dict(read_safetensors(directory / WEIGHTS_FILE), strict=True)
    image_processor = ImageProcessor(**json.loads((directory / "image_processor.json").read_text()))
    processor = DualProcessor(image_processor, task.assemble_processor(config).text)
    model.description["text"] = description["text"]
    return model.eval(), processor
