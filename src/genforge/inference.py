"""Inference-only speedups that leave the model's code and results unchanged.

Decoding a token is a chain of matrix-vector products, so its speed is how fast the weights
stream from memory. On x86 CPUs, PyTorch's default fp32 `F.linear` (MKL, row-major weight)
reaches about 15 GB/s on a batch of one and less on a batch of eight on the 2-core machines
genforge is developed on, while the same product through oneDNN with the weight pre-packed
in its blocked layout reaches 30-37 GB/s for batches 1 to 8 and is ~2.5x faster for a
128-token prefill (numbers from `benchmarks/decode.py`'s machine). `pack_for_cpu_inference`
swaps every `nn.Linear` for such a packed copy. oneDNN's fixed cost per call (~13 us) loses to
`F.linear` on small products, so a `PackedLinear` sends those to `F.linear` on the row-major
weight, kept beside the packed one (`SMALL_PRODUCT_MULTIPLY_ADDS`): the decode steps of small
models, such as a speculative-decoding draft, are made of them. Either way only the summation
order changes; the outputs agree with the unpacked model to fp32 rounding.

Packed weights are opaque: a packed model cannot be trained, wrapped with adapters or
exported. Do those first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .onednn import matmul_nt

# oneDNN picks a blocking for the expected number of rows; 128 serves 1-row decode steps,
# small batches and prefills alike (measured within 10% of the best hint for each).
_ROWS_HINT = 128

# Products of fewer multiply-adds (rows x in x out) than this go to `F.linear`, larger ones to
# the packed oneDNN weight. A oneDNN call costs a fixed ~12-15 us (primitive lookup and
# dispatch) whatever its size; MKL's small products have almost no fixed cost but stream a
# weight that is not in the core's L2 (1 MB) at about half oneDNN's speed. Measured on the
# 2-core AMD EPYC (Zen 5), us per call, x of shape (1, rows, in), F.linear / packed:
#   - one weight called again and again (it stays in L2), 23 shapes x rows 1-32: the two meet
#     near 300-500k (2 threads: 128x2048 x 1 row 18.0 / 23.4, 256x1376 x 1 23.5 / 24.0,
#     256x2048 x 1 35.3 / 29.3, 128x768 x 4 20.6 / 17.6);
#   - cycling through 48 MB of copies of the weight (read from memory, 1 thread): they meet
#     near 50-60k (384x128 x 2 rows 19.8 / 19.9, 256x256 x 1 24.1 / 21.6, 128x768 x 1 43 / 28);
#   - whole decode steps, where a layer's weight was last touched a step ago (1 thread, 1 row,
#     10th percentile over thousands of steps alternating the cut every step, ms):
#       model (linear weights)      cut: 0      60k    100k   150k   200k   300k   400k
#       d=128 x 1 layer  (1.8 MB)        0.316  0.265  0.243  0.240  0.239  0.245  0.221
#       d=128 x 4 layers (4.0 MB)        0.979  0.772  0.729  0.696  0.665  0.708  0.659
#       d=256 x 2 layers (7.5 MB)        0.668  0.630  0.611  0.606  0.611  0.571  0.689
#       d=256 x 6 layers (18.6 MB)       1.986  1.759  1.780  1.829  1.909  1.889  2.248
#     (llama-shaped, 4 heads / 2 kv heads, vocabulary 2048; the speculative benchmark's draft
#     and target are the first and last). The d=256 models lose 15-30% once their 1376-wide
#     MLP (352k) goes to F.linear, so the cut belongs well under that; repeat runs move by ~5%,
#     so a longer run settled the rest. Cuts 0 / 100k / 150k, 20 s each:
#       draft, d=128 x 1 (trained)       0.285 / 0.235 / 0.234
#       d=128 x 4                        0.833 / 0.619 / 0.602
#       d=256 x 2                        0.559 / 0.541 / 0.540
#       target, d=256 x 6 (trained)      1.754 / 1.770 / 1.854
#     100k takes nearly all of the small models' gain and leaves the target as it was (its
#     256x512 q/k/v at 131k, streamed from L3, is where F.linear starts to lose). With 2 and 4
#     rows (1 thread), cuts from 100k to 200k were within 5% of each other, 3-13% faster than 0
#     on the d=128 models and within 2% of 0 on the target. The 8-layer d=384 target (51 MB),
#     SmolLM-135M and GPT-2 (smallest products 147k, 332k and 590k once q, k, v are fused)
#     keep the packed path everywhere: decoding them is unchanged.
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
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT), persistent=False)
        bias = linear.bias.detach().contiguous() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        small = self.in_features * self.out_features < SMALL_PRODUCT_MULTIPLY_ADDS
        self.register_buffer("plain_weight", weight if small else None, persistent=False)
        # rows x in x out < threshold  <=>  x.numel() < this (x.numel() is rows x in): one
        # integer comparison per call.
        self._plain_below_numel = -(-SMALL_PRODUCT_MULTIPLY_ADDS // self.out_features) if small else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"PackedLinear expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}"
            )
        if x.numel() < self._plain_below_numel:
            return F.linear(x, self.plain_weight, self.bias)
        return matmul_nt(x, self.packed_weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"plain_weight={self.plain_weight is not None}")


def _concatenated(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear computing all of `linears` side by side along the output."""
    fused = nn.Linear(linears[0].in_features, sum(linear.out_features for linear in linears), bias=linears[0].bias is not None)
    fused.weight.data = torch.cat([linear.weight.detach() for linear in linears])
    if fused.bias is not None:
        fused.bias.data = torch.cat([linear.bias.detach() for linear in linears])
    return fused


def can_pack(model: nn.Module) -> bool:
    """True on a CPU fp32 model where oneDNN is available."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    )


def pack_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of a CPU fp32 model with a `PackedLinear`, in place.

    Returns the model unchanged where packing does not apply (GPU, half precision, no oneDNN).
    """
    if not can_pack(model):
        return model
    from .model import MLP, Attention

    model.eval().requires_grad_(False)
    for module in list(model.modules()):
        # Projections that read the same input become one matmul: fewer, larger calls.
        if isinstance(module, Attention) and module.qkv is None:
            module.qkv = PackedLinear(_concatenated(module.q, module.k, module.v))
            del module.q, module.k, module.v
        elif isinstance(module, MLP) and module.gate is not None and module.gate_up is None:
            module.gate_up = PackedLinear(_concatenated(module.gate, module.up))
            del module.gate, module.up
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
    model.packed_for_inference = True
    return model


def is_packed(model: nn.Module) -> bool:
    return getattr(model, "packed_for_inference", False)
