"""The loss functions of preference learning and RLHF (deltatune.objectives.losses) against values computed by hand.

Every expected number is written out here with the arithmetic that gives it, on tensors small enough to check on
paper. tests/test_objective_losses_trl.py compares the same functions with TRL's own implementation.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from deltatune.errors import UserError
from deltatune.objectives.losses import (
    KLController,
    adaptive_kl_coefficient,
    clipped_policy_loss,
    clipped_value_loss,
    dpo_loss,
    entropy_from_logits,
    gae_advantages_and_returns,
    kl_penalised_rewards,
    kl_per_token,
    masked_mean,
    masked_whiten,
    mean_margin,
    pairwise_accuracy,
    response_lengths,
    reward_pairwise_loss,
    sequence_logprobs,
    token_logprobs,
)

LN2 = math.log(2)


def tensor(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual: torch.Tensor | float, expected: list[float] | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# --- log-probabilities --------------------------------------------------------------------------------------------

def two_row_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Position 0 is uniform over 3 tokens (log p = −ln 3 each); position 1 has p = (¼, ½, ¼); position 2 unused."""
    position = torch.tensor([[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [5.0, -5.0, 1.0]])
    logits = torch.stack([position, position])
    # Row 0 scores token 2 after position 0 and token 1 after position 1; row 1 only token 0 after position 1.
    labels = torch.tensor([[-100, 2, 1], [-100, -100, 0]])
    return logits, labels


def test_token_logprobs_shift_by_one_and_zero_the_ignored_positions() -> None:
    logits, labels = two_row_logits()
    logprobs, mask = token_logprobs(logits, labels)
    assert mask.tolist() == [[True, True], [False, True]]
    assert_close(logprobs, [[-math.log(3), math.log(0.5)], [0.0, math.log(0.25)]])


def test_sequence_logprobs_sum_or_average_over_the_response() -> None:
    logits, labels = two_row_logits()
    assert_close(sequence_logprobs(logits, labels), [-math.log(6), math.log(0.25)])  # −ln 3 + ln ½ = −ln 6
    assert_close(sequence_logprobs(logits, labels, average=True), [-math.log(6) / 2, math.log(0.25)])
    assert response_lengths(labels).tolist() == [2, 1]


def test_sequence_logprobs_of_half_precision_logits_are_float32_and_differentiable() -> None:
    logits, labels = two_row_logits()
    half = logits.to(torch.bfloat16).requires_grad_()
    summed = sequence_logprobs(half, labels)
    assert summed.dtype == torch.float32
    assert_close(summed, [-math.log(6), math.log(0.25)], atol=1e-2)
    summed.sum().backward()
    assert half.grad is not None and half.grad[:, 2].abs().sum() == 0  # the last position predicts nothing


def test_entropy_from_logits() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, LN2, 0.0, -math.inf]])
    # Uniform over 4: ln 4. p = (¼, ½, ¼, 0): −(2·¼ ln ¼ + ½ ln ½) = 1.5 ln 2.
    logits.requires_grad_()
    entropies = entropy_from_logits(logits)
    assert_close(entropies, [math.log(4), 1.5 * LN2])
    entropies.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert_close(logits.grad[0], [0.0] * 4)  # the uniform distribution is the maximum of H
    assert entropy_from_logits(torch.zeros(2, 3, 5)).shape == (2, 3)


# --- reward model ------------------------------------------------------------------------------------------------

def test_reward_loss_with_margin_and_centring() -> None:
    chosen, rejected, margin = tensor(2.0, 0.5), tensor(1.0, 1.5), tensor(0.5, 0.0)
    # differences − margin: 2 − 1 − 0.5 = 0.5 and 0.5 − 1.5 − 0 = −1; −log σ(x) = log(1 + e^−x)
    bradley_terry = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) / 2
    assert_close(bradley_terry, 0.8936693358)
    assert_close(reward_pairwise_loss(chosen, rejected, margin), bradley_terry)
    # centring: 0.01 · mean((2 + 1)², (0.5 + 1.5)²) = 0.01 · (9 + 4) / 2 = 0.065
    assert_close(reward_pairwise_loss(chosen, rejected, margin, center_rewards_coefficient=0.01), 0.9586693358)
    # without the margin the differences are 1 and −1: (0.3132616875 + 1.3132616875) / 2
    assert_close(reward_pairwise_loss(chosen, rejected), 0.8132616875)


def test_reward_loss_of_equal_rewards_is_ln2_and_its_gradient_pushes_them_apart() -> None:
    chosen, rejected = tensor(0.3, -1.0).requires_grad_(), tensor(0.3, -1.0).requires_grad_()
    loss = reward_pairwise_loss(chosen, rejected)
    assert_close(loss, LN2)
    loss.backward()
    assert_close(chosen.grad, [-0.25, -0.25])  # d/dr_c of mean −log σ(r_c − r_r) at 0: −σ(0)/2
    assert_close(rejected.grad, [0.25, 0.25])


def test_pairwise_accuracy_and_mean_margin() -> None:
    chosen, rejected = tensor(3.0, 0.5, 1.0), tensor(1.0, 1.5, 1.0)
    assert_close(pairwise_accuracy(chosen, rejected), 1 / 3)  # a tie counts as wrong
    assert_close(mean_margin(chosen, rejected), (2.0 - 1.0 + 0.0) / 3)


# --- DPO ---------------------------------------------------------------------------------------------------------

# Pair 0: ρ_c = −10 − (−11) = 1, ρ_r = −12 − (−11) = −1, so h = 2 and with β = 0.5, βh = 1.
# Pair 1: policy = reference, so h = 0.
POLICY_CHOSEN, POLICY_REJECTED = tensor(-10.0, -5.0), tensor(-12.0, -7.0)
REFERENCE_CHOSEN, REFERENCE_REJECTED = tensor(-11.0, -5.0), tensor(-11.0, -7.0)
SOFTPLUS_MINUS_1 = math.log(1 + math.exp(-1.0))  # −log σ(1) = 0.3132616875
SOFTPLUS_1 = math.log(1 + math.exp(1.0))  # −log σ(−1) = 1.3132616875


def dpo(loss_type: str, **options: float | torch.Tensor) -> torch.Tensor:
    return dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.5,
                    loss_type=loss_type, **options).losses  # type: ignore[arg-type]


def test_dpo_sigmoid_and_its_conservative_form() -> None:
    assert_close(dpo("sigmoid"), [SOFTPLUS_MINUS_1, LN2])
    # ε = 0.1: 0.9 · 0.3132616875 + 0.1 · 1.3132616875 = 0.4132616875; at h = 0 still ln 2
    assert_close(dpo("sigmoid", label_smoothing=0.1), [0.4132616875, LN2])


def test_dpo_ipo_plain_and_length_normalised() -> None:
    # (h − 1/(2β))² with 1/(2β) = 1: (2 − 1)² = 1 and (0 − 1)² = 1
    assert_close(dpo("ipo"), [1.0, 1.0])
    # lengths 2 and 4: h = 1/2 − (−1)/4 = 0.75, (0.75 − 1)² = 0.0625; pair 1 still h = 0
    lengths = {"chosen_lengths": tensor(2, 3), "rejected_lengths": tensor(4, 5)}
    assert_close(dpo("ipo", **lengths), [0.0625, 1.0])
    assert_close(dpo("sigmoid", **lengths), [SOFTPLUS_MINUS_1, LN2])  # lengths only change ipo


def test_dpo_hinge_and_robust() -> None:
    assert_close(dpo("hinge"), [0.0, 1.0])  # max(0, 1 − βh): 1 − 1 = 0 and 1 − 0 = 1
    # ((1 − ε)·0.3132616875 − ε·1.3132616875) / (1 − 2ε) with ε = 0.1 = 0.1882616875; at h = 0: ln 2
    assert_close(dpo("robust", label_smoothing=0.1), [0.1882616875, LN2])
    assert_close(dpo("robust"), [SOFTPLUS_MINUS_1, LN2])  # ε = 0 is plain DPO


def test_dpo_rewards_are_beta_times_the_detached_log_ratios() -> None:
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    output = dpo_loss(policy_chosen, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.5)
    assert_close(output.chosen_rewards, [0.5, 0.0])
    assert_close(output.rejected_rewards, [-0.5, 0.0])
    assert not output.chosen_rewards.requires_grad
    output.losses.sum().backward()
    # d/dπ_c of −log σ(βh) = −β σ(−βh): −0.5 σ(−1) = −0.1344707 and −0.5 · ½ = −0.25
    assert_close(policy_chosen.grad, [-0.5 / (1 + math.e), -0.25])


def test_dpo_at_initialisation_is_ln2_per_pair() -> None:
    logps = tensor(-3.0, -40.0, -7.5)
    assert_close(dpo_loss(logps, logps - 2, logps, logps - 2, beta=0.1).losses, [LN2] * 3)


@pytest.mark.parametrize("options, fragment", [
    ({"loss_type": "kto"}, "unknown DPO loss_type 'kto'; valid: sigmoid, ipo, hinge, robust"),
    ({"beta": 0.0}, "beta must be a positive number"),
    ({"beta": math.nan}, "beta must be a positive number"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing applies to loss_type sigmoid or robust"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing is a label-flip probability in [0, 0.5)"),
    ({"label_smoothing": -0.1}, "label_smoothing is a label-flip probability"),
])
def test_dpo_bad_options_are_one_line_user_errors(options: dict, fragment: str) -> None:
    with pytest.raises(UserError) as raised:
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, **options)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


# --- PPO ---------------------------------------------------------------------------------------------------------

def test_masked_mean_and_whitening() -> None:
    values, mask = tensor(1.0, 2.0, 3.0, 100.0).unsqueeze(0), torch.tensor([[True, True, True, False]])
    assert_close(masked_mean(values, mask), 2.0)
    # mean 2, unbiased variance ((−1)² + 0 + 1²) / (3 − 1) = 1, so (x − 2)/1; the padded 100 becomes 0
    assert_close(masked_whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]])
    assert_close(masked_whiten(values, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])
    assert_close(masked_whiten(tensor(5.0, 7.0).unsqueeze(0), torch.tensor([[True, False]])), [[0.0, 0.0]])
    assert_close(masked_mean(values, torch.zeros_like(mask)), 0.0)


def test_gae_over_a_response_that_ends_before_the_padding() -> None:
    rewards, values = tensor(0.0, 1.0, 5.0).unsqueeze(0), tensor(0.5, 0.2, 9.0).unsqueeze(0)
    mask = torch.tensor([[True, True, False]])
    advantages, returns = gae_advantages_and_returns(rewards, values, mask, gamma=0.9, lam=0.8)
    # t = 1 (last token, V_2 = 0): δ = 1 + 0.9·0 − 0.2 = 0.8, A = 0.8
    # t = 0: δ = 0 + 0.9·0.2 − 0.5 = −0.32, A = −0.32 + 0.9·0.8·0.8 = 0.256
    assert_close(advantages, [[0.256, 0.8, 0.0]])
    assert_close(returns, [[0.256 + 0.5, 0.8 + 0.2, 0.0]])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards, values = tensor(1.0, 2.0, 3.0).unsqueeze(0), tensor(0.5, 0.5, 0.5).unsqueeze(0)
    advantages, returns = gae_advantages_and_returns(rewards, values, torch.ones(1, 3, dtype=torch.bool), 1.0, 1.0)
    assert_close(returns, [[6.0, 5.0, 3.0]])  # Monte Carlo returns
    assert_close(advantages, [[5.5, 4.5, 2.5]])


def test_kl_estimators_k1_and_k3() -> None:
    policy, reference = tensor(-1.0, -2.0), tensor(-1.5, -1.0)  # log r = reference − policy = (−0.5, 1)
    assert_close(kl_per_token(policy, reference, "k1"), [0.5, -1.0])
    # (r − 1) − log r: e^−0.5 − 1 + 0.5 = 0.1065306597, e − 1 − 1 = 0.7182818285
    assert_close(kl_per_token(policy, reference, "k3"), [0.1065306597, 0.7182818285])
    assert_close(kl_per_token(policy, policy, "k3"), [0.0, 0.0])
    with pytest.raises(UserError, match="unknown KL estimator 'k2'; valid: k1, k3"):
        kl_per_token(policy, reference, "k2")


def test_kl_penalised_rewards_put_the_score_on_the_last_response_token() -> None:
    policy, reference = tensor(-1.0, -2.0, -3.0).unsqueeze(0), tensor(-1.5, -1.0, 0.0).unsqueeze(0)
    rows_policy, rows_reference = torch.cat([policy, policy]), torch.cat([reference, reference])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    rewards, kl = kl_penalised_rewards(tensor(2.0, 4.0), rows_policy, rows_reference, mask, kl_coef=0.1)
    # k1 = (0.5, −1): −0.1·0.5 = −0.05; −0.1·(−1) + 2 = 2.1; the empty second row gets nothing
    assert_close(rewards, [[-0.05, 2.1, 0.0], [0.0, 0.0, 0.0]])
    assert_close(kl, [[0.5, -1.0, 0.0], [0.0, 0.0, 0.0]])


def test_clipped_policy_loss_clip_fraction_and_approx_kl() -> None:
    logprobs = torch.log(tensor(1.5, 0.5, 1.1)).unsqueeze(0)  # old log-probs 0, so the ratios are 1.5, 0.5, 1.1
    advantages, mask = tensor(1.0, 1.0, -1.0).unsqueeze(0), torch.ones(1, 3, dtype=torch.bool)
    output = clipped_policy_loss(logprobs, torch.zeros(1, 3), advantages, mask, cliprange=0.2)
    # max(−Aρ, −A clip(ρ, 0.8, 1.2)): max(−1.5, −1.2) = −1.2 (clipped); max(−0.5, −0.8) = −0.5; max(1.1, 1.1) = 1.1
    assert_close(output.loss, (-1.2 - 0.5 + 1.1) / 3)
    assert_close(output.clip_fraction, 1 / 3)
    assert_close(output.approx_kl, 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3)
    padded = clipped_policy_loss(torch.cat([logprobs, tensor(9.0).unsqueeze(0)], 1), torch.zeros(1, 4),
                                 torch.cat([advantages, tensor(5.0).unsqueeze(0)], 1),
                                 torch.tensor([[True, True, True, False]]), cliprange=0.2)
    assert_close(padded.loss, output.loss)  # a padded position changes nothing
    assert_close(padded.approx_kl, output.approx_kl)


def test_clipped_policy_loss_gradient_is_zero_on_clipped_tokens() -> None:
    logprobs = torch.log(tensor(1.5, 0.5)).unsqueeze(0).requires_grad_()
    clipped_policy_loss(logprobs, torch.zeros(1, 2), tensor(1.0, 1.0).unsqueeze(0), torch.ones(1, 2)).loss.backward()
    assert_close(logprobs.grad, [[0.0, -0.5 / 2]])  # d(−Aρ)/d log π = −Aρ, averaged over 2 tokens


def test_clipped_value_loss() -> None:
    values, old_values, returns = tensor(1.0, 0.0).unsqueeze(0), tensor(0.5, 0.0).unsqueeze(0), tensor(2.0, 1.0)
    output = clipped_value_loss(values, old_values, returns.unsqueeze(0), torch.ones(1, 2), cliprange_value=0.2)
    # t0: clip(1, 0.3, 0.7) = 0.7, max((1 − 2)², (0.7 − 2)²) = 1.69 (clipped); t1: clip(0, −0.2, 0.2) = 0, 1
    assert_close(output.loss, 0.5 * (1.69 + 1.0) / 2)
    assert_close(output.clip_fraction, 0.5)


def test_adaptive_kl_coefficient_moves_towards_the_target_by_at_most_20_percent() -> None:
    # KL 9 vs target 6: error clip(0.5) = 0.2, 0.2 · (1 + 0.2 · 256/10000) = 0.201024
    assert_close(adaptive_kl_coefficient(0.2, 9.0, 6.0, 10000, 256), 0.201024)
    # KL 5.7: error −0.05, 0.2 · (1 − 0.05 · 256/10000) = 0.199744
    assert_close(adaptive_kl_coefficient(0.2, 5.7, 6.0, 10000, 256), 0.199744)
    controller = KLController(0.2, target=6.0, horizon=10000)
    controller.update(9.0, 256)
    controller.update(9.0, 256)
    assert_close(controller.coefficient, 0.2 * 1.00512**2)
    assert KLController(**dataclasses.asdict(controller)) == controller  # its state round-trips as plain floats
    fixed = KLController(0.05)
    assert fixed.update(100.0, 256) == 0.05


@pytest.mark.parametrize("options", [{"coefficient": -0.1}, {"coefficient": 0.1, "target": 0.0},
                                     {"coefficient": 0.1, "target": 6.0, "horizon": 0.0}])
def test_kl_controller_rejects_impossible_settings(options: dict) -> None:
    with pytest.raises(UserError):
        KLController(**options)


def test_next_token_loss_of_a_batch_without_response_tokens_is_zero_not_nan() -> None:
    """Such a micro-batch weighs 0 in a step (its loss units); nan × 0 would still be nan and stop the run."""
    from deltatune.objectives.causal_lm import next_token_loss

    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = next_token_loss(logits, torch.full((2, 5), -100))
    (loss * 0.0).backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    labels = torch.randint(0, 11, (2, 5))
    assert next_token_loss(logits, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)).item(), rel=1e-6)
