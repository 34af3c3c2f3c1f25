"""Distillation losses (issue 13) against hand-computed values and their definitions, and the generalised JSD
against TRL 1.16's own `GKDTrainer.generalized_jsd_loss` on the same tensors."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.objectives.losses import classification_distillation_loss, hidden_cosine_loss, token_divergence


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_soft_labels_scale_with_temperature_squared_and_skip_unlabelled_rows_in_the_hard_term() -> None:
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]])
    labels = torch.tensor([1, -100])  # the second row is unlabelled
    temperature, alpha = 2.0, 0.3
    soft = sum(kl(softmax(t, temperature), softmax(s, temperature))
               for s, t in zip(student.tolist(), teacher.tolist())) / 2
    hard = -math.log(softmax(student[0].tolist())[1])  # the labelled row only
    expected = alpha * temperature ** 2 * soft + (1 - alpha) * hard
    got = classification_distillation_loss(student, teacher, labels, temperature, alpha)
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # No labelled row: the soft term alone; alpha = 0: plain cross-entropy on the labels.
    unlabelled = torch.tensor([-100, -100])
    assert float(classification_distillation_loss(student, teacher, unlabelled, temperature, alpha)) == pytest.approx(
        alpha * temperature ** 2 * soft, abs=1e-6)
    assert float(classification_distillation_loss(student, teacher, labels, temperature, 0.0)) == pytest.approx(
        hard, abs=1e-6)


def definitions(student: list[float], teacher: list[float], beta: float, temperature: float) -> dict[str, float]:
    p, q = softmax(teacher, temperature), softmax(student, temperature)
    mixture = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return {"forward_kl": kl(p, q), "reverse_kl": kl(q, p),
            "jsd": beta * kl(p, mixture) + (1 - beta) * kl(q, mixture) if 0 < beta < 1 else None}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_divergences_match_their_definitions_and_skip_masked_positions(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    kept = [(row, column) for row in range(2) for column in range(3) if mask[row, column]]
    for beta in (0.0, 0.5, 1.0):
        per_position = [definitions(student[r, c].tolist(), teacher[r, c].tolist(), beta, temperature)
                        for r, c in kept]
        expected = {name: sum(d[name] for d in per_position) / len(kept) for name in ("forward_kl", "reverse_kl")}
        if beta == 0.5:
            expected["jsd"] = sum(d["jsd"] for d in per_position) / len(kept)
        else:  # GKD (and TRL): beta 0 is the forward KL, beta 1 the reverse KL
            expected["jsd"] = expected["forward_kl" if beta == 0.0 else "reverse_kl"]
        for name, value in expected.items():
            got = token_divergence(student, teacher, mask, name, beta, temperature)
            assert float(got) == pytest.approx(value, abs=1e-6), (name, beta)
    # Logits at masked positions do not matter.
    changed = student.clone()
    changed[~mask] = 100.0
    assert torch.equal(token_divergence(changed, teacher, mask, "jsd", 0.5), token_divergence(student, teacher, mask,
                                                                                              "jsd", 0.5))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalised_jsd_equals_trl_gkd(beta: float, monkeypatch) -> None:
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 4, 11, generator=generator), torch.randn(3, 4, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 4), generator=generator)
    labels[0, :2] = labels[2, 3] = -100
    expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=0.9)
    got = token_divergence(student, teacher, labels != -100, "jsd", beta, temperature=0.9)
    assert float(got) == pytest.approx(float(expected), abs=1e-6)


def test_hidden_cosine_is_one_minus_cosine_over_real_tokens() -> None:
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [2.0, 2.0], [-1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the padded third token is ignored
    assert float(hidden_cosine_loss(student, teacher, mask)) == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)
