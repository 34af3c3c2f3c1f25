"""Input noise for a student that learns from a teacher's labels (Noisy Student, Xie et al. 2020): the teacher
labels the clean input, the student has to reproduce that label from a corrupted one, so it learns the labels'
invariances rather than copying the teacher's function point by point.

- Text (`attention_mask` in the batch): each real token except the first and the last of its row (the
  classifier token and the end marker in BERT-style encoders) is hidden from attention with probability `fraction`,
  which removes it from the sentence for every layer: word dropout (Iyyer et al. 2015) that needs no vocabulary
  and works with any tokenizer.
- Images (`pixel_values`): Cutout (DeVries & Taylor 2017): one square covering `fraction` of each image's area, at
  a random place, is set to 0 (the mid grey of inputs normalised to [-1, 1]).

Randomness comes from torch's global generator, which the training loop seeds and checkpoints, so a resumed run
draws the same noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def noised_inputs(batch: dict[str, Any], fraction: float) -> dict[str, Any]:
    """A copy of `batch` with its inputs corrupted (see the module docstring); the batch itself is not changed."""
    if fraction <= 0:
        return batch
    noised = dict(batch)
    if "attention_mask" in batch:
        noised["attention_mask"] = _dropped_tokens(batch["attention_mask"], fraction)
    elif "pixel_values" in batch:
        noised["pixel_values"] = _cutout(batch["pixel_values"], fraction)
    return noised


def _dropped_tokens(attention_mask: torch.Tensor, fraction: float) -> torch.Tensor:
    real = attention_mask.bool()
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    first = real.float().argmax(dim=1, keepdim=True)  # works for left and right padding
    last = real.shape[1] - 1 - real.flip(1).float().argmax(dim=1, keepdim=True)
    droppable = real & (positions != first) & (positions != last)
    dropped = droppable & (torch.rand(real.shape, device=real.device) < fraction)
    return attention_mask.masked_fill(dropped, 0)


def _cutout(pixels: torch.Tensor, fraction: float) -> torch.Tensor:
    batch, _, height, width = pixels.shape
    side_h, side_w = max(1, round(height * math.sqrt(fraction))), max(1, round(width * math.sqrt(fraction)))
    top = torch.randint(0, height - side_h + 1, (batch,), device=pixels.device)
    left = torch.randint(0, width - side_w + 1, (batch,), device=pixels.device)
    rows = torch.arange(height, device=pixels.device)
    columns = torch.arange(width, device=pixels.device)
    inside_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < (top + side_h)[:, None])
    inside_columns = (columns[None, :] >= left[:, None]) & (columns[None, :] < (left + side_w)[:, None])
    square = inside_rows[:, :, None] & inside_columns[:, None, :]  # (batch, height, width)
    return pixels.masked_fill(square[:, None], 0.0)
