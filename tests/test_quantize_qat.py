"""Quantization-aware training (genforge.quantize.qat): the fake-quantized forward and its
straight-through gradient, the swap in and out, and held-out perplexity after training in
genforge's Trainer against fp training followed by RTN INT4."""

import pytest
import quantize_shared
import torch
import torch.nn.functional as F
from factories import tiny_model

from genforge.quantize.grid import dequantize_int4, quantize_int4
from genforge.quantize.qat import FakeQuantLinear, QATError, convert_qat, prepare_qat

pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_uses_the_int4_grid_and_the_gradient_passes_straight_through():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8)
    layer = FakeQuantLinear(linear, group_size=32)
    x = torch.randn(5, 3, 64, requires_grad=True)
    rounded = dequantize_int4(quantize_int4(linear.weight, 32))
    out = layer(x)
    torch.testing.assert_close(out, F.linear(x, rounded, linear.bias))
    out.square().sum().backward()
    # The gradient a linear layer holding the rounded weight would get, given to the fp weight.
    reference_weight = rounded.clone().requires_grad_(True)
    x_again = x.detach().clone().requires_grad_(True)
    F.linear(x_again, reference_weight, linear.bias).square().sum().backward()
    torch.testing.assert_close(linear.weight.grad, reference_weight.grad)
    torch.testing.assert_close(x.grad, x_again.grad)


def test_prepare_keeps_parameters_and_convert_gives_grids_and_plain_layers():
    model = tiny_model(hidden_size=64, intermediate_size=64)
    parameters = dict(model.named_parameters())
    keys = list(model.state_dict())
    names = prepare_qat(model, group_size=32)
    assert names == [f"blocks.{b}.{n}" for b in range(2) for n in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")]
    assert all(isinstance(model.get_submodule(name), FakeQuantLinear) for name in names)
    assert list(model.state_dict()) == keys
    assert all(p is parameters[name] for name, p in model.named_parameters())
    with pytest.raises(QATError, match="already"):
        prepare_qat(model, group_size=32)
    grids = convert_qat(model)
    assert list(grids) == names
    for name in names:
        layer = model.get_submodule(name)
        assert type(layer) is torch.nn.Linear and layer.weight is parameters[f"{name}.weight"]
        assert torch.equal(grids[name].codes, quantize_int4(layer.weight, 32).codes)
    with pytest.raises(QATError, match="prepare_qat"):
        convert_qat(model)


def test_bad_selections_are_refused_before_anything_is_swapped():
    model = tiny_model(hidden_size=64, intermediate_size=48)
    with pytest.raises(QATError, match="blocks.0.mlp.down"):
        prepare_qat(model, group_size=32)
    with pytest.raises(QATError, match="LM head"):
        prepare_qat(model, group_size=32, include=["qkv", "lm_head"], exclude=())
    with pytest.raises(ValueError, match="no linear layer matches"):
        prepare_qat(model, group_size=32, include=["q_proj"])
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())


@pytest.mark.slow
def test_trained_through_the_grid_beats_fp_training_then_round_to_nearest():
    steps, lr = 60, 3e-4  # a small step: the weights settle onto the grid rather than learn more
    train_ids = quantize_shared.corpus()[0]
    fp = quantize_shared.train(quantize_shared.trained_model(), train_ids, steps, lr, seed=1)
    rtn = quantize_shared.held_out_perplexity(quantize_shared.with_grids(fp, quantize_shared.rtn_grids(fp)))
    model = quantize_shared.trained_model()
    prepare_qat(model, group_size=quantize_shared.GROUP_SIZE)
    quantize_shared.train(model, train_ids, steps, lr, seed=1)  # genforge's Trainer, fake-quantized layers inside
    grids = convert_qat(model)
    qat = quantize_shared.held_out_perplexity(quantize_shared.with_grids(model, grids))
    assert qat < rtn, (qat, rtn, quantize_shared.held_out_perplexity(fp))
