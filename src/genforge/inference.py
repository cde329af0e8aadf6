"""Inference-only speedups that leave the model's code and results unchanged.

Decoding a token is a chain of matrix-vector products, so its speed is how fast the weights
stream from memory. On x86 CPUs, PyTorch's default fp32 `F.linear` (MKL, row-major weight)
reaches about 15 GB/s on a batch of one and less on a batch of eight on the 2-core machines
genforge is developed on, while the same product through oneDNN with the weight pre-packed
in its blocked layout reaches 30-37 GB/s for batches 1 to 8 and is ~2.5x faster for a
128-token prefill (numbers from `benchmarks/decode.py`'s machine). `pack_for_cpu_inference`
swaps every `nn.Linear` for such a packed copy. It changes summation order only; the
outputs agree with the unpacked model to fp32 rounding.

Packed weights are opaque: a packed model cannot be trained, wrapped with adapters or
exported. Do those first.
"""

from __future__ import annotations

import torch
from torch import nn

from .onednn import matmul_nt

# oneDNN picks a blocking for the expected number of rows; 128 serves 1-row decode steps,
# small batches and prefills alike (measured within 10% of the best hint for each).
_ROWS_HINT = 128


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` whose weight lives in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().contiguous()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT), persistent=False)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_nt(x, self.packed_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _concatenated(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear computing all of `linears` side by side along the output."""
    fused = nn.Linear(linears[0].in_features, sum(l.out_features for l in linears), bias=linears[0].bias is not None)
    fused.weight.data = torch.cat([l.weight.detach() for l in linears])
    if fused.bias is not None:
        fused.bias.data = torch.cat([l.bias.detach() for l in linears])
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
