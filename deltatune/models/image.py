"""Image models: the preprocessing description, the `pixel_values=` wrapper, and the EfficientNet-Lite0 loader."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltatune.errors import UserError

# EfficientNet-Lite was trained on inputs scaled to [-1, 1] at 224x224 (see shared/ASSETS.md).
EFFICIENTNET_LITE0 = {"image_size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
# SHA-256 of efficientnet-lite0-57934424.pth (its name carries the first 8 digits, as torch hub files do): the only
# pickle deltatune ever reads, once, to convert it.
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@dataclass
class ImageProcessor:
    """How images must be prepared for a model: resize to `image_size` squared, scale to [0, 1], then
    `(x - mean) / std` per channel; `channels` is 3 for RGB, 1 for grayscale."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3


class ImageClassifier(nn.Module):
    """Lets a CNN that takes the image tensor positionally be called as `model(pixel_values=x)` -> logits tensor,
    like transformers models are called with keyword batches.

    Parameter names gain the `backbone.` prefix (e.g. `backbone._fc.weight`).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values)


def takes_pixel_values(model: nn.Module) -> bool:
    """Whether `model.forward` already accepts `pixel_values=` (transformers image models, wrapped CNNs)."""
    try:
        return "pixel_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def efficientnet_processor() -> ImageProcessor:
    """Preprocessing for EfficientNet-Lite0."""
    return ImageProcessor(**EFFICIENTNET_LITE0)


def load_efficientnet(weights: Path, num_labels: int) -> ImageClassifier:
    """EfficientNet-Lite0 with its ImageNet weights and a new final Linear of `num_labels` outputs, wrapped.

    `weights` is the asset package's pickled `.pth`; it is read only through its verified safetensors copy
    (`deltatune.models.safetensors_cache`), so no run unpickles it after the first.
    """
    from efficientnet_lite_pytorch import EfficientNet  # model code only; the weights package is read by path

    from deltatune.models.safetensors_cache import ensure_safetensors
    from deltatune.models.weight_files import read_safetensors

    state = read_safetensors(ensure_safetensors(weights, EFFICIENTNET_LITE0_SHA256))
    # Build and fill the full ImageNet model (strict: every key must match), then swap the head, so the new head
    # is fresh even when num_labels happens to be 1000.
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    model.load_state_dict(state, strict=True)
    model._fc = nn.Linear(model._fc.in_features, num_labels)
    return ImageClassifier(model)


def processor_from_directory(directory: Path) -> ImageProcessor:
    """An ImageProcessor from a transformers image model's preprocessor_config.json: the size the model sees (the
    centre crop's, when it crops) and the mean / std that reproduce its rescaling and normalisation on 0..1 pixels."""
    path = directory / "preprocessor_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"image model {directory} has no readable preprocessor_config.json ({exc}); save the "
                        f"image processor there with save_pretrained") from exc
    if config.get("do_flip_channel_order"):
        raise UserError(f"image model {directory} wants its channels in BGR order (do_flip_channel_order), which "
                        "deltatune does not prepare; use a model that takes RGB images")
    mean, std = _normalisation(config)
    return ImageProcessor(image_size=_input_size(config), mean=mean, std=std, channels=len(mean))


def _input_size(config: dict) -> int:
    """The side of the images the model sees: a processor that centre-crops resizes to `size` and then cuts
    `crop_size` out of it, so the model sees the crop (deltatune resizes to that side directly)."""
    crops = config.get("do_center_crop", False) and config.get("crop_size") is not None
    size = config["crop_size"] if crops else config.get("size", config.get("crop_size", 224))
    if isinstance(size, dict):  # {"height": h, "width": w} or {"shortest_edge": s}
        size = size.get("height") or size.get("shortest_edge") or max(size.values())
    return int(size)


def _normalisation(config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on the 0..1 pixels deltatune's collator makes, equal to what the processor feeds the model.

    transformers computes (v·f − offset − mean) / std from 0..255 pixels v, with f = rescale_factor when do_rescale
    (else 1) and offset 1 with EfficientNet's rescale_offset; with x = v / 255 and g = 255·f that is
    (x − (mean + offset) / g) / (std / g). A processor without normalisation uses mean 0 and std 1 in it;
    EfficientNet's include_top divides by image_std once more (after normalising, or in its place)."""
    image_mean = tuple(float(value) for value in config.get("image_mean", (0.5, 0.5, 0.5)))
    image_std = tuple(float(value) for value in config.get("image_std", (0.5,) * len(image_mean)))
    channels = len(image_mean)
    mean, std = (image_mean, image_std) if _normalises(config) else ((0.0,) * channels, (1.0,) * channels)
    if config.get("include_top", False):
        std = tuple(s * extra for s, extra in zip(std, image_std))
    gain = 255 * float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 255.0
    offset = 1.0 if config.get("do_rescale", True) and config.get("rescale_offset", False) else 0.0
    return tuple((m + offset) / gain for m in mean), tuple(s / gain for s in std)


def _normalises(config: dict) -> bool:
    """Its do_normalize; without one, the default of the transformers class that saved it (MobileViT's processor
    has no normalisation step and leaves do_normalize out, though it saves an image_mean), and for a hand-written
    config without a class, True (the 0.5 / 0.5 default)."""
    if "do_normalize" in config:
        return bool(config["do_normalize"])
    name = config.get("image_processor_type") or config.get("feature_extractor_type")
    if not name:
        return True
    import transformers

    processor_class = getattr(transformers, str(name).removesuffix("Fast"), None)
    return bool(getattr(processor_class, "do_normalize", "image_mean" in config))
