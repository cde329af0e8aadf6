"""Weight-only INT8 and INT4 linear layers: weights stored on `quantize.grid`'s integer grids,
activations and sums in fp32, products computed from the packed bytes.

Weight-only quantization (as in GPTQ, Frantar et al. 2022, and AWQ, Lin et al. 2023, which
produce the same INT4 grid) shrinks what a decode step must stream from memory, the cost of a
batch-1 token, without touching the activations:

- `Int8Linear` (kind "int8"): int8 codes, symmetric per output channel, one fp32 scale per row:
  8 + 32 / in_features bits per weight.
- `Int4Linear` (kind "int4"): 4-bit codes, two per byte (column 2j in the low nibble), one
  fp32 scale and one uint8 zero point per group of 32, 64 or 128 input columns: 4 + 40 /
  group_size bits per weight (4.31 at 128). GPTQ and AWQ results (an `grid.Int4Grid`) become
  layers through `Int4Linear.from_grid`.

The products run on genforge's kernels (`quantize.kernels`), which turn codes into fp32 in
registers; `dequantized_weight()` is the fp32 weight they stand for, and the output equals
x @ dequantized_weight().T + bias up to summation order. The layers are frozen (no gradient
for the weight); a gradient of x, where one is asked for, goes through the pure-torch path.

`quantize_weights(model, "int8" | "int4")` installs them through the Linear seam.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..swap import linear_names, swap_linears
from . import kernels
from .grid import (
    GROUP_SIZES,
    GridError,
    Int4Grid,
    Int8Grid,
    check_group_size,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

__all__ = ["DEFAULT_EXCLUDE", "METHODS", "Int4Linear", "Int8Linear", "quantize_weights"]

METHODS = ("int8", "int4")
# What a code stands for before its group's zero point and scale: the INT4 codes themselves.
_INT4_LEVELS = torch.arange(16, dtype=torch.float32)
# The output head is quantized too, by default: measured in `quantize_weights`' docstring.
DEFAULT_EXCLUDE: tuple[str, ...] = ()


def _frozen_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)


def _check_bias(bias: torch.Tensor | None, out_features: int) -> None:
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise GridError(f"bias must have shape ({out_features},), one value per output row; got {tuple(bias.shape)}")


class Int8Linear(nn.Module):
    """A frozen linear layer whose weight is INT8, symmetric per output channel:
    W = weight[o, i] * weight_scale[o] (`grid.quantize_int8`), y = x W^T + bias in fp32.

    Buffers: `weight` (int8, out x in), `weight_scale` (fp32, out); `bias` an fp32 Parameter
    that needs no gradient, or None.
    """

    kind = "int8"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.numel() == 0:
            raise GridError(f"INT8 codes are a non-empty 2-D int8 tensor; got {codes.dtype} {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        if tuple(scale.shape) != (out_features,):
            raise GridError(
                f"INT8 scale must have shape ({out_features},), one per output row; got {tuple(scale.shape)}"
            )
        _check_bias(bias, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", codes.contiguous())
        self.register_buffer("weight_scale", scale.detach().float().contiguous())
        self.bias = _frozen_bias(bias)

    def settings(self) -> dict:
        return {}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool) -> Int8Linear:
        """A layer of zeros of the right shapes and dtypes, for `load_state_dict(..., assign=True)`."""
        return cls(
            torch.zeros(out_features, in_features, dtype=torch.int8),
            torch.zeros(out_features),
            torch.zeros(out_features) if bias else None,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """`linear`'s weight rounded to the nearest INT8 (per output channel), its bias as it was."""
        return cls.from_grid(quantize_int8(linear.weight), linear.bias)

    @classmethod
    def from_grid(cls, grid: Int8Grid, bias: torch.Tensor | None = None) -> Int8Linear:
        """A layer holding an `Int8Grid` (from round-to-nearest or any method that lands on it)."""
        return cls(grid.codes, grid.scale, bias)

    def grid(self) -> Int8Grid:
        return Int8Grid(self.weight, self.weight_scale)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight (out x in) the layer multiplies by."""
        return dequantize_int8(self.grid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """A frozen linear layer whose weight is INT4, asymmetric per group of `group_size` input
    columns: W[o, i] = (code[o, i] - weight_zeros[o, g]) * weight_scale[o, g], g = i // group_size
    (`grid.quantize_int4`, and GPTQ's and AWQ's grid), y = x W^T + bias in fp32.

    Buffers: `weight` (uint8, out x in / 2: two codes a byte, column 2j in the low nibble),
    `weight_scale` (fp32, out x in / group_size), `weight_zeros` (uint8, the same shape);
    `bias` an fp32 Parameter that needs no gradient, or None.
    """

    kind = "int4"

    def __init__(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.numel() == 0:
            raise GridError(
                f"packed INT4 codes are a non-empty 2-D uint8 tensor (out, in / 2); got {packed.dtype} "
                f"{tuple(packed.shape)}"
            )
        out_features, in_features = packed.shape[0], packed.shape[1] * 2
        check_group_size(in_features, group_size)
        groups = (out_features, in_features // group_size)
        if tuple(scale.shape) != groups or tuple(zeros.shape) != groups:
            raise GridError(
                f"INT4 scales and zeros must have shape {groups} (rows, groups of {group_size}); got "
                f"{tuple(scale.shape)} and {tuple(zeros.shape)}"
            )
        if zeros.dtype != torch.uint8:
            raise GridError(f"INT4 zero points are uint8 in [0, 15]; got {zeros.dtype}")
        _check_bias(bias, out_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", packed.contiguous())
        self.register_buffer("weight_scale", scale.detach().float().contiguous())
        self.register_buffer("weight_zeros", zeros.contiguous())
        self.bias = _frozen_bias(bias)

    def settings(self) -> dict:
        return {"group_size": self.group_size}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, group_size: int = 128) -> Int4Linear:
        """A layer of zeros of the right shapes and dtypes, for `load_state_dict(..., assign=True)`."""
        check_group_size(in_features, group_size)
        groups = in_features // group_size
        return cls(
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8),
            torch.zeros(out_features, groups),
            torch.zeros(out_features, groups, dtype=torch.uint8),
            group_size,
            torch.zeros(out_features) if bias else None,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        """`linear`'s weight rounded to the nearest INT4 per group, its bias as it was."""
        return cls.from_grid(quantize_int4(linear.weight, group_size), linear.bias)

    @classmethod
    def from_grid(cls, grid: Int4Grid, bias: torch.Tensor | None = None) -> Int4Linear:
        """A layer holding an `Int4Grid`: round-to-nearest, GPTQ or AWQ codes with their grid."""
        if grid.codes.dim() != 2 or grid.codes.dtype != torch.uint8 or int(grid.codes.max()) > 15:
            raise GridError("an Int4Grid's codes are a 2-D uint8 tensor of values in [0, 15]")
        return cls(pack_int4(grid.codes), grid.scales, grid.zeros, grid.group_size, bias)

    def grid(self) -> Int4Grid:
        return Int4Grid(unpack_int4(self.weight), self.weight_scale, self.weight_zeros, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight (out x in) the layer multiplies by."""
        return dequantize_int4(self.grid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.lut4_linear(
            x, self.weight, _INT4_LEVELS, self.weight_scale, self.weight_zeros, self.group_size, False, self.bias, True
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}"
        )


def quantize_weights(
    model: nn.Module,
    method: str,
    group_size: int = 128,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Replace the linear layers `swap.swap_linears` selects with `Int8Linear` ("int8") or
    `Int4Linear` ("int4", groups of `group_size` input columns), round to nearest, in place;
    return their names.

    The output head is quantized too unless `exclude` names it (`exclude=("lm_head",)`). It is
    the largest single product of a small model's decode step (GPT-2's 50257 x 768 head is 31%
    of its weights, SmolLM-135M's 49152 x 576 one 21%), and benchmarks/quantize_kernels.py
    measured both ways (2-core EPYC, 2 threads, batch 1): GPT-2's whole step of products runs
    3.89x faster than fp32 in INT8 and 5.25x in INT4 with the head quantized, but only 2.19x
    and 2.45x with an fp32 head (SmolLM-135M: 4.02x / 4.70x against 2.57x / 2.64x). The
    quality cost of the head was small on a small model pretrained on standard-library
    source: held-out perplexity 0.9998x fp32's with an INT8 head (1.0000x with an fp32 head),
    1.0001x with an INT4 head in groups of 64 (0.9991x), 1.0019x in groups of 32 (0.9991x).
    So the head goes with the rest by default. A tied head (GPT-2, SmolLM) gets quantized codes
    of its own; the embeddings stay fp32 for the lookup, so a checkpoint grows by the head's
    codes while a decode step reads only those.

    Every selected weight is checked before any layer is replaced, so a bad one (not 2-D, not
    finite, or for INT4 an input size the group size does not divide) is refused with its
    layer's name and leaves the model as it was. A model packed for inference
    (`inference.pack_for_cpu_inference`) or one with LoRA layers is refused: their layers are
    no longer linear layers here. Quantize first, then pack or adapt.
    """
    if method not in METHODS:
        raise GridError(f"method must be one of {METHODS}; got {method!r}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise GridError(f"group size must be one of {GROUP_SIZES}; got {group_size!r}")
    if getattr(model, "packed_for_inference", False):
        raise GridError(
            "this model is packed for CPU inference (PackedLinear layers); quantize_weights needs its nn.Linear "
            "layers: quantize before pack_for_cpu_inference"
        )
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    if adapted:
        raise GridError(
            f"this model has LoRA layers ({adapted[0]}, ...): quantize_weights would skip them and quantize only "
            "the rest. Merge the adapters first (finetune.merge), or quantize before applying LoRA"
        )
    for name in linear_names(model, include, exclude):
        weight = model.get_submodule(name).weight
        if weight.dim() != 2 or not weight.is_floating_point() or not torch.isfinite(weight).all():
            raise GridError(
                f"{name}: quantize_weights takes a finite 2-D floating-point weight; got {weight.dtype} "
                f"{tuple(weight.shape)}"
                + ("" if not weight.is_floating_point() or torch.isfinite(weight).all() else " holding inf or NaN")
            )
        if method == "int4":
            try:
                check_group_size(weight.shape[1], group_size)
            except GridError as err:
                raise GridError(f"{name}: {err}") from None

    def quantized(linear: nn.Linear, _name: str) -> nn.Module:
        if method == "int8":
            return Int8Linear.from_linear(linear)
        return Int4Linear.from_linear(linear, group_size)

    with torch.no_grad():
        return swap_linears(model, quantized, include, exclude)
