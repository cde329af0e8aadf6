"""Inference-only speedups that leave the model's code and results unchanged.

Decoding a token is a chain of matrix-vector products, so its speed is how fast the weights
stream from memory. On x86 CPUs the same fp32 product through oneDNN, with the weight pre-packed
in its blocked layout, streams about twice as fast as torch's default `F.linear` (MKL on a
row-major weight) and is faster again on a prefill (docs/model.md). `pack_for_cpu_inference`
puts such a `PackedLinear` in place of every linear layer, through the Linear seam
(`genforge.swap`). oneDNN's fixed cost per call loses to `F.linear` on small products, so a
`PackedLinear` sends those to `F.linear` on the row-major weight, kept beside the packed one
(`SMALL_PRODUCT_MULTIPLY_ADDS`). Either way only the summation order changes; the outputs
agree with the unpacked model to fp32 rounding.

Packed weights are opaque: a packed model cannot be trained, wrapped with adapters or
exported. Do those first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .onednn import matmul_nt
from .swap import swap_linears

# oneDNN picks a blocking for the expected number of rows; 128 serves 1-row decode steps,
# small batches and prefills alike (measured within 10% of the best hint for each).
_ROWS_HINT = 128

# Products of fewer multiply-adds (rows x in x out) than this go to `F.linear`, larger ones to
# the packed oneDNN weight: a oneDNN call has a fixed cost that MKL's small products do not, and
# MKL streams a weight that is not in L2 at about half oneDNN's speed. The cut was measured in
# whole decode steps of draft- and target-sized models (docs/model.md, "Where small products go").
SMALL_PRODUCT_MULTIPLY_ADDS = 100_000


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` whose weight lives in oneDNN's blocked layout, and which sends
    products too small for oneDNN to `F.linear` instead.

    Each call is routed by its size, rows x in x out multiply-adds: under
    `SMALL_PRODUCT_MULTIPLY_ADDS` (a single-token decode step of a small model, for example)
    `F.linear` on the plain row-major weight, otherwise the pre-packed oneDNN product (prefills,
    batches, and every product of a model of GPT-2's size). Both paths compute the same fp32
    products in another summation order, so results agree to fp32 rounding.

    Memory: the plain weight is kept only by a layer with in x out under the threshold, the
    only layers where some row count can take that path; such a layer holds its weight twice
    (plain and packed, under 100k floats = 400 KB each). A plain weight that is shared with
    another module (an LM head tied to the embeddings) costs nothing more. Larger layers keep
    the packed copy only.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().contiguous()
        self.register_buffer(
            "packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT), persistent=False
        )
        bias = linear.bias.detach().contiguous() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        small = self.in_features * self.out_features < SMALL_PRODUCT_MULTIPLY_ADDS
        self.register_buffer("plain_weight", weight if small else None, persistent=False)
        # rows x in x out < threshold  <=>  x.numel() < this (x.numel() is rows x in): one
        # integer comparison per call.
        self._plain_below_numel = -(-SMALL_PRODUCT_MULTIPLY_ADDS // self.out_features) if small else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"PackedLinear expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        if x.numel() < self._plain_below_numel:
            return F.linear(x, self.plain_weight, self.bias)
        return matmul_nt(x, self.packed_weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"plain_weight={self.plain_weight is not None}"
        )


def can_pack(model: nn.Module) -> bool:
    """True on a CPU fp32 model where oneDNN is available."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    )


def pack_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Put a `PackedLinear` in place of every linear layer of a CPU fp32 model, in place.

    Returns the model unchanged where packing does not apply (GPU, half precision, no oneDNN).
    """
    if not can_pack(model):
        return model
    model.eval().requires_grad_(False)
    swap_linears(model, lambda layer, name: PackedLinear(layer))
    model.packed_for_inference = True
    return model
