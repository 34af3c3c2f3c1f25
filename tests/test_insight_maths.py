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


def lora_tuned_tiny_llama():
    """A tiny Llama and a LoRA-tuned copy whose B factors are non-zero, folded into plain weights; with the
    layers' (B, A, scaling) to recompute ΔW by hand."""
    import copy

    import deltatune
    from deltatune.adapters import adapter_layers, merge_and_unload
    from tests.tiny_models import tiny_llama

    torch.manual_seed(0)
    base = tiny_llama()
    tuned = copy.deepcopy(base)
    deltatune.apply(tuned, {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    expected = {}
    for name, layer in adapter_layers(tuned).items():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        expected[f"{name}.weight"] = layer._delta("default").detach().clone()
    merge_and_unload(tuned)
    return base, tuned, expected


def test_weight_changes_of_a_lora_run_are_the_merged_update() -> None:
    from deltatune.insight.changes import change_by_block, weight_changes
    from deltatune.models.families import family_of

    base, tuned, expected = lora_tuned_tiny_llama()
    changes = {change.name: change for change in weight_changes(base, tuned, family_of(base))}
    assert set(changes) == set(expected)  # only the q projections moved
    base_state = base.state_dict()
    for name, delta in expected.items():
        assert changes[name].relative == pytest.approx(
            float(torch.linalg.norm(delta) / torch.linalg.norm(base_state[name])), rel=1e-5)
        assert changes[name].effective_rank <= 4.0 + 1e-6  # a rank-4 update
        assert changes[name].block is not None
    per_block = change_by_block(list(changes.values()), 2)
    assert all(value > 0 for value in per_block)


def test_block_features_pool_real_tokens_and_a_model_is_identical_to_itself() -> None:
    from deltatune.insight.representations import block_features, relative_feature_change
    from tests.tiny_models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama().eval()
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[:3, 5:] = 0
    batches = [{"input_ids": torch.randint(0, 100, (6, 7)), "attention_mask": mask}]
    features = block_features(model, batches)
    assert len(features) == model.config.num_hidden_layers and features[0].shape == (6, model.config.hidden_size)
    padded = batches[0]["input_ids"].clone()
    padded[:3, 5:] = 0  # what sits under the padding does not reach the pooled features of the real tokens
    again = block_features(model, [{"input_ids": padded, "attention_mask": mask}])
    assert torch.allclose(features[0], again[0], atol=1e-5)
    assert relative_feature_change(features, features) == [0.0] * len(features)
    assert linear_cka(features[-1], features[-1]) == pytest.approx(1.0)


def test_pooled_features_leave_out_virtual_tokens_where_they_were_inserted() -> None:
    """A prompt after [CLS] (insert_at 1): the 2 virtual positions sit at 1 and 2, not at the start."""
    from deltatune.insight.representations import pooled

    real = torch.randn(1, 4, 3)
    with_prompt = torch.cat([real[:, :1], torch.full((1, 2, 3), 100.0), real[:, 1:]], dim=1)
    mask = torch.ones(1, 4, dtype=torch.long)
    assert torch.allclose(pooled(with_prompt, mask, insert_at=1), real.mean(dim=1))
    assert torch.allclose(pooled(torch.cat([torch.full((1, 2, 3), 100.0), real], 1), mask), real.mean(dim=1))


def test_intruder_dimensions_of_a_gpt2_conv1d_are_counted_on_its_output_side() -> None:
    """Conv1D stores (in, out): its intruders must equal those of the Linear holding the transposed weight."""
    from transformers.pytorch_utils import Conv1D

    from deltatune.insight.changes import weight_changes
    from deltatune.models.families import FAMILIES

    torch.manual_seed(0)
    before, delta = torch.randn(16, 48), 3 * torch.randn(16, 2) @ torch.randn(2, 48)
    models = {}
    for kind in ("conv1d", "linear"):
        pair = []
        for weight in (before, before + delta):
            layer = Conv1D(48, 16) if kind == "conv1d" else torch.nn.Linear(16, 48, bias=False)
            layer.weight.data = weight.clone() if kind == "conv1d" else weight.T.clone()
            pair.append(torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.ModuleDict({"proj": layer})])}))
        models[kind] = weight_changes(*pair, FAMILIES["generic"], top_k=4)[0].intruders
    assert models["conv1d"] == models["linear"]
