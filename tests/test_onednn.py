"""genforge.onednn.linear against F.linear: outputs and gradients, the cases that must fall back,
and a whole model trained through it against the same model on torch's matmul."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genforge import onednn
from genforge.config import Config
from genforge.model import Transformer
from genforge.onednn import OneDNNLinear, use_onednn

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")

# 96 rows x 128 in x 160 out = 1.97M multiply-adds: above MIN_MULTIPLY_ADDS, so oneDNN is taken.
ROWS, IN, OUT = 96, 128, 160


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the oneDNN products made (forward and backward)."""
    calls = []
    real = onednn.matmul_nt

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(onednn, "matmul_nt", counting)
    return calls


def _case(seed, shape, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, IN, generator=g, dtype=dtype)
    weight = torch.randn(OUT, IN, generator=g, dtype=dtype) * 0.1
    b = torch.randn(OUT, generator=g, dtype=dtype) if bias else None
    upstream = torch.randn(*shape, OUT, generator=g, dtype=dtype)
    return x, weight, b, upstream


def _run(fn, x, weight, bias, upstream, grads=(True, True, True)):
    leaves = [
        t.detach().clone().requires_grad_(want) if t is not None else None for t, want in zip((x, weight, bias), grads)
    ]
    out = fn(*leaves)
    out.backward(upstream)
    return out, [t.grad if t is not None else None for t in leaves]


def _layouts(x):
    """The same values of x in other memory layouts: transposed storage and a slice of a wider tensor."""
    transposed = x.transpose(0, 1).contiguous().transpose(0, 1)  # 2-D: column-major; 3-D: (seq, batch) storage
    wide = torch.cat((x, torch.zeros_like(x)), dim=-1)[..., : x.shape[-1]]
    return {"contiguous": x, "transposed": transposed, "sliced": wide}


@needs_onednn
@pytest.mark.parametrize("shape", [(ROWS,), (4, ROWS // 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_output_and_gradients_equal_f_linear(shape, bias, layout, onednn_calls):
    x, weight, b, upstream = _case(0, shape, bias)
    x = _layouts(x)[layout]
    assert x.is_contiguous() == (layout == "contiguous")
    ours, our_grads = _run(onednn.linear, x, weight, b, upstream)
    assert type(ours.grad_fn).__name__ == "_OneDNNLinearBackward"
    assert len(onednn_calls) == 3  # output, d(x), d(W)
    reference, reference_grads = _run(F.linear, x, weight, b, upstream)
    assert ours.shape == reference.shape == (*shape, OUT)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(our_grads, reference_grads):
        if theirs is None:
            assert mine is None
            continue
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # The weight's gradient is made row-major, as the parameter is.
    assert our_grads[1].is_contiguous()


@needs_onednn
def test_second_order_gradients_equal_f_linears():
    """create_graph=True (a gradient penalty): oneDNN's operator has no derivative of its own, so
    differentiating the backward must not silently give zeros."""
    x, weight, b, _ = _case(10, (4, ROWS // 4))

    def second_order(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, b)]
        out = fn(*leaves)
        (grad_x,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
        grad_x.square().sum().backward()
        return out, [t.grad for t in leaves]

    ours, our_grads = second_order(onednn.linear)
    assert type(ours.grad_fn).__name__ == "_OneDNNLinearBackward"
    _, reference_grads = second_order(F.linear)
    for mine, theirs in zip(our_grads, reference_grads):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)


@needs_onednn
def test_column_major_weight_and_strided_bias():
    x, weight, b, upstream = _case(1, (ROWS,))
    weight = weight.t().contiguous().t()
    b = torch.stack((b, b), dim=1)[:, 0]
    ours, our_grads = _run(onednn.linear, x, weight, b, upstream)
    reference, reference_grads = _run(F.linear, x, weight, b, upstream)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(our_grads, reference_grads):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_frozen_weight_costs_no_weight_product(onednn_calls):
    x, weight, b, upstream = _case(2, (4, ROWS // 4))
    ours, our_grads = _run(onednn.linear, x, weight, b, upstream, grads=(True, False, False))
    reference, reference_grads = _run(F.linear, x, weight, b, upstream, grads=(True, False, False))
    assert len(onednn_calls) == 2  # output and d(x): no d(W) product
    assert our_grads[1] is None and our_grads[2] is None
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_grads[0], reference_grads[0], atol=1e-5, rtol=1e-5)


@needs_onednn
def test_input_without_gradient_costs_no_input_product(onednn_calls):
    x, weight, b, upstream = _case(3, (ROWS,))
    ours, our_grads = _run(onednn.linear, x, weight, b, upstream, grads=(False, True, True))
    reference, reference_grads = _run(F.linear, x, weight, b, upstream, grads=(False, True, True))
    assert len(onednn_calls) == 2  # output and d(W): no d(x) product
    assert our_grads[0] is None
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(our_grads[1:], reference_grads[1:]):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_without_autograd_runs_the_product_alone(mode, onednn_calls):
    x, weight, b, _ = _case(4, (4, ROWS // 4))
    weight.requires_grad_()
    with getattr(torch, mode)():
        ours = onednn.linear(x, weight, b)
        reference = F.linear(x, weight, b)
    assert ours.grad_fn is None and len(onednn_calls) == 1
    assert ours.is_inference() == (mode == "inference_mode")
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_falls_back_to_f_linear(onednn_calls):
    x, weight, b, upstream = _case(5, (4, ROWS // 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn.uses_onednn(x, weight, b)
        ours, our_grads = _run(onednn.linear, x, weight, b, upstream.bfloat16())
        reference, reference_grads = _run(F.linear, x, weight, b, upstream.bfloat16())
    assert not onednn_calls
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, reference)
    for mine, theirs in zip(our_grads, reference_grads):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_fall_back_to_f_linear(dtype, onednn_calls):
    x, weight, b, upstream = _case(6, (ROWS,), dtype=dtype)
    assert not onednn.uses_onednn(x, weight, b)
    ours, our_grads = _run(onednn.linear, x, weight, b, upstream)
    reference, reference_grads = _run(F.linear, x, weight, b, upstream)
    assert not onednn_calls
    assert ours.dtype == dtype and torch.equal(ours, reference)
    for mine, theirs in zip(our_grads, reference_grads):
        assert torch.equal(mine, theirs)


def test_small_products_and_missing_onednn_fall_back(monkeypatch, onednn_calls):
    x, weight, b, _ = _case(7, (8,))  # 8 x 128 x 160: below MIN_MULTIPLY_ADDS
    assert 8 * IN * OUT < onednn.MIN_MULTIPLY_ADDS
    assert not onednn.uses_onednn(x, weight, b)
    assert torch.equal(onednn.linear(x, weight, b), F.linear(x, weight, b))
    big, weight, b, _ = _case(7, (ROWS,))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not onednn.uses_onednn(big, weight, b)
    assert torch.equal(onednn.linear(big, weight, b), F.linear(big, weight, b))
    assert not onednn_calls


def test_shape_errors_are_f_linears():
    x, weight, b, _ = _case(8, (ROWS,))
    with pytest.raises(RuntimeError, match="shape"):
        onednn.linear(x[:, :-1], weight, b)


@needs_onednn
def test_repeated_steps_are_bit_identical():
    """Resume-exact training needs a deterministic path: same inputs, same bits."""
    x, weight, b, upstream = _case(9, (4, ROWS // 4))
    first = _run(onednn.linear, x, weight, b, upstream)
    second = _run(onednn.linear, x, weight, b, upstream)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(p, q) for p, q in zip(first[1], second[1]))


def _tiny(**fields):
    base = {
        "family": "llama",
        "vocab_size": 512,
        "hidden_size": 128,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 256,
    }
    return Config(**(base | fields))


CONFIGS = {
    "llama-tied": _tiny(tie_word_embeddings=True),
    "mixtral": _tiny(family="mixtral", num_experts=4, num_experts_per_token=2),
    "bert-mlm": _tiny(
        family="bert",
        causal=False,
        post_norm=True,
        norm="layernorm",
        activation="gelu",
        gated_mlp=False,
        position="learned",
        max_position_embeddings=64,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        type_vocab_size=2,
        embedding_norm=True,
        masked_lm_head=True,
        tie_word_embeddings=True,
        num_kv_heads=4,
    ),
}


@needs_onednn
@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_gradients_equal_those_through_torch_matmul(name, monkeypatch, onednn_calls):
    torch.manual_seed(0)
    plain = Transformer(CONFIGS[name])
    model = use_onednn(copy.deepcopy(plain))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert list(model.state_dict()) == list(plain.state_dict())  # the swap keeps every key
    reference = copy.deepcopy(model)
    assert list(model.state_dict()) == list(reference.state_dict())
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))

    def grads(m):
        out = m(ids)
        (out.logits.square().mean() + out.hidden_states.square().mean()).backward()
        return out.logits, {n: p.grad for n, p in m.named_parameters()}

    ours, our_grads = grads(model)
    assert onednn_calls, "the model's linear layers did not reach oneDNN"
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    count = len(onednn_calls)
    theirs, their_grads = grads(reference)
    assert len(onednn_calls) == count
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for key, mine in our_grads.items():
        torch.testing.assert_close(mine, their_grads[key], atol=1e-6, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
