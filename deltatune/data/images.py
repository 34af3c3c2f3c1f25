"""Image classification data: small raw images in memory, resizing and normalisation per batch.

Examples hold the *raw* image (a uint8 tensor (C, h, w), or a file path / encoded bytes decoded on use), never the
model-sized float tensor: 5,000 MNIST digits at 224x224x3 in float32 would take 3 GB, while the raw 28x28 bytes take
4 MB. The collate function converts a batch at once (one batched interpolate when sizes agree), which costs little
next to the forward pass. Deviation from a "pixel_values per example" layout: examples carry "image" + "labels";
only batches carry "pixel_values".
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deltatune.errors import UserError

Example = dict[str, Any]
_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 weights, as PIL's "L" conversion uses


@dataclass
class ImageProcessor:
    """How a model wants its pixels: square side, per-channel mean/std (on the 0..1 scale) and channel count."""

    image_size: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    channels: int = 3

    def __post_init__(self) -> None:
        if int(self.image_size) < 1:
            raise UserError(f"image size {self.image_size} is not positive; set data.image_size to e.g. 224")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1:  # one value applies to every channel
                values = values * self.channels
            if len(values) != self.channels:
                raise ValueError(f"{name} has {len(values)} values for {self.channels} channels")
            setattr(self, name, values)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")


def array_to_chw(value: Any) -> torch.Tensor:
    """A (H, W) or (H, W, C) array-like as a uint8 tensor (C, H, W); floats in 0..1 are scaled to 0..255."""
    array = np.asarray(value)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise UserError(f"image array has shape {array.shape}; use (H, W) or (H, W, C) with C in 1..4")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:  # 16-bit pixels (medical, scientific data): scaled, not clipped to white
        array = _sixteen_to_eight_bits(array)
    elif np.issubdtype(array.dtype, np.floating) and array.size and float(array.max()) <= 1.0:
        array = array * 255.0
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    # np.array copies: PIL-backed arrays are read-only, and a copy also detaches the example from the source row
    return torch.from_numpy(np.array(array, order="C")).permute(2, 0, 1).contiguous()


def _undecodable(source: str | bytes, exc: Exception) -> UserError:
    """The one-line error for an image PIL cannot read."""
    name = source if isinstance(source, str) else "image bytes"
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return UserError(f"cannot decode {name} ({reason}); remove or re-save that image")


# What PIL raises for a damaged or hostile file: OSError (truncated, unidentified), SyntaxError (broken PNG chunks),
# ValueError/struct.error (bad headers) and DecompressionBombError (a huge declared size meant to exhaust memory).
_PIL_FAILURES = (OSError, SyntaxError, ValueError, EOFError, struct.error)


# Modes whose pixels are not 8-bit channel values, and the mode that keeps what they show: palettes become their
# colours (alpha kept when the palette has transparency), CMYK / YCbCr / LAB / HSV become RGB, premultiplied alpha
# plain alpha. Any mode not listed and not kept as it is becomes RGB.
_KEPT_MODES = ("L", "LA", "RGB", "RGBA")
_CONVERTED_MODES = {"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA"}
_MAX_16_BIT = 65535


def _eight_bit_grey(image: Any, source: str) -> Any:
    """A 16-bit grey image ("I;16*", or "I" as Pillow opens 16-bit PNGs) as 8-bit "L", scaled by the 16-bit range:
    PIL's own convert clips at 255, which turns most of such an image white. An "I" image whose values already fit
    0..255 (Image.fromarray of int32 pixels) is 8-bit data and kept as it is."""
    from PIL import Image

    values = np.asarray(image)
    top = int(values.max()) if values.size else 0
    if values.size and (int(values.min()) < 0 or top > _MAX_16_BIT):
        raise UserError(f"{source} has 32-bit integer pixels outside 0..{_MAX_16_BIT}; save it as an 8- or 16-bit "
                        "image")
    if image.mode == "I" and top <= 255:
        return Image.fromarray(values.astype(np.uint8), "L")
    return Image.fromarray(_sixteen_to_eight_bits(values), "L")


def _sixteen_to_eight_bits(values: np.ndarray) -> np.ndarray:
    """0..65535 as 0..255, rounded: (v·255 + 32767) // 65535 in integers, so no float64 copy of a large image."""
    return ((values.astype(np.int64) * 255 + _MAX_16_BIT // 2) // _MAX_16_BIT).astype(np.uint8)


def pil_to_chw(image: Any, channels: int | None = None, source: str = "an image") -> torch.Tensor:
    """A PIL image as uint8 (C, H, W) of what it shows, turned upright by its EXIF orientation (as transformers'
    load_image does): `channels` 3 (RGB) or 1 (grey), or None to keep grey or colour and alpha as they are (the
    collator matches channels later). Float ("F") pixels are read as an array is: 0..1 scaled to 0..255."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        return array_to_chw(np.asarray(image)) if channels is None else _channels_of(np.asarray(image), channels)
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _eight_bit_grey(image, source)
    if image.mode == "La":
        image = image.convert("LA")  # premultiplied alpha: PIL converts it to L only by way of LA
    if channels is not None:
        target = "RGB" if channels == 3 else "L"
    elif image.mode in _KEPT_MODES:
        target = image.mode
    elif image.mode == "P":
        target = "RGBA" if "transparency" in image.info else "RGB"
    else:
        target = _CONVERTED_MODES.get(image.mode, "RGB")
    return array_to_chw(np.asarray(image if image.mode == target else image.convert(target)))


def _channels_of(grey: np.ndarray, channels: int) -> torch.Tensor:
    """A float grey array as `channels` uint8 channels (1, or 3 equal ones)."""
    chw = array_to_chw(grey)
    return chw.expand(channels, -1, -1).contiguous() if channels == 3 else chw


def decode_file(source: str | bytes, channels: int) -> torch.Tensor:
    """Decode an image file (path or encoded bytes) with PIL into uint8 (channels, H, W)."""
    from PIL import Image

    name = source if isinstance(source, str) else "image bytes"
    try:
        with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
            return pil_to_chw(image, channels, name)  # also flattens palettes and drops alpha
    except (*_PIL_FAILURES, Image.DecompressionBombError) as exc:
        raise _undecodable(source, exc) from None


def check_image_file(source: str | bytes) -> None:
    """UserError unless PIL recognises the image and its structure is whole (checksums, not a truncated file).

    Run when the dataset is built, so a bad file stops the run before training instead of at its first batch;
    `verify` reads the file's structure without decoding the pixels.
    """
    from PIL import Image

    try:
        with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
            image.verify()
    except (*_PIL_FAILURES, Image.DecompressionBombError) as exc:
        raise _undecodable(source, exc) from None


def prepare_image_value(value: Any, base_dir: Path | None) -> torch.Tensor | str | bytes:
    """What an example stores: a uint8 tensor for arrays, a checked path, or encoded bytes (decoded lazily)."""
    if isinstance(value, dict):  # the Hugging Face datasets layout: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        check_image_file(bytes(value))
        return bytes(value)
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path  # paths in a data file are relative to that file
        if not path.is_file():
            raise UserError(f"image file {value} not found; image paths are relative to the data file's folder")
        check_image_file(str(path))
        return str(path)
    if hasattr(value, "convert") and hasattr(value, "mode"):  # a PIL image
        return pil_to_chw(value)
    return array_to_chw(value)


def encode_images(values: list[Any], labels: list[int], base_dir: Path | None) -> list[Example]:
    """Examples {"image": raw image, "labels": int}; pixels are processed in the collate function."""
    return [{"image": prepare_image_value(v, base_dir), "labels": int(label)} for v, label in zip(values, labels)]


def _match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Float (C, H, W) with the wanted channel count: alpha dropped, grey replicated, colour to luminance."""
    count = image.shape[0]
    if count in (2, 4):  # grey+alpha or RGBA: alpha is not part of the picture
        image, count = image[: count - 1], count - 1
    if count == channels:
        return image
    if count == 1:
        return image.expand(channels, -1, -1)
    if count == 3 and channels == 1:
        return (image * _LUMA[:, None, None]).sum(0, keepdim=True)
    raise UserError(f"cannot turn a {count}-channel image into {channels} channels; convert the images first")


@dataclass
class ImageCollator:
    """Decodes, resizes (bilinear), scales to 0..1 and normalises a batch; returns pixel_values and labels."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        images = [self._load(example["image"]) for example in batch]
        size = (self.image_size, self.image_size)
        if len({tuple(image.shape) for image in images}) == 1:
            pixels = self._resize(torch.stack(images), size)  # one batched call when the sizes agree
        else:
            pixels = torch.cat([self._resize(image[None], size) for image in images])
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return {
            "pixel_values": ((pixels - mean) / std).contiguous(),
            "labels": torch.tensor([example["labels"] for example in batch], dtype=torch.long),
        }

    def _load(self, image: torch.Tensor | str | bytes) -> torch.Tensor:
        """Float (channels, h, w) in 0..1 from whatever the example stores."""
        if not isinstance(image, torch.Tensor):
            image = decode_file(image, self.channels)
        return _match_channels(image.float() / 255.0, self.channels)

    @staticmethod
    def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear resize; antialias keeps downscaled photos from aliasing (it is a no-op when upscaling)."""
        if tuple(images.shape[-2:]) == size:
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def image_collator(processor: ImageProcessor, image_size: int | None = None) -> ImageCollator:
    """The collate function for a processor; `image_size` (data.image_size) overrides the model's size."""
    size = int(image_size) if image_size is not None else int(processor.image_size)
    if size < 1:
        raise UserError(f"data.image_size is {size}; use a positive size such as 224 or leave it unset")
    return ImageCollator(size, tuple(processor.mean), tuple(processor.std), int(processor.channels))
