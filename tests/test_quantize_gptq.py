"""GPTQ (genforge.quantize.gptq): the lazy-batch Cholesky sweep against a slow explicit OBQ
reference, its error against round-to-nearest, the sequential model pass, and held-out
perplexity of a trained tiny model against RTN INT4."""

import pytest
import quantize_shared
import torch
from factories import tiny_model

from genforge.quantize.calibration import CalibrationError, collect_linear_statistics
from genforge.quantize.gptq import GPTQError, gptq_quantize_model, gptq_quantize_weight
from genforge.quantize.grid import codes_on_grid, dequantize_int4, int4_grid, quantize_int4

pytestmark = pytest.mark.usefixtures("one_thread")


def obq_reference(weight, hessian, group_size, damp, act_order):
    """Optimal Brain Quantization one column at a time with the explicit inverse Hessian:
    quantize column i, move the rest of the row by -err * H^-1[i, :] / H^-1[i, i], then remove
    i from the inverse (H^-1 -= H^-1[:, i] H^-1[i, :] / H^-1[i, i]). Float64 throughout."""
    w, h = weight.double().clone(), hessian.double().clone()
    columns = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if act_order:
        scales, zeros = int4_grid(w, group_size)
        order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist()
    else:
        scales = torch.zeros(w.shape[0], columns // group_size)
        zeros = torch.zeros(w.shape[0], columns // group_size, dtype=torch.uint8)
        order = list(range(columns))
    h = h + damp * h.diagonal().mean() * torch.eye(columns, dtype=h.dtype)
    inverse = torch.linalg.inv(h)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    for i in order:
        g = i // group_size
        if not act_order and i % group_size == 0:
            s, z = int4_grid(w[:, i : i + group_size], group_size)
            scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
        code = codes_on_grid(w[:, i : i + 1], scales[:, g : g + 1], zeros[:, g : g + 1], 1)
        codes[:, i] = code[:, 0]
        q = ((code.double() - zeros[:, g : g + 1].double()) * scales[:, g : g + 1].double())[:, 0]
        error = (w[:, i] - q) / inverse[i, i]
        w -= error[:, None] * inverse[i][None, :]
        inverse = inverse - inverse[:, i : i + 1] @ inverse[i : i + 1, :] / inverse[i, i]
    return codes, scales, zeros


def correlated_inputs(tokens, features, seed=0, dead=()):
    # Mostly a few shared directions plus a little noise: strongly correlated channels, as a
    # layer's inputs are.
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features // 4, features, generator=generator)
    x = torch.randn(tokens, features // 4, generator=generator) @ mixing
    x = x + 0.1 * torch.randn(tokens, features, generator=generator)
    x = x * torch.linspace(0.2, 3.0, features)  # channels of very different energy
    x[:, list(dead)] = 0.0
    return x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [32, 64, 100])
def test_lazy_batches_equal_the_explicit_obq_reference(act_order, block_size):
    x = correlated_inputs(400, 128, dead=(5, 77))
    hessian = 2 * x.double().T @ x.double() / x.shape[0]
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    grid = gptq_quantize_weight(weight, hessian, group_size=32, damp=0.01, act_order=act_order, block_size=block_size)
    codes, scales, zeros = obq_reference(weight, hessian, 32, 0.01, act_order)
    assert torch.equal(grid.codes, codes)
    assert torch.equal(grid.zeros, zeros)
    torch.testing.assert_close(grid.scales, scales.float())
    assert grid.group_size == 32 and grid.codes.dtype == torch.uint8 and grid.codes.max() <= 15
    # Dead inputs hold weight 0: their codes are the zero point.
    dequantized = dequantize_int4(grid)
    assert torch.all(dequantized[:, [5, 77]] == 0)


@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_below_round_to_nearest(act_order):
    x = correlated_inputs(1024, 128, seed=2)
    hessian = 2 * x.double().T @ x.double() / x.shape[0]
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    gptq = dequantize_int4(gptq_quantize_weight(weight, hessian, group_size=32, act_order=act_order))
    rtn = dequantize_int4(quantize_int4(weight, 32))
    gptq_error = (x @ (weight - gptq).T).norm()
    rtn_error = (x @ (weight - rtn).T).norm()
    assert gptq_error < 0.8 * rtn_error


def test_float32_hessian_gives_the_same_grid_as_float64():
    x = correlated_inputs(300, 64, seed=4)
    hessian = 2 * x.double().T @ x.double() / x.shape[0]
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    in64 = gptq_quantize_weight(weight, hessian, group_size=32)
    in32 = gptq_quantize_weight(weight, hessian.float(), group_size=32)
    # Rounding may flip a code or two where a value sits on a level boundary.
    assert (in64.codes != in32.codes).float().mean() < 0.01


def test_bad_input_is_refused_with_what_is_accepted():
    weight, hessian = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(GPTQError, match=r"\(64, 64\)"):
        gptq_quantize_weight(weight, torch.eye(32))
    with pytest.raises(GPTQError, match="group size"):
        gptq_quantize_weight(weight, hessian, group_size=48)
    with pytest.raises(GPTQError, match="does not divide"):
        gptq_quantize_weight(torch.randn(8, 96), torch.eye(96), group_size=64)
    with pytest.raises(GPTQError, match="damp"):
        gptq_quantize_weight(weight, hessian, group_size=32, damp=1.5)
    with pytest.raises(GPTQError, match="positive definite"):
        gptq_quantize_weight(weight, -torch.eye(64), group_size=32, damp=0.0)
    with pytest.raises(GPTQError, match="finite"):
        gptq_quantize_weight(weight.clone().fill_(float("nan")), hessian, group_size=32)


def test_model_pass_is_sequential_and_leaves_the_head_alone():
    model = tiny_model(hidden_size=64, intermediate_size=64).eval()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = [torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    lines = []
    grids = gptq_quantize_model(model, rows, group_size=32, progress=lines.append)
    expected = [f"blocks.{b}.{layer}" for b in range(2) for layer in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")]
    assert list(grids) == expected and len(lines) == len(expected)
    for name, grid in grids.items():
        assert torch.equal(model.get_submodule(name).weight, dequantize_int4(grid))
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"])
    assert torch.equal(model.embed_tokens.weight, original["embed_tokens.weight"])
    # The last layer was calibrated on the inputs the fully quantized model gives it: GPTQ of
    # its original weight with those inputs' Hessian is its grid.
    last = "blocks.1.mlp.down"
    hessian = collect_linear_statistics(model, rows, [last], mean_abs=False)[last].hessian
    again = gptq_quantize_weight(original[f"{last}.weight"], hessian, group_size=32)
    assert torch.equal(again.codes, grids[last].codes)


def test_model_pass_refuses_the_head_and_bad_group_sizes():
    model = tiny_model(hidden_size=64, intermediate_size=48)
    rows = [torch.randint(0, 64, (8,))]
    with pytest.raises(CalibrationError, match="lm_head"):
        gptq_quantize_model(model, rows, group_size=32, include=["lm_head"])
    with pytest.raises(GPTQError, match="blocks.0.mlp.down"):
        gptq_quantize_model(model, rows, group_size=32)
    with pytest.raises(CalibrationError, match="vocabulary"):
        gptq_quantize_model(model, [torch.tensor([1, 2, 99])], group_size=32, exclude=["down"])


@pytest.mark.slow
def test_held_out_perplexity_below_round_to_nearest():
    trained = quantize_shared.trained_model()
    rtn = quantize_shared.held_out_perplexity(quantize_shared.with_grids(trained, quantize_shared.rtn_grids(trained)))
    model = quantize_shared.trained_model()
    grids = gptq_quantize_model(model, quantize_shared.calibration_rows(), group_size=quantize_shared.GROUP_SIZE)
    gptq = quantize_shared.held_out_perplexity(quantize_shared.with_grids(quantize_shared.trained_model(), grids))
    fp = quantize_shared.held_out_perplexity(trained)
    assert gptq < rtn, (fp, gptq, rtn)
    # Most of round-to-nearest's loss is recovered.
    assert gptq - fp < 0.5 * (rtn - fp), (fp, gptq, rtn)


def test_mixture_of_experts_expert_without_tokens_is_rounded_to_nearest():
    model = tiny_model(hidden_size=64, intermediate_size=64, family="mixtral", num_experts=4, num_experts_per_token=1)
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if name.endswith("down")}
    grids = gptq_quantize_model(model.eval(), [torch.tensor([3, 9])], group_size=32)
    assert "blocks.0.mlp.router" not in grids and len(grids) == 2 * (2 + 4 * 2)
    # Two tokens reach at most two of the four experts; the others are plain RTN.
    rounded = [n for n, w in weights.items() if torch.equal(grids[n].codes, quantize_int4(w, 32).codes)]
    assert len(rounded) >= 4
