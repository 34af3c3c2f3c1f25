"""QLoRA: deltatune's own NF4 against bitsandbytes (bit for bit), storage per weight, quantisation error, the
4-bit LoRA layer's maths and gradients, merge/unmerge, and adapter files (re-quantising a fresh base)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune.errors import UserError
from deltatune.methods.lora import nf4
from deltatune.methods.lora.qlora import QLoRA, QLoRAConfig
from deltatune.methods.lora.qlora_layers import NF4Linear, QLoRALinear
from deltatune.models.families import family_of
from tests.helpers import seeded
from tests.tiny_models import tiny_llama

bnb = pytest.importorskip("bitsandbytes.functional")
CPU = torch.device("cpu")
NF4_MAX_HALF_GAP = 0.1519  # half the widest gap of the NF4 code book (between -1 and -0.696): the worst rounding


def bnb_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True):
    """(packed, state, dequantised) from bitsandbytes. The compiled fallback bitsandbytes takes for an odd last
    dimension is run eagerly: compiling it costs seconds and computes the same products.

    The dequantised weights are read from bitsandbytes' stored bytes with its own code book and absmax (nested
    absmax dequantised by its own blockwise function), not taken from `dequantize_4bit`: on some CPUs (seen on an
    AMD EPYC with bitsandbytes 0.50.2) that kernel reads the wrong block's absmax when a block spans rows of a 2-D
    weight, giving values that are not on the NF4 grid of any block at all, while the stored bytes stay exact."""
    with torch._dynamo.config.patch(disable=True):
        packed, state = bnb.quantize_4bit(weight, blocksize=block_size, compress_statistics=double_quant,
                                          quant_type="nf4")
        absmax = state.absmax.float()
        if double_quant:
            absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    codes = packed.view(-1)
    nibbles = torch.stack([codes >> 4, codes & 15], dim=-1).reshape(-1)[: weight.numel()].long()
    scales = absmax.repeat_interleave(block_size)[: weight.numel()]
    return packed, state, (state.code[nibbles] * scales).reshape(weight.shape)


def gaussian(*shape: int, seed: int = 0, scale: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- NF4 against bitsandbytes ------------------------------------------------------------------------------------
def test_code_books_are_bitsandbytes_tables():
    assert torch.equal(nf4.nf4_code(CPU), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(CPU), bnb.create_dynamic_map())


@pytest.mark.parametrize("shape", [(64, 64), (96, 128), (33, 70), (300, 257), (7, 5), (1, 4160), (3, 4, 96)])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantised_weights_and_stored_bytes_are_bitsandbytes(shape, block_size, double_quant):
    # Sizes not divisible by 64 or 256, an odd number of weights (35, 300·257) and an odd width included.
    weight = gaussian(*shape, seed=sum(shape)) * torch.linspace(0.1, 4, shape[-1])  # varied block scales
    packed, state, expected = bnb_nf4(weight, block_size, double_quant)
    ours = nf4.quantize_nf4(weight, block_size, double_quant)
    assert torch.equal(nf4.dequantize_nf4(ours, weight.shape, block_size), expected)
    # Same layout as bitsandbytes: codes packed high nibble first, 8-bit absmax codes, nested fp32 absmax, offset.
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.absmax_scale, state.state2.absmax)
        assert torch.equal(ours.absmax_offset, state.offset)


def test_zero_blocks_and_outliers_match_bitsandbytes():
    weight = gaussian(40, 96, seed=3)
    weight[:5] = 0  # whole zero blocks (absmax 0)
    weight[10, 7] = 3.0  # an outlier dominating its block
    _, _, expected = bnb_nf4(weight)
    assert torch.equal(nf4.dequantize_nf4(nf4.quantize_nf4(weight), weight.shape), expected)


@pytest.mark.parametrize("length", [256, 1000, 4099])
def test_8bit_absmax_quantisation_is_bitsandbytes(length):
    values = gaussian(length, seed=length, scale=1.0) * torch.linspace(0.001, 2, length)
    values[:256] = 0  # a zero block
    codes, absmax = nf4.quantize_blockwise_8bit(values, 256)
    expected_codes, state = bnb.quantize_blockwise(values, blocksize=256)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(nf4.dequantize_blockwise_8bit(codes, absmax, 256), bnb.dequantize_blockwise(codes, state))


# ---- storage and error --------------------------------------------------------------------------------------------
def layer_bytes(layer: nn.Module) -> int:
    return nf4.storage_bytes([*layer.parameters(), *layer.buffers()])


@pytest.mark.parametrize("out_features, in_features", [(384, 1536), (1536, 384), (576, 576), (64, 64)])
def test_frozen_storage_at_most_052_bytes_per_weight(out_features, in_features):
    layer = NF4Linear.from_linear(nn.Linear(in_features, out_features, bias=False))
    tensors = [*layer.parameters(), *layer.buffers()]
    assert all(not t.is_floating_point() or t.numel() < in_features * out_features / 64 for t in tensors)
    assert layer_bytes(layer) / (in_features * out_features) <= 0.52


def test_model_keeps_no_fp32_copy_of_quantised_weights():
    model = seeded(tiny_llama)
    deltatune.apply(model, {"name": "qlora"})
    quantised = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(quantised) == 2 * 7  # every attention and MLP Linear of both blocks
    weights = sum(m.in_features * m.out_features for m in quantised)
    assert sum(layer_bytes(m) for m in quantised) / weights <= 0.52
    dense_shapes = {(m.out_features, m.in_features) for m in quantised}
    base_tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if "lora_" not in n]
    assert not any(t.is_floating_point() and tuple(t.shape) in dense_shapes for t in base_tensors)


def test_quantisation_error_within_nf4_bounds():
    weight = gaussian(512, 512, seed=1, scale=1.0)
    blocks = weight.view(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    plain = nf4.dequantize_nf4(nf4.quantize_nf4(weight, double_quant=False), weight.shape).view(-1, 64)
    # Each weight rounds to the nearest of 16 levels of its block: error ≤ absmax · (widest half gap).
    assert ((plain - blocks).abs() <= absmax[:, None] * NF4_MAX_HALF_GAP).all()
    double = nf4.quantize_nf4(weight)
    restored_absmax = nf4.dequantize_absmax(double)
    # 8-bit dynamic codes: the centred absmax is off by at most half the widest code gap (0.0140625/2) of its scale.
    scale = double.absmax_scale.repeat_interleave(256)[: absmax.numel()]
    assert ((restored_absmax - absmax).abs() <= 0.0071 * scale).all()
    restored = nf4.dequantize_nf4(double, weight.shape).view(-1, 64)
    bound = absmax[:, None] * NF4_MAX_HALF_GAP + (restored_absmax - absmax).abs()[:, None] + 1e-6
    assert ((restored - blocks).abs() <= bound).all()
    # For Gaussian weights NF4 with blocks of 64 loses ~9% of the weight's norm; double quantisation adds ~nothing.
    relative = lambda approx: ((approx - blocks).norm() / blocks.norm()).item()  # noqa: E731
    assert 0.08 < relative(plain) < 0.10 and relative(restored) < relative(plain) * 1.01


def test_bad_input_to_quantiser():
    with pytest.raises(ValueError, match="NaN or infinite"):
        nf4.quantize_nf4(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="block size"):
        nf4.quantize_nf4(torch.ones(4, 4), block_size=100)


# ---- the layer ------------------------------------------------------------------------------------------------------
def one_layer(in_features: int = 70, out_features: int = 33, **options) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    deltatune.apply(model, {"name": "qlora", "r": 4, "lora_alpha": 8, "target_modules": ["0"],
                            "modules_to_save": [], **options})
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()  # a non-zero update
    return model


def test_layer_forward_is_dequantised_linear_plus_lora():
    torch.manual_seed(0)
    original = nn.Linear(70, 33)
    _, _, dequantised = bnb_nf4(original.weight.detach())  # the base weight as bitsandbytes restores it
    model = nn.Sequential(original)
    deltatune.apply(model, {"name": "qlora", "r": 4, "lora_alpha": 8, "target_modules": ["0"],
                            "modules_to_save": []})
    layer = model[0]
    assert isinstance(layer, QLoRALinear) and isinstance(layer.base_layer, NF4Linear)
    assert layer.base_layer.bias is original.bias  # the same (frozen) parameter, not a copy
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(5, 3, 70)
    expected = F.linear(x, dequantised, original.bias) + 2.0 * F.linear(F.linear(x, A), B)
    assert torch.allclose(model(x), expected, atol=1e-6)
    with deltatune.disabled(model):
        assert torch.equal(model(x), F.linear(x, dequantised, original.bias))


def test_gradients_match_dequantised_reference_and_reach_only_lora():
    model = one_layer(bias="all")
    layer = model[0]
    reference = nn.Linear(70, 33)
    with torch.no_grad():
        reference.weight.copy_(layer.base_layer.dequantize())
        reference.bias.copy_(layer.base_layer.bias)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(4, 70, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    model(x).square().sum().backward()
    ref_A, ref_B = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    (reference(x_ref) + 2.0 * F.linear(F.linear(x_ref, ref_A), ref_B)).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)  # through the 4-bit base: dL/dX = dL/dY · Ŵ
    assert torch.allclose(A.grad, ref_A.grad, atol=1e-4) and torch.allclose(B.grad, ref_B.grad, atol=1e-4)
    assert torch.allclose(layer.base_layer.bias.grad, reference.bias.grad, atol=1e-5)  # bias="all" trains it
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.base_layer.bias", "0.lora_A.default.weight", "0.lora_B.default.weight"}


def test_backward_saves_no_dequantised_weight():
    model = one_layer(in_features=128, out_features=96)
    saved: list[int] = []
    x = torch.randn(2, 128, requires_grad=True)

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).sum()
    assert saved and 96 * 128 not in saved  # the 4-bit base is re-dequantised in backward, never kept (nor Ŵᵀ)
    loss.backward()
    assert x.grad is not None


# ---- merge, files, choices ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_goes_to_fp32_and_unmerge_restores_the_4bit_layer(use_dora):
    model = one_layer(use_dora=use_dora)
    layer, x = model[0], torch.randn(6, 70)
    quantised = layer.base_layer
    with torch.no_grad():
        unmerged = model(x)
        with deltatune.disabled(model):
            base = model(x)
        deltatune.merge(model)
        assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == torch.float32
        assert torch.allclose(model(x), unmerged, atol=1e-5)
        with deltatune.disabled(model):  # unmerges to the 4-bit layer for the duration
            assert torch.equal(model(x), base)
        assert type(layer.base_layer) is nn.Linear
        deltatune.unmerge(model)
        assert layer.base_layer is quantised and "quantized_layer" not in layer._modules
        assert torch.equal(model(x), unmerged)


def test_adapter_files_reload_onto_a_freshly_quantised_base(tmp_path):
    def build():
        model = seeded(tiny_llama)
        deltatune.apply(model, {"name": "qlora", "r": 4, "target_modules": ["q_proj", "v_proj"]})
        return model

    model = build()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    deltatune.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    fresh = build()
    for (name, tensor), (_, again) in zip(model.named_buffers(), fresh.named_buffers()):
        assert torch.equal(tensor, again), f"{name}: quantising the same weights twice differs"
    deltatune.load_adapter(fresh, tmp_path, name="trained")
    assert isinstance(fresh.model.layers[0].self_attn.q_proj, QLoRALinear)
    batch = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(batch).logits, model(batch).logits, atol=1e-5)


def test_quantize_choice_and_what_stays_fp32():
    model = seeded(tiny_llama)
    deltatune.apply(model, {"name": "qlora", "target_modules": ["q_proj", "lm_head"], "quantize": "targets"})
    block = model.model.layers[0]
    assert isinstance(block.self_attn.q_proj.base_layer, NF4Linear)
    assert type(block.self_attn.k_proj) is nn.Linear  # not adapted: fp32 under "targets"
    # lm_head is tied to the embedding, which still needs the weight: it gets plain LoRA on the fp32 weight.
    assert type(model.lm_head.base_layer) is nn.Linear
    blocks = tiny_llama()
    deltatune.apply(blocks, {"name": "qlora", "target_modules": ["q_proj"]})
    assert isinstance(blocks.model.layers[1].mlp.down_proj, NF4Linear)  # "blocks": frozen, not adapted, quantised


def test_weights_it_cannot_quantise_are_one_line_errors():
    # Each option's invalid values: QLoRA.contract_bad_options, checked in test_method_contracts.py.
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="cannot quantise 'model.layers.1.mlp.down_proj': .* NaN"):
        deltatune.apply(model, {"name": "qlora"})
    assert not any(isinstance(m, NF4Linear) for m in model.modules())  # nothing swapped before the failure
    model = tiny_llama()
    deltatune.apply(model, {"name": "lora", "target_modules": ["q_proj"]})
    second = QLoRA(QLoRAConfig(target_modules=["q_proj"]), adapter_name="second")
    with pytest.raises(UserError, match="already carries a LoRA adapter on its fp32 weight; apply qlora first"):
        second.apply(model, family_of(model))


def test_all_linear_and_a_second_adapter_share_the_4bit_base():
    model = seeded(tiny_llama)
    deltatune.apply(model, {"name": "qlora", "target_modules": "all-linear"})
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert len(layers) == 14 and type(model.lm_head) is nn.Linear  # the output layer is never "all-linear"
    bases = {name: layer.base_layer for name, layer in layers.items()}
    QLoRA(QLoRAConfig(target_modules="all-linear"), adapter_name="second").apply(model, family_of(model))
    assert all(layers[name].base_layer is base for name, base in bases.items())  # not quantised twice
    assert all(layer.adapter_names() == ["default", "second"] for layer in layers.values())


def test_parameter_total_counts_the_4bit_weights():
    """The run's printed total is the model's size, whether its frozen weights are fp32 or packed 4-bit."""
    from deltatune.runner import count_parameters
    from tests.tiny_models import tiny_bert

    plain, quantised = tiny_bert(num_labels=2), tiny_bert(num_labels=2)
    deltatune.apply(plain, {"name": "lora", "r": 4})
    deltatune.apply(quantised, {"name": "qlora", "r": 4})
    assert count_parameters(quantised) == count_parameters(plain)
