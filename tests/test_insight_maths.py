"""The numbers of the what-changed report (issue 14), on small tensors: CKA identities and its agreement with
Kornblith et al.'s reference formula; weight-change statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deltatune.insight.similarity import cka_matrix, linear_cka
from deltatune.insight.weights import effective_rank, intruder_dimensions, relative_change


def reference_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s `feature_space_linear_cka(..., debiased=True)` (their Colab), transcribed."""
    def debiased(xty, rows_x, rows_y, norm_x, norm_y, n):
        return xty - n / (n - 2.0) * rows_x.dot(rows_y) + norm_x * norm_y / ((n - 1) * (n - 2))

    x, y = x - x.mean(0, keepdims=True), y - y.mean(0, keepdims=True)
    n = x.shape[0]
    rows_x, rows_y = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    similarity = debiased(np.linalg.norm(x.T @ y) ** 2, rows_x, rows_y, rows_x.sum(), rows_y.sum(), n)
    norm_x = np.sqrt(debiased(np.linalg.norm(x.T @ x) ** 2, rows_x, rows_x, rows_x.sum(), rows_x.sum(), n))
    norm_y = np.sqrt(debiased(np.linalg.norm(y.T @ y) ** 2, rows_y, rows_y, rows_y.sum(), rows_y.sum(), n))
    return float(similarity / (norm_x * norm_y))


def test_cka_of_a_representation_with_itself_rotated_and_scaled_is_one() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 32)
    rotation, _ = torch.linalg.qr(torch.randn(32, 32))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-9)


def test_cka_of_unrelated_features_is_near_zero_and_matches_the_reference() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(300, 64), torch.randn(300, 48)
    assert abs(linear_cka(x, y)) < 0.02
    related = x[:, :48] + 0.5 * torch.randn(300, 48)
    assert linear_cka(x, related) == pytest.approx(reference_debiased_cka(x.double().numpy(),
                                                                           related.double().numpy()), abs=1e-9)
    assert 0.3 < linear_cka(x, related) < 1.0


def test_the_cka_matrix_holds_each_pair_of_layers() -> None:
    torch.manual_seed(0)
    layers = [torch.randn(50, 8) for _ in range(3)]
    matrix = cka_matrix(layers, layers[::-1])
    for i in range(3):
        for j in range(3):
            assert float(matrix[i, j]) == pytest.approx(linear_cka(layers[i], layers[2 - j]), abs=1e-9)
    assert float(matrix[0, 2]) == pytest.approx(1.0)


def test_weight_change_statistics_by_hand() -> None:
    base = torch.eye(4)
    tuned = base.clone()
    tuned[0, 0] = 2.0  # ΔW has one entry, 1.0; ‖W‖_F = 2
    assert relative_change(base, tuned) == pytest.approx(0.5)
    assert effective_rank(tuned - base) == pytest.approx(1.0)
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0]))) == pytest.approx(3.0)
    uneven = torch.diag(torch.tensor([3.0, 1.0]))  # p = (0.75, 0.25)
    assert effective_rank(uneven) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_intruder_dimensions_count_new_directions_only() -> None:
    torch.manual_seed(0)
    base = torch.randn(64, 64)
    assert intruder_dimensions(base, 1.5 * base) == 0  # the same directions, scaled
    assert intruder_dimensions(base, base + 0.01 * torch.randn(64, 64)) == 0  # a small nudge
    direction = torch.nn.functional.normalize(torch.randn(64), dim=0)  # a random direction of R^64 is far from
    # every base direction (|cos| ~ 0.3 at most)
    tuned = base + 100.0 * torch.outer(direction, torch.nn.functional.normalize(torch.randn(64), dim=0))
    assert intruder_dimensions(base, tuned, top_k=1) == 1
    assert intruder_dimensions(base, tuned, top_k=1, threshold=0.01) == 0
