"""Contrastive image–text training of a dual encoder (CLIP; `deltatune.objectives.losses.contrastive`).

Batches carry images and either their captions (pairs data) or class labels. Rows with a label but no caption get a
caption made from `templates` and the class's name, a template drawn at random per row and step in training
(augmentation) and in turn in evaluation, e.g. "a handwritten digit seven". Evaluation reports, over a whole split:

- `image_to_text_recall_at_K` / `text_to_image_recall_at_K` for K in 1, 5 and their means `recall_at_K`: the share of
  queries whose K nearest candidates hold their own caption (an identical caption counts, see `retrieval_recall`);
- `zero_shot_accuracy` when the split has labels: each image is given the class whose prompt ensemble (every
  template filled with the class name, embeddings averaged) is most similar, as CLIP classifies without training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from deltatune.config.schema import ObjectiveConfig
from deltatune.data.text import ClassificationCollator, pad_token_id
from deltatune.errors import UserError
from deltatune.objectives import register_objective
from deltatune.objectives.base import Objective
from deltatune.objectives.losses.contrastive import (
    caption_groups,
    class_embeddings,
    contrastive_loss,
    retrieval_recall,
    zero_shot_predictions,
)

RECALL_AT = (1, 5)
UNLABELLED = -100


@dataclass
class ContrastiveConfig(ObjectiveConfig):
    name: str = "contrastive"
    # "{label}" is replaced by the class name; several templates are an ensemble for zero-shot classification and
    # vary the captions made for labelled rows.
    templates: list[str] = field(default_factory=lambda: ["a photo of a {label}"])
    class_names: list[str] | None = None  # the words for class ids 0..C-1; None: the data's own label names


@register_objective("contrastive")
class Contrastive(Objective):
    description = "CLIP's symmetric InfoNCE between image and caption embeddings, with a learnt temperature"
    task = "image-text"
    config_class = ContrastiveConfig
    main_metric = "recall_at_1"
    greater_is_better = True
    metrics = ("loss", "zero_shot_accuracy", *(f"{kind}recall_at_{k}" for k in RECALL_AT
                                               for kind in ("", "image_to_text_", "text_to_image_")))

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        super().__init__(config)
        templates = self.config.templates
        if not templates or any("{label}" not in template for template in templates):
            raise UserError(f"objective.templates must be a list of captions each containing {{label}} (e.g. "
                            f"'a photo of a {{label}}'), got {templates!r}")
        self._prompts: tuple[torch.Tensor, torch.Tensor] | None = None  # (C, T, L) token ids and mask

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = self.captions(batch, torch.randint(len(self.config.templates), batch["pixel_values"].shape[:1]))
        output = model(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask)
        loss = contrastive_loss(output.logits)
        matched = (output.logits.argmax(dim=1) == torch.arange(len(ids), device=ids.device)).float().mean()
        return loss, {"temperature": float(1 / output.logit_scale.detach()), "batch_accuracy": float(matched)}

    def captions(self, batch: dict[str, torch.Tensor], templates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's caption tokens: its own, or made from each row's label with the template index given."""
        if "input_ids" in batch:
            return batch["input_ids"], batch["attention_mask"]
        labels = batch["labels"]
        if bool((labels == UNLABELLED).any()):
            raise UserError("a training row has neither a caption nor a label; give every image a caption "
                            "(data.columns.caption) or a label (data.columns.label)")
        ids, mask = self.class_prompts(labels.device)
        if int(labels.max()) >= ids.shape[0]:
            raise UserError(f"labels go up to {int(labels.max())} but there are {ids.shape[0]} class names; list one "
                            f"name per class in objective.class_names")
        chosen_ids, chosen_mask = ids[labels, templates.to(labels.device)], mask[labels, templates.to(labels.device)]
        # The prompts are right-padded (class_prompts), so the padding every chosen caption shares is at the end.
        longest = int(chosen_mask.sum(dim=1).max())
        return chosen_ids[:, :longest], chosen_mask[:, :longest]

    def class_prompts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, T, L) token ids and attention mask of every template filled with every class name, tokenised once."""
        if self._prompts is None:
            names = self.config.class_names or self.label_names
            if not names:
                raise UserError("captions are made from class names, but neither objective.class_names nor the data "
                                "names the classes; set objective.class_names")
            tokenizer = getattr(self.processor, "text", None)
            if tokenizer is None:
                raise UserError("objective contrastive trains a dual encoder; set model.name=dual-encoder")
            texts = [template.format(label=name) for name in names for template in self.config.templates]
            encoded = tokenizer(texts, truncation=True, max_length=128)
            # Padded on the right whatever the tokenizer's own side, as the data's captions are (the image-text
            # task's collator): the same text then gets the same positions, and `captions` can cut the shared end.
            rows = [{"input_ids": ids, "attention_mask": mask, "labels": 0}
                    for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
            encoded = ClassificationCollator(pad_token_id(tokenizer), padding_side="right")(rows)
            shape = (len(names), len(self.config.templates), -1)
            self._prompts = (encoded["input_ids"].view(shape), encoded["attention_mask"].view(shape))
        return self._prompts[0].to(device), self._prompts[1].to(device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        images, texts, labels, captions, losses = [], [], [], [], []
        for batch in batches:
            rows = batch["pixel_values"].shape[0]
            turn = (torch.arange(rows) + len(captions)) % len(self.config.templates)  # templates in turn
            ids, mask = self.captions(batch, turn)
            output = model(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask)
            images.append(output.image_embeds.float().cpu())
            texts.append(output.text_embeds.float().cpu())
            labels.append(batch["labels"].cpu())
            captions += [tuple(row[m.bool()].tolist()) for row, m in zip(ids.cpu(), mask.cpu())]
            losses.append((float(contrastive_loss(output.logits)), rows))
        if not images:
            return {}
        metrics = {"loss": sum(loss * rows for loss, rows in losses) / sum(rows for _, rows in losses)}
        metrics.update(recall_metrics(torch.cat(images), torch.cat(texts), caption_groups(captions)))
        labels_all = torch.cat(labels)
        if bool((labels_all != UNLABELLED).any()) and (self.config.class_names or self.label_names):
            metrics["zero_shot_accuracy"] = self.zero_shot_accuracy(model, torch.cat(images), labels_all)
        return metrics

    def zero_shot_accuracy(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy over the labelled images of classifying each by its most similar class prompt ensemble."""
        device = next(model.parameters()).device
        ids, mask = self.class_prompts(device)
        classes, templates = ids.shape[:2]
        ids, mask = ids.flatten(0, 1), mask.flatten(0, 1)
        # A few hundred prompts at a time: ImageNet's 1,000 classes × 80 templates in one forward would not fit.
        prompts = torch.cat([model(input_ids=ids[start:start + 256], attention_mask=mask[start:start + 256])
                             .text_embeds.float().cpu() for start in range(0, ids.shape[0], 256)])
        centres = class_embeddings(prompts.view(classes, templates, -1))
        known = labels != UNLABELLED
        predicted = zero_shot_predictions(images[known], centres)
        return float((predicted == labels[known]).float().mean())

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return batch["pixel_values"].shape[0]


def recall_metrics(images: torch.Tensor, texts: torch.Tensor, groups: torch.Tensor,
                   chunk: int = 1024) -> dict[str, float]:
    """Image→text and text→image recall@K over a split's matched embeddings, and their means. Similarities are
    computed `chunk` queries at a time: a whole split's N×N matrix (40,000 rows: 6.4 GB) need never exist."""
    hits = {(direction, k): 0 for direction in ("image_to_text", "text_to_image") for k in RECALL_AT}
    for start in range(0, images.shape[0], chunk):
        rows = slice(start, start + chunk)
        for direction, queries, candidates in (("image_to_text", images, texts), ("text_to_image", texts, images)):
            similarity = queries[rows] @ candidates.T
            for k in RECALL_AT:
                hits[direction, k] += round(retrieval_recall(similarity, groups[rows], groups, k) * similarity.shape[0])
    metrics = {}
    for k in RECALL_AT:
        image_to_text, text_to_image = (hits[direction, k] / images.shape[0] if images.shape[0] else float("nan")
                                        for direction in ("image_to_text", "text_to_image"))
        metrics[f"image_to_text_recall_at_{k}"] = image_to_text
        metrics[f"text_to_image_recall_at_{k}"] = text_to_image
        metrics[f"recall_at_{k}"] = (image_to_text + text_to_image) / 2
    return metrics
