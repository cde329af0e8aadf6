"""Weight-only INT8/INT4 layers (quantize/weight_only.py) and the kernels they run on
(quantize/kernels): every path's output equals x @ dequantized_weight().T + bias."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_model
from torch import nn

import genforge.quantize.kernels as kernels
from genforge.inference import pack_for_cpu_inference
from genforge.quantize.grid import GridError, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from genforge.quantize.weight_only import Int4Linear, Int8Linear, quantize_weights

COMPILED_PATHS = ("portable", "avx2", "avx512")


def _cpu_has(path: str) -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    return path == "portable" or (path == "avx2" and capability in ("AVX2", "AVX512")) or capability == "AVX512"


@pytest.fixture(scope="module")
def native() -> bool:
    return kernels.native_available()


@pytest.fixture(params=("torch", *COMPILED_PATHS))
def path(request, native) -> str:
    if request.param != "torch" and not native:
        pytest.skip("the quantized kernels do not build on this machine (the torch path is tested)")
    if not _cpu_has(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} build")
    return request.param


def _linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.bias.normal_() if bias else None
    return layer


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    y = x @ layer.dequantized_weight().T
    return y if layer.bias is None else y + layer.bias


# Rows of x cover the kernels' tiles of 8, 4, 2 and 1 rows and their remainders; 37 output rows
# leave a remainder after tiles of 4 and 2.
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 13])
@pytest.mark.parametrize("in_features", [8, 72, 256])
def test_int8_matches_dequantized_weight_on_every_path(path, rows, in_features):
    layer = Int8Linear.from_linear(_linear(in_features, 37))
    x = torch.randn(rows, in_features)
    with kernels.kernel_path(path), torch.inference_mode():
        assert kernels.path_for(x, "int8") == path
        y = layer(x)
    torch.testing.assert_close(y, _reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 11])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_matches_dequantized_weight_on_every_path(path, rows, group_size):
    layer = Int4Linear.from_linear(_linear(256, 37), group_size)
    x = torch.randn(rows, 256)
    with kernels.kernel_path(path), torch.inference_mode():
        assert kernels.path_for(x, "lut4") == path
        y = layer(x)
    torch.testing.assert_close(y, _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_three_dimensional_and_non_contiguous_inputs(path):
    int8 = Int8Linear.from_linear(_linear(64, 10))
    int4 = Int4Linear.from_linear(_linear(64, 10, bias=False), 32)
    x = torch.randn(2, 64, 3).transpose(1, 2)  # (2, 3, 64), not contiguous
    with kernels.kernel_path(path), torch.inference_mode():
        for layer in (int8, int4):
            y = layer(x)
            assert y.shape == (2, 3, 10)
            torch.testing.assert_close(y, _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_int4_groups_keep_their_own_scale_and_zero(path):
    """Each group of columns on a scale 10x the one before (and shifted): a kernel that read a
    neighbour's scale or zero point would be off by far more than the tolerance."""
    torch.manual_seed(1)
    weight = torch.randn(6, 128) * torch.tensor([1.0, 10.0, 100.0, 1000.0]).repeat_interleave(32)
    weight[:, 32:64] += 5.0  # a group that is all positive: zero point 0
    layer = Int4Linear.from_grid(quantize_int4(weight, 32), torch.randn(6))
    assert torch.equal(layer.dequantized_weight(), dequantize_int4(quantize_int4(weight, 32)))
    x = torch.randn(3, 128)
    with kernels.kernel_path(path), torch.inference_mode():
        torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-3)
    assert (layer.dequantized_weight() - weight).abs().amax(dim=0)[:32].max() < 0.2  # group 0 stays fine-grained


def test_dequantized_weights_are_the_grids():
    linear = _linear(64, 5)
    assert torch.equal(
        Int8Linear.from_linear(linear).dequantized_weight(), dequantize_int8(quantize_int8(linear.weight))
    )
    assert torch.equal(
        Int4Linear.from_linear(linear, 32).dequantized_weight(), dequantize_int4(quantize_int4(linear.weight, 32))
    )


def test_from_grid_takes_gptq_style_grids_and_refuses_bad_codes():
    linear = _linear(64, 5)
    grid = quantize_int4(linear.weight, 64)
    layer = Int4Linear.from_grid(grid, linear.bias)
    assert torch.equal(layer.grid().codes, grid.codes) and layer.settings() == {"group_size": 64}
    bad = type(grid)(grid.codes + 16, grid.scales, grid.zeros, 64)
    with pytest.raises(GridError, match=r"\[0, 15\]"):
        Int4Linear.from_grid(bad)
    with pytest.raises(GridError, match="group size 128 does not divide"):
        Int4Linear(layer.weight, layer.weight_scale, layer.weight_zeros, 128)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("bias", [True, False])
def test_empty_then_load_state_dict_round_trip(kind, bias):
    linear = _linear(64, 9, bias=bias)
    layer = Int8Linear.from_linear(linear) if kind == "int8" else Int4Linear.from_linear(linear, 32)
    assert layer.kind == kind
    state = layer.state_dict()
    assert all(key.startswith("weight") or key == "bias" for key in state)
    shell = type(layer).empty(64, 9, bias, **layer.settings())
    assert {k: (v.shape, v.dtype) for k, v in shell.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in state.items()
    }
    shell.load_state_dict(state, assign=True)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        torch.testing.assert_close(shell(x), layer(x), rtol=0, atol=0)
    assert shell.bias is None or not shell.bias.requires_grad


def test_quantize_weights_gives_logits_close_to_the_fp_model():
    model = tiny_model(intermediate_size=64).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits
    for method, group, bound in (("int8", 128, 0.02), ("int4", 32, 0.2)):
        quantized = tiny_model(intermediate_size=64).eval()
        names = quantize_weights(quantized, method, group)
        assert "lm_head" in names and "blocks.1.mlp.down" in names
        kind = Int8Linear if method == "int8" else Int4Linear
        assert all(isinstance(quantized.get_submodule(n), kind) for n in names)
        with torch.inference_mode():
            after = quantized(ids).logits
        assert ((after - before).norm() / before.norm()).item() < bound


def test_a_bad_group_size_is_refused_before_any_layer_changes():
    model = tiny_model().eval()  # hidden 32, MLP 48: groups of 32 do not divide the MLP's 48 inputs
    with pytest.raises(GridError, match=r"blocks\.0\.mlp\.down: group size 32 does not divide the layer's 48"):
        quantize_weights(model, "int4", group_size=32)
    assert all(type(m) is not Int4Linear for m in model.modules())
    with pytest.raises(GridError, match=r"one of \(32, 64, 128\); got 100"):
        quantize_weights(model, "int4", group_size=100)
    with pytest.raises(GridError, match="method must be one of"):
        quantize_weights(model, "int3")
    assert quantize_weights(model, "int4", group_size=32, exclude=("down",))  # the rest do take 32


def test_a_packed_model_is_refused():
    model = pack_for_cpu_inference(tiny_model(intermediate_size=64).eval())
    with pytest.raises(GridError, match="quantize before pack_for_cpu_inference"):
        quantize_weights(model, "int8")


def test_a_tied_head_gets_its_own_codes_and_the_embeddings_stay():
    model = tiny_model(intermediate_size=64, tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.embed_tokens.weight
    embeddings = model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits
    names = quantize_weights(model, "int8")
    assert "lm_head" in names and isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.embed_tokens.weight, embeddings) and model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.dequantized_weight(), dequantize_int8(quantize_int8(embeddings)))
    with torch.inference_mode():
        after = model(ids).logits
    assert ((after - before).norm() / before.norm()).item() < 0.02

    kept = tiny_model(intermediate_size=64, tie_word_embeddings=True).eval()
    assert "lm_head" not in quantize_weights(kept, "int4", 32, exclude=("lm_head",))
    assert kept.lm_head.weight is kept.embed_tokens.weight  # still tied


def test_auto_path_sends_big_batches_and_gradients_to_torch(native):
    if not native:
        pytest.skip("the quantized kernels do not build on this machine")
    layer = Int4Linear.from_linear(_linear(64, 8), 32)
    with kernels.kernel_path("auto"):
        capability = torch.backends.cpu.get_cpu_capability()
        limits = kernels.NATIVE_MAX_ROWS.get("AVX512" if capability.startswith("AVX512") else capability)
        if limits is None:
            assert kernels.path_for(torch.randn(1, 64), "lut4") == "torch"
        else:
            assert kernels.path_for(torch.randn(1, 64), "lut4") in ("avx2", "avx512")
            assert kernels.path_for(torch.randn(limits["lut4"] + 1, 64), "lut4") == "torch"
        x = torch.randn(3, 64, requires_grad=True)
        assert kernels.path_for(x, "lut4") == "torch"
        layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(3, 64), rtol=1e-5, atol=1e-5)


def test_without_a_compiler_one_line_says_so_and_the_torch_path_serves(monkeypatch, capsys):
    monkeypatch.setitem(kernels._state, "tried", False)
    monkeypatch.setitem(kernels._state, "ops", None)
    monkeypatch.setitem(kernels._state, "path", "auto")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    assert not kernels.native_available()
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "no C++ compiler" in message and "pure-torch path" in message
    layer = Int8Linear.from_linear(_linear(32, 4))
    x = torch.randn(2, 32)
    assert kernels.path_for(x, "int8") == "torch"
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-5)
    with kernels.kernel_path("avx2"), pytest.raises(RuntimeError, match="could not be built"):
        layer(x)


def test_the_environment_variable_forces_a_path(monkeypatch):
    monkeypatch.setitem(kernels._state, "path", None)
    monkeypatch.setenv(kernels.ENVIRONMENT_VARIABLE, "torch")
    assert kernels.path_for(torch.randn(1, 32), "int8") == "torch"
    monkeypatch.setitem(kernels._state, "path", None)
    monkeypatch.setenv(kernels.ENVIRONMENT_VARIABLE, "fast")
    with pytest.raises(ValueError, match="GENFORGE_QUANT_KERNELS must be one of"):
        kernels.path_for(torch.randn(1, 32), "int8")
    with pytest.raises(ValueError, match="kernel path must be one of"):
        kernels.set_kernel_path("sse")


def test_the_kernel_sources_ship_with_the_package():
    import tomllib
    from pathlib import Path

    assert kernels.SOURCE.is_file()
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "*.cpp" in pyproject["tool"]["setuptools"]["package-data"]["genforge.quantize.kernels"]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_decodes_from_packed_bytes_equal_to_its_dequantized_weight(path, double_quant, blocksize):
    from genforge.quantize.nf4 import NF4Linear, dequantize_nf4

    layer = NF4Linear.from_linear(_linear(256, 21), blocksize, double_quant)
    x = torch.randn(3, 2, 256)
    with kernels.kernel_path(path), torch.inference_mode():
        assert kernels.compiled_path(x, "lut4") == (path != "torch")
        y = layer(x)
    reference = x @ dequantize_nf4(layer.quantized_weight()).T + layer.bias
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)


def test_nf4_kernel_follows_a_loaded_state_dict(native):
    """The kernel's decoded absmax is kept between calls: it must follow new buffers."""
    if not native:
        pytest.skip("the quantized kernels do not build on this machine")
    from genforge.quantize.nf4 import NF4Linear, dequantize_nf4

    layer, other = NF4Linear.from_linear(_linear(128, 8, seed=1)), NF4Linear.from_linear(_linear(128, 8, seed=2))
    x = torch.randn(2, 128)
    with torch.inference_mode():
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x), rtol=1e-5, atol=1e-5)
    reference = x @ dequantize_nf4(other.quantized_weight()).T + other.bias
    torch.testing.assert_close(layer(x).detach(), reference, rtol=1e-5, atol=1e-5)
