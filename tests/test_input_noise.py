"""Noisy Student's input noise (deltatune/data/noise.py): what it may and may not touch."""

import torch

from deltatune.data.noise import noised_inputs


def test_token_dropout_hides_only_inner_real_tokens_at_the_rate_asked():
    torch.manual_seed(0)
    mask = torch.ones(64, 40, dtype=torch.long)
    mask[:32, 30:] = 0  # right padding
    mask[32:, :5] = 0  # left padding
    batch = {"input_ids": torch.arange(64 * 40).view(64, 40), "attention_mask": mask}
    noised = noised_inputs(batch, 0.25)
    assert torch.equal(batch["attention_mask"], mask) and noised["input_ids"] is batch["input_ids"]
    hidden = (mask == 1) & (noised["attention_mask"] == 0)
    assert not ((mask == 0) & (noised["attention_mask"] == 1)).any()  # padding stays padding
    assert not hidden[:, 0].any() and not hidden[:32, 29].any()  # the first and last real token of each row stay
    assert not hidden[32:, 5].any() and not hidden[32:, 39].any()
    inner = mask.sum() - 2 * 64
    assert abs(hidden.sum().item() / inner.item() - 0.25) < 0.03


def test_cutout_zeroes_one_square_of_the_asked_area_per_image():
    torch.manual_seed(0)
    pixels = torch.full((8, 3, 20, 20), 0.7)
    noised = noised_inputs({"pixel_values": pixels, "labels": torch.zeros(8)}, 0.25)["pixel_values"]
    assert (pixels == 0.7).all()
    zeroed = noised == 0
    assert torch.equal(zeroed[:, 0], zeroed[:, 2])  # the same square on every channel
    assert (zeroed[:, 0].flatten(1).sum(dim=1) == 100).all()  # 10 x 10 of 20 x 20
    rows, columns = zeroed[:, 0].any(dim=2), zeroed[:, 0].any(dim=1)
    assert (rows.sum(dim=1) == 10).all() and (columns.sum(dim=1) == 10).all()  # one square, not scattered pixels


def test_no_noise_is_the_batch_itself():
    batch = {"attention_mask": torch.ones(2, 3)}
    assert noised_inputs(batch, 0.0) is batch
