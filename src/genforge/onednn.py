"""fp32 linear layers on CPU through oneDNN instead of torch's default matmul.

A linear layer `y = x W^T + b` is three matrix products in training: the output, d(x) = d(y) W
and d(W) = d(y)^T x (d(b) is a sum over rows). On CPU, torch's fp32 `F.linear` and `matmul`
call MKL, which on AMD processors picks its AVX2 code even where AVX-512 is present; oneDNN
(Intel's deep-learning primitives library, shipped inside torch as `mkldnn`) runs its AVX-512
code there, about twice as fast on a training step's products (measurements: docs/training.md).

`linear(x, weight, bias)` is `F.linear` with its products sent to oneDNN where that pays: a CPU
fp32 product outside CPU autocast, large enough (see `MIN_MULTIPLY_ADDS`), with oneDNN present.
Everywhere else (GPU, half precision, autocast, fp64, tiny products) it is `F.linear` itself.
Both compute the same fp32 products with another summation order; results agree to fp32
rounding, and each path is deterministic for a given shape and thread count.

`matmul_nt(a, b, bias)` (a b^T + bias) is the raw oneDNN product, also used by the fused LM
head of `genforge.train.losses`. `use_onednn(model)` installs `OneDNNLinear` layers through the
Linear seam (`genforge.swap`); the trainer calls it on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .swap import swap_linears

__all__ = ["MIN_MULTIPLY_ADDS", "OneDNNLinear", "available", "linear", "matmul_nt", "use_onednn", "uses_onednn"]

# Below this many multiply-adds (rows x in x out) a oneDNN call's fixed cost (primitive lookup)
# loses to MKL; the crossover is measured in docs/training.md.
MIN_MULTIPLY_ADDS = 1 << 20


def available() -> bool:
    """True where torch was built with oneDNN and exposes its linear-layer operator.

    Not cached: it is cheap, and tests switch oneDNN off by patching
    `torch.backends.mkldnn.is_available`."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`a @ b.T (+ bias)` for CPU fp32 `a` (..., k) and `b` (n, k) through oneDNN; `b` may also
    be a weight pre-packed by `torch.ops.mkldnn._reorder_linear_weight` (`inference.PackedLinear`).

    The operands may be row-major or the plain transpose of a row-major tensor (`t.t()`);
    other strided layouts, and a transposed `b` together with a bias, can send oneDNN to its
    reference kernel, ~100x slower, so callers make them `.contiguous()` first.
    """
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, weight, bias)` takes the oneDNN path (see the module docstring)."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu" or bias.dim() != 1):
        return False
    # Under CPU autocast F.linear runs in the autocast dtype; leave that to torch.
    if torch.is_autocast_enabled("cpu"):
        return False
    # Shape errors are F.linear's to report.
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return False
    # Wrapper tensors (DTensor, fake or meta tensors) keep their own dispatch.
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_meta for t in (x, weight)):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows * weight.shape[0] * weight.shape[1] < MIN_MULTIPLY_ADDS:
        return False
    return available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN on CPU fp32 (see the module docstring).

    x (..., in_features), weight (out_features, in_features), bias (out_features) or None.
    """
    if not uses_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    wanted = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not wanted:
        return _forward(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Row-major operands (no copy when they already are), or without a bias a weight that is the
    # plain transpose of a row-major tensor (a gradient's product, W^T): see `matmul_nt`.
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if not (weight.is_contiguous() or (bias is None and weight.t().is_contiguous())):
        weight = weight.contiguous()
    out = matmul_nt(flat, weight, bias.contiguous() if bias is not None else None)
    return out.view(*x.shape[:-1], weight.shape[0])


class _OneDNNLinear(torch.autograd.Function):
    """A linear layer whose forward and backward products all run through oneDNN.

    Only what a wanted gradient needs is kept and computed: a frozen weight saves no input and
    costs no d(W) product; an input that needs no gradient costs no d(x) product.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        want_x, want_weight, _ = ctx.needs_input_grad
        # The inputs themselves are saved, not their row-major copies: a backward that builds a
        # graph (create_graph=True) must reach them to differentiate the gradients again.
        ctx.save_for_backward(x if want_weight else None, weight if want_x else None)
        return _forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        want_x, want_weight, want_bias = ctx.needs_input_grad
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        if torch.is_grad_enabled():
            # create_graph=True (higher-order gradients, e.g. a gradient penalty): oneDNN's
            # operator has no derivative of its own, so the same formulas in differentiable ops.
            return (
                grad_out @ weight if want_x else None,
                grad.t() @ x.reshape(-1, x.shape[-1]) if want_weight else None,
                grad.sum(dim=0) if want_bias else None,
            )
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if want_x:
            # d(x) = d(y) W: a linear layer whose weight is W^T, given as the plain transpose of
            # the row-major W (no bias, a fast layout): no copy of W. A copy cost 5-25% more on
            # a training step's shapes (benchmarks/results/finetune.md).
            rows_major = weight if weight.is_contiguous() else weight.contiguous()
            grad_x = matmul_nt(grad, rows_major.t()).view(*grad_out.shape[:-1], weight.shape[1])
        if want_weight:
            # d(W) = d(y)^T x as (d(y)^T)(x^T)^T: both operands are plain transposes of row-major
            # tensors (a fast layout, no copies) and the result comes out row-major, (out, in),
            # so autograd accumulates it into .grad without another copy.
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            grad_weight = matmul_nt(grad.t(), flat.t())
        if want_bias:
            grad_bias = grad.sum(dim=0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose products go through `linear` (oneDNN on CPU fp32, `F.linear`
    elsewhere). Same parameters and state-dict keys as the layer it replaces."""

    @classmethod
    def wrapping(cls, layer: nn.Linear) -> OneDNNLinear:
        """A OneDNNLinear sharing `layer`'s weight and bias (the same Parameter objects, so tied
        weights and an optimizer built earlier still see them)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight, new.bias = layer.weight, layer.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn(model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> nn.Module:
    """Send the products of `model`'s plain `nn.Linear` layers (those `include`/`exclude`
    select, see `genforge.swap`) through oneDNN, in place, and return the model. Layers of
    another kind (already swapped, adapters, quantized) are left as they are."""

    def onednn_layer(layer: nn.Linear, name: str) -> nn.Module:
        return OneDNNLinear.wrapping(layer) if type(layer) is nn.Linear else layer

    swap_linears(model, onednn_layer, include, exclude)
    return model
