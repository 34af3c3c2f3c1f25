"""The fused LoRA linear (`deltatune/methods/lora/fused_linear.py`) against autograd on the composed formula."""

import pytest
import torch

import deltatune
from deltatune.methods.lora.fused_linear import fused_lora_linear, keep_mask, keep_probability


def composed(x, weight, bias, lora_A, lora_B, scaling, keep, p, fan_in_fan_out):
    """y = x W + b + s/(1-p)·((x ⊙ k) Aᵀ) Bᵀ written with plain autograd ops."""
    base_weight = weight.t() if fan_in_fan_out else weight
    dropped = x if keep is None else x * keep / (1 - p)
    return torch.nn.functional.linear(x, base_weight, bias) + scaling * (dropped @ lora_A.t()) @ lora_B.t()


def make(fan_in_fan_out, with_bias, dtype=torch.float64):
    torch.manual_seed(0)
    fan_in, fan_out, r = 6, 5, 3
    weight = torch.randn((fan_in, fan_out) if fan_in_fan_out else (fan_out, fan_in), dtype=dtype)
    bias = torch.randn(fan_out, dtype=dtype, requires_grad=True) if with_bias else None
    lora_A = torch.randn(r, fan_in, dtype=dtype, requires_grad=True)
    lora_B = torch.randn(fan_out, r, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 4, fan_in, dtype=dtype, requires_grad=True)
    return x, weight, bias, lora_A, lora_B


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck(fan_in_fan_out, with_bias, p):
    x, weight, bias, lora_A, lora_B = make(fan_in_fan_out, with_bias)

    def function(x, lora_A, lora_B, *maybe_bias):
        torch.manual_seed(1)  # the same dropout mask on every call, so finite differences are meaningful
        return fused_lora_linear(x, weight, maybe_bias[0] if maybe_bias else None, lora_A, lora_B, 0.7, p,
                                 fan_in_fan_out)

    inputs = (x, lora_A, lora_B) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(function, inputs)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_composed_formula_with_the_same_mask(fan_in_fan_out, p):
    x, weight, bias, lora_A, lora_B = make(fan_in_fan_out, True, torch.float32)
    torch.manual_seed(3)
    fused = fused_lora_linear(x, weight, bias, lora_A, lora_B, 2.0, p, fan_in_fan_out)
    fused_grads = torch.autograd.grad(fused.square().sum(), (x, bias, lora_A, lora_B))
    torch.manual_seed(3)  # the mask the fused function drew, from the default generator
    keep, keep_probability = keep_mask(x.shape, p, x.device) if p else (None, 1.0)
    reference = composed(x, weight, bias, lora_A, lora_B, 2.0, keep, 1 - keep_probability, fan_in_fan_out)
    reference_grads = torch.autograd.grad(reference.square().sum(), (x, bias, lora_A, lora_B))
    torch.testing.assert_close(fused, reference)
    for got, expected in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_dropout_rate_and_rescale():
    """About p of the inputs are dropped and the kept ones are scaled by 1/(1-p): with A = I, B = I, W = 0 the layer
    returns s·dropout(x)."""
    torch.manual_seed(0)
    n, p = 64, 0.2
    x = torch.ones(4096, n)
    eye = torch.eye(n)
    out = fused_lora_linear(x, torch.zeros(n, n), None, eye, eye, 1.0, p, False)
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), rtol=2e-5, atol=0)
    assert abs((out == 0).float().mean().item() - p) < 0.01


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_keep_mask_rate_is_unbiased(p):
    """The mask keeps q ≈ 1-p of the elements (checked on 4M draws, 5 standard deviations), in every one of the
    four 16-bit words an int64 draw is cut into (all 64 bits are drawn), and the rescale 1/q makes the dropped
    input unbiased."""
    torch.manual_seed(0)
    keep, q = keep_mask((1 << 22,), p, torch.device("cpu"))
    assert keep.dtype == torch.bool and abs(q - (1 - p)) <= 2**-17
    tolerance = 5 * (q * (1 - q) / keep.numel() * 4) ** 0.5
    for word in range(4):
        assert abs(keep[word::4].float().mean().item() - q) < tolerance


def test_keep_mask_keeps_everything_when_the_dropout_rounds_to_zero():
    """p < 2⁻¹⁷ rounds to q = 1: every element kept (the int16 bound 2¹⁵ would wrap and drop them all), and the
    layer computes what it does without dropout. A p whose q rounds to 0 is refused by the config (the contract
    cases of LoRA.contract_bad_options); here its q is 0."""
    keep, q = keep_mask((1000,), 1e-6, torch.device("cpu"))
    assert q == 1.0 and keep.all()
    x, weight, bias, lora_A, lora_B = make(False, True)
    torch.testing.assert_close(fused_lora_linear(x, weight, bias, lora_A, lora_B, 0.7, 1e-6, False),
                               fused_lora_linear(x, weight, bias, lora_A, lora_B, 0.7, 0.0, False), rtol=0, atol=0)
    assert keep_probability(0.999999) == 0.0


    """The same LoRA model through the fused function and through the composed path (forced by autocast off →
    a trainable base weight) gives the same outputs and adapter gradients."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = base
    deltatune.apply(model, {"name": "lora", "r": 4, "target_modules": ["0", "2"], "init_lora_weights": False,
                            "modules_to_save": []})
    x = torch.randn(5, 8)
    out = model(x)
    grads = torch.autograd.grad(out.sum(), [p for p in model.parameters() if p.requires_grad])
    for layer in (model[0], model[2]):
        layer._fused = False
    out_composed = model(x)
    grads_composed = torch.autograd.grad(out_composed.sum(), [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(out, out_composed)
    for got, expected in zip(grads, grads_composed):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_qlora_layer_rebuilds_the_4bit_weight_and_matches_the_formula():
    """QLoRA goes through the same fused function with the weight rebuilt from NF4 (in forward and backward)."""
    from deltatune.methods.lora.qlora_layers import NF4Linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    deltatune.apply(model, {"name": "qlora", "r": 4, "target_modules": ["0"], "init_lora_weights": False,
                            "modules_to_save": [], "bias": "all"})
    layer = model[0]
    assert isinstance(layer.base_layer, NF4Linear)
    x = torch.randn(6, 64, requires_grad=True)
    trainable = [x, layer.base_layer.bias, *layer.factors("default")]
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), trainable)
    lora_A, lora_B = layer.factors("default")
    reference = composed(x, layer.base_layer.dequantize(), layer.base_layer.bias, lora_A, lora_B,
                         layer.settings["default"].scaling, None, 0.0, False)
    reference_grads = torch.autograd.grad(reference.square().sum(), trainable)
    torch.testing.assert_close(out, reference)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
