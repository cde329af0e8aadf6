"""genforge.quantize.nf4 against bitsandbytes' quantize_4bit / dequantize_4bit (NF4, QLoRA) on CPU."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch
import torch.nn.functional as F
from factories import tiny_model
from torch import nn

from genforge.quantize import (
    NF4Error,
    NF4Linear,
    NF4Weight,
    dequantize_nf4,
    kernels,
    quantize_linears_nf4,
    quantize_nf4,
)
from genforge.quantize.nf4 import DYNAMIC_LEVELS, NF4_LEVELS

# The largest distance from a value in [-1, 1] to its nearest NF4 level: half the widest gap.
NF4_MAX_HALF_GAP = float(((NF4_LEVELS[1:] - NF4_LEVELS[:-1]) / 2).max())

# Odd sizes that are multiples of 64; (1000, 64) has 1000 blocks, so its 8-bit absmax have a
# short last block of 1000 - 3 * 256 = 232.
SHAPES = [(128, 64), (64, 192), (3, 320), (448, 192), (1000, 64)]


def _weight_with_zeros_and_ties(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Random normal values, with one all-zero block and one block whose values sit exactly
    halfway between NF4 levels (its absmax is 1, so scaling leaves them exact)."""
    torch.manual_seed(seed)
    weight = torch.randn(shape).reshape(-1)
    weight[:64] = 0
    midpoints = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2
    if weight.numel() >= 128:
        weight[64:128] = midpoints.repeat(5)[:64]
        weight[64] = 1.0
    return weight.view(shape)


def _bnb(weight: torch.Tensor, double_quant: bool, blocksize: int = 64):
    return bnb_functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=double_quant, blocksize=blocksize)


def _bnb_reference_blockwise(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' pure-torch 8-bit blockwise quantizer (its "default" backend, exact nearest
    level, the CUDA kernel's rule), called past the native CPU kernel that overrides it."""
    ops = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return ops.redispatch(keys, values, DYNAMIC_LEVELS, blocksize)


def _from_bnb(packed: torch.Tensor, state) -> NF4Weight:
    if state.nested:
        return NF4Weight(
            packed.view(-1), state.absmax, state.shape, state.dtype, state.blocksize, state.state2.absmax, state.offset
        )
    return NF4Weight(packed.view(-1), state.absmax, state.shape, state.dtype, state.blocksize)


def test_levels_equal_bitsandbytes():
    assert torch.equal(NF4_LEVELS, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_LEVELS, bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.02])
def test_codes_and_absmax_equal_bitsandbytes(shape, scale):
    weight = _weight_with_zeros_and_ties(shape) * scale
    q = quantize_nf4(weight, double_quant=False)
    packed, state = _bnb(weight, double_quant=False)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (weight.numel() // 2,)
    assert torch.equal(q.codes, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert (q.shape, q.dtype, q.blocksize, q.double_quant) == (weight.shape, weight.dtype, 64, False)


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quantization_equals_bitsandbytes(shape):
    weight = _weight_with_zeros_and_ties(shape)
    q = quantize_nf4(weight, double_quant=True)
    packed, state = _bnb(weight, double_quant=True)
    assert torch.equal(q.codes, packed.view(-1))
    assert torch.equal(q.nested_offset, state.offset)
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    # The 8-bit absmax indices equal bitsandbytes' reference quantizer exactly...
    absmax = quantize_nf4(weight, double_quant=False).absmax
    reference_indices, reference_scales = _bnb_reference_blockwise(absmax - state.offset, 256)
    assert torch.equal(q.absmax, reference_indices)
    assert torch.equal(q.nested_absmax, reference_scales)
    # ...and its native CPU kernel, whose search is not always the nearest level, at most one
    # level away, on a few of them.
    steps = (q.absmax.int() - state.absmax.int()).abs()
    assert steps.max() <= 1 and steps.float().mean() < 0.02


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_bitsandbytes(double_quant, dtype):
    weight = _weight_with_zeros_and_ties((1000, 64)).to(dtype)
    packed, state = _bnb(weight, double_quant)
    expected = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(_from_bnb(packed, state)), expected)
    if not double_quant:  # the whole round trip, where the two quantizers agree bit for bit
        assert torch.equal(dequantize_nf4(quantize_nf4(weight, double_quant=False)), expected)


def test_ties_take_the_lower_level_and_zero_blocks_decode_to_zero():
    weight = _weight_with_zeros_and_ties((2, 64))
    q = quantize_nf4(weight, double_quant=False)
    indices = torch.stack([q.codes >> 4, q.codes & 0xF], dim=1).view(-1)
    assert torch.equal(indices[:64], torch.full((64,), 7, dtype=torch.uint8))  # level 7 is 0.0
    lower = torch.arange(15, dtype=torch.uint8).repeat(5)[1:64]
    assert torch.equal(indices[65:128], lower)
    assert torch.equal(dequantize_nf4(q)[0], torch.zeros(64))


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_is_within_half_the_widest_level_gap(double_quant):
    torch.manual_seed(1)
    weight = torch.randn(256, 320) * 0.05
    q = quantize_nf4(weight, double_quant=double_quant)
    error = dequantize_nf4(q) - weight
    absmax = weight.view(-1, 64).abs().amax(dim=1)
    bound = NF4_MAX_HALF_GAP * absmax * (1 + 1e-6)
    if double_quant:  # the stored absmax is itself off by up to half an 8-bit level step
        stored = dequantize_nf4(q).view(-1, 64).abs().amax(dim=1)  # each block keeps a value at level +-1
        bound = bound + (stored - absmax).abs() + 1e-9
    assert (error.view(-1, 64).abs().amax(dim=1) <= bound).all()
    assert NF4_MAX_HALF_GAP == pytest.approx((1 - 0.6961928009986877) / 2)  # between -1 and the next level


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_values", [1 << 24, 192 * 3])
def test_nf4_linear_equals_linear_with_the_dequantized_weight(bias, chunk_values):
    torch.manual_seed(2)
    linear = nn.Linear(192, 100, bias=bias)
    q = quantize_nf4(linear.weight)
    layer = NF4Linear(q, linear.bias, chunk_values=chunk_values)
    x = torch.randn(3, 5, 192)
    expected = F.linear(x, dequantize_nf4(q), linear.bias)
    if chunk_values >= linear.weight.numel():
        with kernels.kernel_path("torch"):  # the packed-byte kernel sums in another order
            assert torch.equal(layer(x), expected)  # the same product on the same weight
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    else:  # 34 products of 3 rows each: the matmul sums in another order, so within 1e-6 relative
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    keys = {"weight", "weight_absmax", "weight_nested_absmax", "weight_nested_offset"} | ({"bias"} if bias else set())
    assert set(layer.state_dict()) == keys


def test_quantized_tiny_model_stays_close_and_frozen():
    model = tiny_model(seed=3).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
    names = quantize_linears_nf4(model)
    assert names and all(isinstance(model.get_submodule(name), NF4Linear) for name in names)
    assert not any(name.endswith("lm_head") for name in names)
    with torch.no_grad():
        quantized = model(ids).logits
    # NF4 rounds each weight by up to 15% of its block's absmax; through two blocks the logits
    # moved by 6% (relative L2) with this seed, so 10% is the bound.
    assert (quantized - reference).norm() < 0.1 * reference.norm()
    assert F.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0) > 0.99
    for name in names:
        assert not any(p.requires_grad for p in model.get_submodule(name).parameters())


@pytest.mark.parametrize(
    ("weight", "blocksize", "message"),
    [
        (torch.randn(64), 64, "2-D"),
        (torch.randn(2, 2, 64), 64, "2-D"),
        (torch.ones(4, 64, dtype=torch.int32), 64, "float32, float16 or bfloat16"),
        (torch.randn(3, 40), 64, "not a \\(non-zero\\) multiple of blocksize 64"),
        (torch.randn(0, 64), 64, "multiple of blocksize"),
        (torch.randn(4, 64), 48, "blocksize must be one of"),
        (torch.tensor([[float("nan")] * 64]), 64, "inf or NaN"),
    ],
)
def test_bad_weights_are_refused(weight, blocksize, message):
    with pytest.raises(NF4Error, match=message):
        quantize_nf4(weight, blocksize=blocksize)


def test_a_bad_layer_is_named_and_nothing_is_replaced():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(10, 3))
    with pytest.raises(NF4Error, match="^1: .*30 values"):
        quantize_linears_nf4(model)
    assert all(type(layer) is nn.Linear for layer in model)
