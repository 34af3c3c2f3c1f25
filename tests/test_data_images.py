"""Image classification data: aliases, image folders, lazy decoding and per-batch resizing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deltatune.config.schema import DataConfig, SplitConfig
from deltatune.data import ImageProcessor
from deltatune.tasks import build_datasets
from deltatune.data.images import ImageCollator, array_to_chw
from deltatune.errors import UserError


def write_image_folder(root: Path, per_class: dict[str, int]) -> Path:
    from PIL import Image

    for index, (name, count) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            size = (6 + i, 5)  # sizes differ, so the collate must resize images one by one
            Image.fromarray(np.full((size[1], size[0], 3), 100 * index, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_mnist_examples_stay_small_and_collate_normalises() -> None:
    processor = ImageProcessor(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3)
    bundle = build_datasets(DataConfig(name="mnist-5k"), "image-classification", processor)
    assert [len(bundle.train), len(bundle.validation), len(bundle.test)] == [4000, 500, 500]
    assert bundle.num_labels == 10 and bundle.label_names == [str(d) for d in range(10)]
    example = bundle.train[0]
    assert example["image"].dtype == torch.uint8 and example["image"].shape == (1, 28, 28)  # raw, not resized
    batch = bundle.collate(bundle.train[:8])
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [e["labels"] for e in bundle.train[:8]]
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])  # grey replicated


def test_digits_with_image_size_override() -> None:
    processor = ImageProcessor(image_size=224, channels=1, mean=(0.0,), std=(1.0,))
    bundle = build_datasets(DataConfig(name="digits", image_size=16), "image-classification", processor)
    assert sum(len(part) for part in (bundle.train, bundle.validation, bundle.test)) == 1797
    assert bundle.collate(bundle.test[:4])["pixel_values"].shape == (4, 1, 16, 16)


def test_collate_values_exact() -> None:
    collate = ImageCollator(image_size=2, mean=(0.5,), std=(0.25,), channels=1)
    image = torch.full((1, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(collate([{"image": image, "labels": 0}])["pixel_values"], torch.full((1, 1, 2, 2), 2.0))
    rgb = torch.zeros((3, 2, 2), dtype=torch.uint8)
    rgb[0] = 255  # pure red -> luminance 0.299
    out = collate([{"image": rgb, "labels": 1}])["pixel_values"]
    assert torch.allclose(out, torch.full((1, 1, 2, 2), (0.299 - 0.5) / 0.25), atol=1e-6)


def test_array_conversion() -> None:
    assert array_to_chw(np.zeros((4, 5), dtype=np.uint8)).shape == (1, 4, 5)
    assert array_to_chw(np.ones((4, 5, 3), dtype=np.float32)).max() == 255
    with pytest.raises(UserError, match="image array has shape"):
        array_to_chw(np.zeros((2, 3, 4, 5)))


def test_image_folder_build(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", {"dog": 4, "cat": 3})
    cfg = DataConfig(name=str(root), split=SplitConfig(validation=0.2, test=0.2))
    bundle = build_datasets(cfg, "image-classification", ImageProcessor(image_size=8))
    assert bundle.label_names == ["cat", "dog"] and bundle.num_labels == 2
    assert isinstance(bundle.train[0]["image"], str)  # decoded lazily, in the collate function
    examples = bundle.train + bundle.validation + bundle.test
    batch = bundle.collate(examples)
    assert batch["pixel_values"].shape == (7, 3, 8, 8)
    for pixels, label in zip(batch["pixel_values"], batch["labels"].tolist()):
        expected = (100 / 255 - 0.5) / 0.5 if label == 0 else -1.0  # cat (id 0) was written grey, dog black
        assert torch.allclose(pixels, torch.full_like(pixels, expected), atol=1e-5)


def test_image_paths_in_jsonl_relative_to_file(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    rows = [{"file": f"img/{i}.png", "cls": i % 2} for i in range(4)]
    rows.append({"file": "img/missing.png", "cls": 0})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]), encoding="utf-8")
    cfg = DataConfig(name=str(path), columns={"image": "file", "label": "cls"}, split=SplitConfig(0.0, 0.0))
    bundle = build_datasets(cfg, "image-classification", ImageProcessor(image_size=4))
    assert bundle.collate(bundle.train)["pixel_values"].shape == (4, 3, 4, 4)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(UserError, match="image file img/missing.png not found"):
        build_datasets(cfg, "image-classification", ImageProcessor(image_size=4))


def test_corrupt_image_file_stops_the_build(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", {"a": 2, "b": 2})
    (root / "a" / "x.png").write_bytes(b"not a png")
    cfg = DataConfig(name=str(root), split=SplitConfig(0.0, 0.0))
    with pytest.raises(UserError, match="cannot decode .*x.png"):
        build_datasets(cfg, "image-classification", ImageProcessor(image_size=4))


def test_image_damaged_after_the_build_is_one_line_at_decode(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", {"a": 2, "b": 2})
    cfg = DataConfig(name=str(root), split=SplitConfig(0.0, 0.0))
    bundle = build_datasets(cfg, "image-classification", ImageProcessor(image_size=4))
    whole = (root / "a" / "0.png").read_bytes()
    (root / "a" / "0.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cannot decode .*0.png \(.*\); remove or re-save") as caught:
        bundle.collate(bundle.train)
    assert "\n" not in str(caught.value)


def test_image_task_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs an image model"):
        build_datasets(DataConfig(name="digits"), "image-classification", object())
    with pytest.raises(UserError, match=r"column 'text' \(data.columns.text\) not found.*'image', 'label'"):
        build_datasets(DataConfig(name="digits"), "classification", lambda *a, **k: None)


def test_pil_images_in_any_mode_become_what_they_show() -> None:
    import io

    from PIL import Image

    from deltatune.data.images import decode_file, prepare_image_value

    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red
    red = Image.fromarray(rgb)
    assert prepare_image_value(red.convert("CMYK"), None)[:, 0, 0].tolist() == [200, 0, 0]  # K not lost
    palette = prepare_image_value(red.convert("P"), None)  # the palette's colour, not its index read as grey
    assert palette.shape[0] == 3 and palette[0, 0, 0] > 150 and palette[1:, 0, 0].tolist() == [0, 0]
    assert prepare_image_value(red.convert("LA"), None).shape[0] == 2  # grey + alpha kept for the collator
    grey16 = Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16))  # mode I;16: scaled by its range, not clipped
    assert prepare_image_value(grey16, None)[:, 0, 0].tolist() == [117]
    encoded = io.BytesIO()
    grey16.save(encoded, format="PNG")
    assert decode_file(encoded.getvalue(), 3)[:, 0, 0].tolist() == [117, 117, 117]
    assert prepare_image_value(Image.fromarray(np.full((4, 4), 30000, dtype=np.int32)), None)[0, 0, 0] == 117
    with pytest.raises(UserError, match=r"outside 0\.\.65535; save it as an 8- or 16-bit image"):
        prepare_image_value(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)), None)


def test_eight_bit_int_pixels_sixteen_bit_arrays_float_images_and_exif_orientation() -> None:
    import io

    from PIL import Image

    from deltatune.data.images import array_to_chw, decode_file, pil_to_chw

    eight_bit_as_int32 = Image.fromarray(np.arange(0, 253, dtype=np.int32).reshape(11, 23))  # mode "I"
    assert int(pil_to_chw(eight_bit_as_int32).max()) == 252  # 8-bit data, not divided by 257
    assert int(array_to_chw(np.full((4, 4), 30000, dtype=np.uint16)).max()) == 117  # scaled like a 16-bit PNG
    half = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))  # mode "F": 0..1, as an array would be read
    assert int(pil_to_chw(half).max()) == 128 and pil_to_chw(half, 3).shape == (3, 4, 4)
    landscape = Image.new("RGB", (20, 10))
    exif = landscape.getexif()
    exif[0x0112] = 6  # "rotate 90° to display": the camera held upright
    encoded = io.BytesIO()
    landscape.save(encoded, "JPEG", exif=exif)
    assert decode_file(encoded.getvalue(), 3).shape == (3, 20, 10)  # as it is shown: 10 wide, 20 high
