"""Activation quantization (W8A8): dynamic against torch.ao's quantize_dynamic, static with
calibration observers, SmoothQuant's folding and its effect on planted outlier channels, and
LLM.int8() against bitsandbytes' Linear8bitLt on CPU."""

from __future__ import annotations

import copy
import json
import logging
import warnings

import bitsandbytes as bnb
import pytest
import torch
from factories import tiny_encoder, tiny_model
from torch import nn
from torch.ao.quantization import (
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    default_dynamic_quant_observer,
    quantize_dynamic,
)

from genforge.quantize.activation import quantize_activations
from genforge.quantize.llm_int8 import Int8MixedLinear, outlier_columns
from genforge.quantize.observers import HistogramObserver, calibrate, make_observer
from genforge.quantize.saved import LAYER_KINDS
from genforge.quantize.smoothquant import smooth_model, smoothing_factors, smoothing_pairs
from genforge.quantize.w8a8 import (
    ActivationQuantError,
    DynamicInt8Linear,
    StaticInt8Linear,
    affine_qparams,
    int8_matmul,
)

# bitsandbytes warns on every fp32 call that it casts the input to fp16 for quantizing.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------- integer products
@pytest.mark.parametrize("use_int_mm", [True, False])
def test_int8_matmul_is_exact(use_int_mm):
    # K > 1024 crosses the fallback's slices; -128 and 127 are the extreme codes.
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (5, 2100), dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 2100), dtype=torch.int8)
    a[0] = -128
    b[0] = -127
    exact = (a.long() @ b.long().t()).to(torch.int32)
    assert torch.equal(int8_matmul(a, b, use_int_mm=use_int_mm), exact)
    assert int8_matmul(a[:0], b, use_int_mm=use_int_mm).shape == (0, 7)


def test_int8_matmul_refuses_other_dtypes():
    with pytest.raises(ActivationQuantError, match="int8"):
        int8_matmul(torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.int8))


# --------------------------------------------------------------------- dynamic vs torch.ao
def _torch_ao_dynamic(linear: nn.Linear, granularity: str) -> nn.Module:
    """torch.ao's dynamic linear with a weight observer on genforge's INT8 grid: symmetric,
    codes in [-127, 127], scale max|w| / 127 (torch.ao's default qint8 observer uses [-128, 127]
    and max|w| / 127.5)."""
    if granularity == "per_tensor":
        weight = MinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127
        )
    else:
        weight = PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127
        )
    qconfig = QConfig(activation=default_dynamic_quant_observer, weight=weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        return quantize_dynamic(nn.Sequential(linear), {nn.Linear: qconfig})[0]


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_dynamic_per_tensor_equals_torch_ao(granularity):
    torch.manual_seed(0)
    linear = nn.Linear(300, 70)
    reference = _torch_ao_dynamic(linear, granularity)
    ours = DynamicInt8Linear.from_linear(linear, activation="per_tensor", weight_granularity=granularity)
    packed, _ = reference._weight_bias()
    assert torch.equal(ours.weight, packed.int_repr())
    scales = packed.q_per_channel_scales() if granularity == "per_channel" else torch.tensor([packed.q_scale()])
    assert torch.equal(ours.weight_scale, scales.float())
    for x in (torch.randn(7, 300) * 3 + 0.5, torch.rand(2, 5, 300), -torch.rand(4, 300) * 1e-3):
        expected = reference(x)
        # The same int32 sums; only the last fp32 scaling may round differently (one ulp).
        torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_dynamic_without_reduce_range_equals_fbgemm():
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    reference = _torch_ao_dynamic(linear, "per_channel")
    ours = DynamicInt8Linear.from_linear(linear, activation="per_tensor", reduce_range=False)
    x = torch.randn(9, 64) * 2 - 1
    expected = torch.ops.quantized.linear_dynamic(x, reference._packed_params._packed_params, reduce_range=False)
    torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("reduce_range", [True, False])
def test_affine_qparams_equal_torch(reduce_range):
    torch.manual_seed(2)
    for x in (torch.randn(100) * 4 + 1, torch.rand(50), -torch.rand(50), torch.zeros(3), torch.randn(20) * 1e-6):
        expected_scale, expected_zero = torch._choose_qparams_per_tensor(x, reduce_range)
        scale, zero = affine_qparams(float(x.min()), float(x.max()), reduce_range)
        assert zero == expected_zero
        assert scale == pytest.approx(expected_scale, rel=1e-7)


def test_dynamic_per_token_equals_float_reference():
    torch.manual_seed(3)
    linear = nn.Linear(96, 40)
    layer = DynamicInt8Linear.from_linear(linear)
    x = torch.randn(3, 4, 96)
    x[0, 1] *= 100  # a large token only coarsens its own row
    x[1, 2] = 0  # an all-zero row
    # The same arithmetic in fp64: per-row scale max|x| / 127, codes round(x * 127 / max|x|).
    rows = x.reshape(-1, 96).double()
    absmax = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    codes = torch.round(rows.float() * (127 / absmax.float())).double()
    weight = layer.weight.double() * layer.weight_scale.double()[:, None]
    expected = (codes * absmax / 127) @ weight.t() + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected.reshape(3, 4, 40), rtol=1e-6, atol=1e-6)
    assert _relative(layer(x), linear(x).detach()) < 0.02


# ---------------------------------------------------------------------------------- static
@pytest.mark.parametrize("symmetric", [True, False])
def test_static_layer_equals_float_reference_and_clips(symmetric):
    torch.manual_seed(4)
    linear = nn.Linear(32, 16)
    layer = StaticInt8Linear.from_linear(linear, input_range=(-1.0, 3.0), symmetric=symmetric)
    scale, zero = float(layer.weight_input_scale), int(layer.weight_input_zero_point)
    if symmetric:
        assert (scale, zero) == (pytest.approx(3 / 127), 0)
    else:
        assert scale == pytest.approx(4 / 255) and layer.input_range()[0] <= -1.0 + scale
    x = torch.randn(6, 32) * 2  # some values beyond the range: clipped
    low, high = (-127, 127) if symmetric else (-128, 127)
    codes = (torch.round(x / scale) + zero).clamp(low, high)
    weight = layer.weight.double() * layer.weight_scale.double()[:, None]
    expected = ((codes - zero).double() * scale) @ weight.t() + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)


def test_static_needs_a_range():
    with pytest.raises(ActivationQuantError, match="input_range"):
        StaticInt8Linear.from_linear(nn.Linear(4, 4))


# -------------------------------------------------------------------------------- observers
def test_minmax_observer_ranges():
    observer = make_observer("minmax")
    observer.observe(torch.tensor([-2.0, 0.5]))
    observer.observe(torch.tensor([[1.0, 3.0]]))
    assert observer.range() == (-3.0, 3.0)
    asymmetric = make_observer("minmax", symmetric=False)
    asymmetric.observe(torch.tensor([-2.0, 3.0]))
    assert asymmetric.range() == (-2.0, 3.0)
    with pytest.raises(ActivationQuantError, match="seen no values"):
        make_observer("mse").range()


def test_histogram_doubling_is_exact():
    torch.manual_seed(5)
    batches = [torch.randn(1000) * scale for scale in (0.1, 1.0, 30.0, 2.0)]
    observer = HistogramObserver()
    for batch in batches:
        observer.observe(batch)
    everything = torch.cat(batches)
    index = torch.floor(everything.double() / observer.width).long() + observer.counts.numel() // 2
    assert observer.counts.sum() == everything.numel()
    assert torch.equal(observer.counts, torch.bincount(index, minlength=observer.counts.numel()))


def test_percentile_clips_a_planted_outlier():
    torch.manual_seed(6)
    values = torch.randn(200_000)
    values[123] = 1000.0
    observer = make_observer("percentile", percentile=99.99)
    for part in values.split(30_000):
        observer.observe(part)
    low, high = observer.range()
    assert high < 10 and low == -high  # the outlier (1000) is clipped
    # Within two histogram bins of the exact percentile of |x|.
    assert high == pytest.approx(float(torch.quantile(values.abs(), 0.9999)), abs=2 * observer.width)


def test_mse_observer_finds_the_least_error_range_on_heavy_tails():
    torch.manual_seed(7)
    values = torch.distributions.StudentT(3.0).sample((100_000,))

    def quantization_error(limit):
        return float(quantization_errors(torch.tensor([limit]))[0])

    def quantization_errors(limits):  # (candidates,) -> mean squared error of each
        scales = (limits / 127)[:, None]
        return (torch.round(values / scales).clamp(-127, 127) * scales - values).pow(2).mean(dim=1)

    observer = make_observer("mse", steps=100)
    observer.observe(values)
    low, high = observer.range()
    absmax = float(values.abs().max())
    assert low == -high and high < absmax
    # The same 100 candidate ranges, errors measured on the data itself.
    best = float(quantization_errors(absmax * torch.arange(1, 101) / 100).min())
    assert quantization_error(high) <= 1.01 * best
    assert quantization_error(high) < 0.8 * quantization_error(absmax)  # min-max's range: 0.032 against 0.048


def test_make_observer_refuses_bad_options():
    with pytest.raises(ActivationQuantError, match="observer must be one of"):
        make_observer("kl")
    with pytest.raises(ActivationQuantError, match="percentile must be"):
        make_observer("percentile", percentile=20)
    with pytest.raises(ActivationQuantError, match="does not take"):
        make_observer("minmax", steps=10)


def test_calibrate_observes_each_selected_layers_inputs():
    model = tiny_model(0).eval()
    rows = [torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (5,))]
    observers = calibrate(model, rows, include=["qkv", "down"])
    assert sorted(observers) == ["blocks.0.attn.qkv", "blocks.0.mlp.down", "blocks.1.attn.qkv", "blocks.1.mlp.down"]
    seen = []
    hook = model.blocks[1].mlp.down.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        for row in rows:
            model(row.view(-1, row.shape[-1]))
    hook.remove()
    inputs = torch.cat([s.reshape(-1) for s in seen])
    assert observers["blocks.1.mlp.down"].range()[1] == pytest.approx(float(inputs.abs().max()))
    assert observers["blocks.1.mlp.down"].values == inputs.numel()


@pytest.mark.parametrize(
    "rows, message",
    [
        (None, "list of token-id rows"),
        ([], "at least one row"),
        ([torch.zeros(3)], "LongTensor"),
        ([torch.tensor([70])], "outside"),
    ],
)
def test_calibrate_refuses_bad_rows(rows, message):
    with pytest.raises(ActivationQuantError, match=message):
        calibrate(tiny_model(0), rows)


# ------------------------------------------------------------------------------ SmoothQuant
def _randomise_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Norm":
                module.weight.uniform_(0.5, 1.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        dict(family="llama"),
        dict(family="gpt2", gated_mlp=False, norm="layernorm", activation="gelu_tanh", qkv_bias=True, mlp_bias=True),
        dict(family="gemma", norm_weight_offset=1.0, activation="gelu_tanh"),
        dict(family="mixtral", num_experts=3, num_experts_per_token=2),
    ],
)
def test_smoothing_is_exact_in_fp(overrides):
    model = _randomise_norms(tiny_model(0, **overrides)).eval()
    rows = [torch.randint(0, 64, (2, 12))]
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        factors = smooth_model(model, rows, alpha=0.5)
        after = model(ids).logits
    assert len(factors) == 2 * len(model.blocks)
    assert any(float((f - 1).abs().max()) > 0.1 for f in factors.values())  # smoothing moved something
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_smoothing_factors_formula():
    activation = torch.tensor([4.0, 1.0, 0.0])
    weights = [torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 0.25]])]
    factors = smoothing_factors(activation, weights, alpha=0.5)
    expected = torch.tensor([(4 / 4) ** 0.5, (1 / 2) ** 0.5, (1e-5 / 0.5) ** 0.5])
    torch.testing.assert_close(factors, expected)
    with pytest.raises(ActivationQuantError, match="alpha"):
        smoothing_factors(activation, weights, alpha=1.5)


def test_smoothquant_refuses_post_norm_models():
    with pytest.raises(ActivationQuantError, match="post-norm"):
        smoothing_pairs(tiny_encoder(0))
    pairs = dict(smoothing_pairs(tiny_model(0, family="mixtral", num_experts=2, num_experts_per_token=1)))
    assert pairs["blocks.0.mlp_norm"] == [
        "blocks.0.mlp.router",
        "blocks.0.mlp.experts.0.gate_up",
        "blocks.0.mlp.experts.1.gate_up",
    ]


def _model_with_outlier_channels() -> nn.Module:
    """A tiny decoder whose norms scale three channels 50x: activation outlier channels, as
    large models have in a few hidden dimensions."""
    model = tiny_model(0, hidden_size=64, intermediate_size=128, vocab_size=128).eval()
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight[[3, 17, 40]] *= 50
    return model


def test_smoothquant_tames_outlier_channels():
    model = _model_with_outlier_channels()
    torch.manual_seed(8)
    calibration = [torch.randint(0, 128, (2, 32)) for _ in range(3)]
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        reference = model(ids).logits

    def error(method, **options):
        quantized = copy.deepcopy(model)
        quantize_activations(quantized, method, calibration, **options)
        with torch.no_grad():
            return _relative(quantized(ids).logits, reference)

    # Only the layers smoothing reaches (after the norms): per-tensor static W8A8.
    smoothed = error("smoothquant", include=["qkv", "gate_up"])
    plain = error("static", include=["qkv", "gate_up"])
    assert smoothed < 0.5 * plain  # 0.035 against 0.087 with these seeds
    # Every layer but the head, static and per-token dynamic: attn.o and mlp.down have no norm
    # before them and stay unsmoothed, so the gain is smaller.
    assert error("smoothquant") < 0.7 * error("static")  # 0.060 against 0.102
    assert error("smoothquant", activation="per_token") < 0.6 * error("dynamic")  # 0.020 against 0.044


# ------------------------------------------------------------------------ LLM.int8() vs bnb
def _bitsandbytes_int8(linear: nn.Linear, threshold: float = 6.0):
    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").eval()  # the move quantizes; eval selects MatMul8bitLt (the decomposition)


def _inputs_with_outliers(in_features: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(2, 9, in_features)
    x[0, 1, 3], x[1, 2, 10], x[1, 4, 5] = 9.0, -7.0, 6.0  # exactly 6.0 counts (>=)
    return x


@pytest.mark.parametrize("shape", [(64, 32), (768, 256)])
def test_llm_int8_equals_bitsandbytes(shape):
    torch.manual_seed(9)
    linear = nn.Linear(*shape)
    x = _inputs_with_outliers(shape[0], seed=10)
    reference = _bitsandbytes_int8(linear)
    expected = reference(x).detach()
    ours = Int8MixedLinear.from_linear(linear)
    # bitsandbytes stores max|w_fp16| per row (SCB) and codes round(w * 127 / SCB); the grid
    # divides by SCB / 127 instead, which moves a code by one step on about 1 in 10^4 values.
    torch.testing.assert_close(ours.weight_scale * 127, reference.state.SCB, rtol=2e-7, atol=0)
    code_steps = (ours.weight.int() - reference.state.CB.int()).abs()
    assert int(code_steps.max()) <= 1 and float(code_steps.float().mean()) < 1e-3
    assert torch.equal(outlier_columns(x.reshape(-1, shape[0]), 6.0), reference.state.idx)
    # With bitsandbytes' own codes, the only difference left is its dequantization constant
    # 6.200124e-05, which is 1 / 127^2 * (1 + 1.8e-5): a relative 2e-5 on the int8 part.
    same_codes = Int8MixedLinear.empty(*shape, bias=True)
    same_codes.load_state_dict(
        {"weight": reference.state.CB, "weight_scale": reference.state.SCB / 127, "bias": linear.bias}
    )
    torch.testing.assert_close(same_codes(x), expected, rtol=3e-5, atol=3e-5 * float(expected.abs().max()))
    # From the fp weights: add at most |x_k| * scale_n for each code one step apart, and the
    # constant's 2e-5 of the int8 part's magnitude.
    rows = x.reshape(-1, shape[0]).abs()
    step_bound = rows @ (code_steps.float() * ours.weight_scale[:, None]).t()
    magnitude = rows @ ours.dequantized_weight().abs().t()
    difference = (ours(x) - expected).abs().reshape(rows.shape[0], -1)
    assert bool((difference <= step_bound + 3e-5 * magnitude + 1e-6).all())


def test_llm_int8_without_threshold_and_with_huge_values():
    torch.manual_seed(11)
    linear = nn.Linear(64, 16, bias=False)
    x = torch.randn(5, 64)
    expected = _bitsandbytes_int8(linear, threshold=0.0)(x).detach()
    ours = Int8MixedLinear.from_linear(linear, threshold=0.0)
    torch.testing.assert_close(ours(x), expected, rtol=3e-5, atol=1e-4)
    # A value past fp16's range becomes an outlier column computed in fp32, not an inf.
    x[2, 7] = 1e6
    out = Int8MixedLinear.from_linear(linear)(x)
    assert torch.isfinite(out).all()
    assert _relative(out, linear(x).detach()) < 0.02


def test_llm_int8_outliers_keep_the_error_small():
    torch.manual_seed(12)
    linear = nn.Linear(256, 64)
    x = torch.randn(16, 256)
    x[:, [5, 77]] *= 40  # outlier features in every token
    with torch.no_grad():
        exact = linear(x)
    mixed = _relative(Int8MixedLinear.from_linear(linear)(x), exact)
    int8_only = _relative(Int8MixedLinear.from_linear(linear, threshold=0.0)(x), exact)
    assert mixed < 0.25 * int8_only


# ------------------------------------------------------------------- the layer contract
def _layers() -> list[nn.Module]:
    torch.manual_seed(13)
    linear = nn.Linear(48, 24)
    return [
        DynamicInt8Linear.from_linear(linear),
        DynamicInt8Linear.from_linear(linear, activation="per_tensor", weight_granularity="per_tensor"),
        StaticInt8Linear.from_linear(linear, input_range=(-2.0, 3.0), symmetric=False),
        Int8MixedLinear.from_linear(linear, threshold=4.0),
        Int8MixedLinear.from_linear(nn.Linear(48, 24, bias=False)),
    ]


@pytest.mark.parametrize("layer", _layers(), ids=lambda layer: f"{layer.kind}-{json.dumps(layer.settings())}")
def test_layer_contract_round_trip(layer):
    assert LAYER_KINDS[layer.kind] is type(layer)
    settings = json.loads(json.dumps(layer.settings()))
    state = layer.state_dict()
    assert all(key.startswith(("weight", "bias")) for key in state)
    shell = type(layer).empty(layer.in_features, layer.out_features, layer.bias is not None, **settings)
    assert {k: (v.shape, v.dtype) for k, v in shell.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in state.items()
    }
    shell.load_state_dict(state, assign=True)
    x = torch.randn(3, 2, 48) * 2
    assert torch.equal(shell(x), layer(x))
    assert not any(p.requires_grad for p in layer.parameters())


# ------------------------------------------------------------------------ whole models
def test_quantize_activations_methods_and_details():
    model = tiny_model(0).eval()
    rows = [torch.randint(0, 64, (2, 16))]
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        reference = model(ids).logits
    for method, options, limit in [
        ("dynamic", {}, 0.05),
        ("static", {"observer": "percentile", "percentile": 99.9}, 0.1),
        ("smoothquant", {"alpha": 0.6}, 0.1),
        ("llm_int8", {}, 0.05),
    ]:
        quantized = copy.deepcopy(model)
        details = quantize_activations(quantized, method, rows, **options)
        assert details["method"] == method
        assert sorted(details["layers"]) == sorted(
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
        )
        assert isinstance(quantized.lm_head, nn.Linear)
        json.dumps(details)
        with torch.no_grad():
            assert _relative(quantized(ids).logits, reference) < limit, method
    details = quantize_activations(copy.deepcopy(model), "static", rows, include=["qkv"], symmetric=False)
    assert details["calibration"] == {"rows": 2, "tokens": 32, "observer": "minmax", "symmetric": False}
    assert set(details["input_ranges"]) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}


@pytest.mark.parametrize("method", ["static", "smoothquant"])
def test_calibrated_methods_say_how_to_calibrate(method):
    model = tiny_model(0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ActivationQuantError, match="calibration=\\[LongTensor"):
        quantize_activations(model, method)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_input_leaves_the_model_unchanged():
    model = tiny_model(0, family="mixtral", num_experts=4, num_experts_per_token=1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ActivationQuantError, match="method must be one of"):
        quantize_activations(model, "int4")
    with pytest.raises(ActivationQuantError, match="observer must be one of"):
        quantize_activations(model, "static", [torch.randint(0, 64, (1, 4))], observer="kl")
    # One token routed to one expert: the other experts see nothing, and are named.
    with pytest.raises(ActivationQuantError, match="no calibration token reached blocks.0.mlp.experts"):
        quantize_activations(model, "static", [torch.randint(0, 64, (1, 1))])
    with pytest.raises(ActivationQuantError, match="post-norm"):
        quantize_activations(tiny_encoder(0), "smoothquant", [torch.randint(0, 64, (1, 4))])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if "gate_up" in n)
