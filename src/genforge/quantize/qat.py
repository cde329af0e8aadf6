"""Quantization-aware training (QAT) for INT4 weights: train through the rounding.

Post-training quantizers (round-to-nearest, GPTQ, AWQ) fix the weights first and round them
after; QAT rounds during training, so the loss sees the INT4 model and the other weights
learn to make up for each layer's rounding (Jacob et al. 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference"; for LLM weights, e.g. Liu
et al. 2023, "LLM-QAT").

`prepare_qat` swaps the selected linear layers (through `swap.swap_linears`) for
`FakeQuantLinear`: the same `weight` and `bias` Parameters (so an optimizer, a checkpoint and
the state dict see exactly what they saw), whose forward uses the weight rounded to its INT4
grid (`grid.quantize_int4`, asymmetric per group) and dequantized. Rounding has zero gradient
almost everywhere, so the backward pass uses the straight-through estimator (Bengio et al.
2013): the gradient with respect to the rounded weight is passed to the fp weight unchanged.
The fp weights are the "latent" weights; the grids are recomputed from them at every step.
`convert_qat` returns the final grids and puts plain `nn.Linear` layers back.

The layers work inside genforge's `train.Trainer` (it leaves linear layers that are not plain
`nn.Linear` alone, and the head stays a plain layer, which its fused loss reads). Where the
error comes from: the same round-to-nearest grid as RTN, on weights trained to sit well on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..swap import linear_names, plain_linear, swap_linears
from .grid import GridError, Int4Grid, check_group_size, dequantize_int4, quantize_int4

__all__ = ["FakeQuantLinear", "QATError", "convert_qat", "fake_quantize_int4", "prepare_qat"]

DEFAULT_EXCLUDE = ("lm_head",)


class QATError(ValueError):
    """A model or setting quantization-aware training cannot take; the message says what was
    wrong and what is accepted."""


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`weight` rounded to its INT4 grid and dequantized, with the straight-through gradient:
    the forward value is the grid's, the gradient flows to `weight` as if rounding were the
    identity."""
    with torch.no_grad():
        rounded = dequantize_int4(quantize_int4(weight, group_size)).to(weight.dtype)
    return weight + (rounded - weight).detach()


class FakeQuantLinear(nn.Linear):
    """An `nn.Linear` whose forward uses its weight rounded to the INT4 grid (straight-through
    gradient). It holds the layer's own `weight` and `bias` Parameters."""

    def __init__(self, layer: nn.Linear, group_size: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight, self.bias = layer.weight, layer.bias
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize_int4(self.weight, self.group_size), self.bias)

    def grid(self) -> Int4Grid:
        """The INT4 grid of the current weight (what the forward uses)."""
        return quantize_int4(self.weight.detach(), self.group_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def prepare_qat(
    model: nn.Module,
    group_size: int = 128,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Swap `model`'s selected linear layers for `FakeQuantLinear`, in place; return their names.

    Every selected layer is checked before any is swapped: its input features must be a
    multiple of `group_size` (32, 64 or 128). The LM head is refused: it is usually tied to
    the embeddings, and genforge's Trainer applies it inside a fused loss that reads its fp
    weight.
    """
    names = linear_names(model, include, exclude)
    if not names:
        raise QATError("no linear layer is selected for quantization-aware training; check include / exclude")
    already = [name for name in names if isinstance(model.get_submodule(name), FakeQuantLinear)]
    if already:
        raise QATError(f"{', '.join(already)} already fake-quantize; call convert_qat before preparing again")
    head = getattr(model, "lm_head", None)
    for name in names:
        layer = model.get_submodule(name)
        if head is not None and layer is head:
            raise QATError(
                f"{name} is the LM head; it stays in fp (often tied to the embeddings, and the Trainer's fused "
                "loss reads its weight directly): exclude it"
            )
        try:
            check_group_size(layer.in_features, group_size)
        except GridError as error:
            raise QATError(f"{name}: {error}") from None
    return swap_linears(model, lambda layer, name: FakeQuantLinear(layer, group_size), names)


def convert_qat(model: nn.Module) -> dict[str, Int4Grid]:
    """The INT4 grids of `model`'s `FakeQuantLinear` layers by name, and plain `nn.Linear`
    layers back in their place (holding the same fp latent weights, which are left as they
    are: the grids are the quantized model)."""
    names = linear_names(model, kinds=(FakeQuantLinear,))
    names = [name for name in names if isinstance(model.get_submodule(name), FakeQuantLinear)]
    if not names:
        raise QATError("the model has no fake-quantized layer; call prepare_qat and train first")
    grids = {name: model.get_submodule(name).grid() for name in names}
    swap_linears(model, plain_linear, names, kinds=(FakeQuantLinear,))
    return grids
