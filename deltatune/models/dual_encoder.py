"""A CLIP-style dual encoder: an image tower and a text tower, each followed by a linear projection into one shared
space, and a learnt temperature (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision").

    image_embeds = normalise(W_image · f_image(pixels))        f_image: the CNN/ViT with its head removed
    text_embeds  = normalise(W_text · mean_pool(f_text(ids)))  mean over the attended tokens (sentence-transformers)
    logits[i, j] = exp(s) · <image_embeds[i], text_embeds[j]>,  s learnt, exp(s) ≤ 100 (CLIP's clamp)

The towers are ordinary modules the loaders already build (an image classifier with its head replaced by Identity,
a transformers encoder without pooler), so every method applies to either tower by name patterns as it would to the
model alone (`deltatune.methods.composite.towers`). Assembling the towers from `model.image` / `model.text` needs
the task registry and lives with the `image-text` task; this module is the network, its inputs and its files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import UserError

CONFIG_FILE = "dual_encoder.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_DIRECTORY = "text"  # the text tower as a plain transformers directory (AutoModel + tokenizer load it)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(s) at 100 so the softmax cannot become a hard argmax


@dataclass
class DualEncoderOutput:
    """`logits`: image-by-text similarities times exp(s) when both inputs are given; with one kind of input only,
    that input's embeddings (so the generic `model_logits` reads something comparable from any call)."""

    logits: torch.Tensor
    image_embeds: torch.Tensor | None
    text_embeds: torch.Tensor | None
    logit_scale: torch.Tensor


class DualEncoder(nn.Module):
    """Two towers and their projections; `towers()` names the submodules a per-tower method adapts."""

    model_kind = "dual-encoder"  # what `deltatune.methods.base.model_kind` reports for it

    def __init__(self, image: nn.Module, text: nn.Module, image_features: int, text_features: int,
                 projection_dim: int | None, temperature: float = 0.07, description: dict | None = None) -> None:
        super().__init__()
        if projection_dim is None and image_features != text_features:
            raise UserError(f"the towers' projection sizes disagree: the image tower gives {image_features} features "
                            f"and the text tower {text_features}, and model.projection_dim is null (no projection "
                            f"heads); set model.projection_dim (e.g. 256) so both are projected to one size")
        self.image = image
        self.text = text
        self.image_projection = _projection(image_features, projection_dim)
        self.text_projection = _projection(text_features, projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        # Where the towers came from and their sizes: saved beside the weights so `load_dual_encoder` rebuilds it.
        self.description = {"image_features": image_features, "text_features": text_features,
                            "projection_dim": projection_dim, **(description or {})}

    def towers(self) -> dict[str, nn.Module]:
        return {"image": self.image, "text": self.text}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-length image embeddings."""
        features = self.image(pixel_values=pixel_values)
        features = features if isinstance(features, torch.Tensor) else features.logits
        return F.normalize(self.image_projection(features.flatten(1)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) unit-length text embeddings: the last hidden states averaged over the attended tokens."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.text(input_ids=input_ids, attention_mask=mask, **extra).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(s), the inverse temperature, clamped at 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> DualEncoderOutput:
        if pixel_values is None and input_ids is None:
            raise ValueError("a dual encoder needs pixel_values=, input_ids= or both")
        image = self.encode_image(pixel_values) if pixel_values is not None else None
        text = self.encode_text(input_ids, attention_mask, token_type_ids) if input_ids is not None else None
        if image is not None and text is not None:
            logits = self.scale() * image @ text.T
        else:
            logits = image if image is not None else text
        return DualEncoderOutput(logits, image, text, self.scale())

    def save_pretrained(self, directory: str | Path) -> None:
        """The whole state (both towers, both projections, the temperature) in one safetensors file, its description
        in dual_encoder.json, and the text tower again as a transformers directory under text/."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(self.description, indent=1))
        if hasattr(self.text, "save_pretrained"):
            from deltatune.models.hf import quiet_transformers

            with quiet_transformers():  # no progress bar for one small shard
                self.text.save_pretrained(directory / TEXT_DIRECTORY)


def _projection(features: int, projection_dim: int | None) -> nn.Module:
    # No bias, as CLIP: the embeddings are normalised, so a shared offset would only shrink their angles.
    return nn.Identity() if projection_dim is None else nn.Linear(features, projection_dim, bias=False)


def drop_head(model: nn.Module, is_head) -> int:
    """Replace the head Linear the family table names (`is_head(name)`) by Identity, so the model returns the
    features that fed it; returns their size. A UserError when the model has no such single Linear."""
    heads = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and is_head(f"{name}.weight")]
    if len(heads) != 1:
        raise UserError(f"the image tower's classification head could not be found ({len(heads)} candidate Linear "
                        f"layers); use an image classifier whose head the family table names (efficientnet-lite0, "
                        f"a transformers *ForImageClassification directory)")
    name, head = heads[0]
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, nn.Identity())
    return head.in_features


@dataclass
class DualProcessor:
    """What a dual encoder's inputs need: the image tower's `ImageProcessor` and the text tower's tokenizer."""

    image: Any
    text: Any

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.text.save_pretrained(directory / TEXT_DIRECTORY)
        (directory / "image_processor.json").write_text(json.dumps(dataclasses.asdict(self.image)))


class ImageTextEncoder:
    """A trained dual encoder ready for use: `encode_image(images)` and `encode_text(texts)` give unit-length
    embeddings (rows of a (N, D) tensor) whose dot products rank matches. Images are arrays, file paths, encoded
    bytes or PIL images, resized and normalised as in training."""

    def __init__(self, model: DualEncoder, processor: DualProcessor, image_size: int | None = None,
                 max_length: int = 128) -> None:
        from deltatune.data.images import image_collator

        self.model = model.eval()
        self.processor = processor
        self.images = image_collator(processor.image, image_size)
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_image(self, images: list[Any], batch_size: int = 64) -> torch.Tensor:
        from deltatune.data.images import prepare_image_value

        rows = []
        for start in range(0, len(images), batch_size):
            chunk = [{"image": prepare_image_value(image, None), "labels": 0} for image in images[start:start + batch_size]]
            rows.append(self.model.encode_image(self.images(chunk)["pixel_values"].to(self.device)).cpu())
        return torch.cat(rows) if rows else torch.empty(0, 0)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = self.processor.text(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
            rows.append(self.model.encode_text(batch["input_ids"].to(self.device),
                                               batch["attention_mask"].to(self.device)).cpu())
        return torch.cat(rows) if rows else torch.empty(0, 0)
