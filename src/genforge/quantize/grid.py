"""Integer grids for weights: round-to-nearest (RTN) INT8 per output channel and INT4 per group.

Every integer weight format in genforge is one of two grids, and every method that quantizes
weights (round-to-nearest, GPTQ, AWQ, SmoothQuant's weights, quantization-aware training)
lands on one of them, so one layer type and one kernel serve them all:

- **INT8, symmetric, per output channel**: w[o, i] = codes[o, i] * scale[o], codes in
  [-127, 127], scale[o] = max_i |w[o, i]| / 127. The grid is symmetric (no -128) so that
  negating a weight negates its code.
- **INT4, asymmetric, per group**: the input dimension is cut into groups of `group_size`
  consecutive columns; each (row, group) has a scale and an integer zero point, and
  w[o, i] = (codes[o, i] - zeros[o, g]) * scales[o, g] with codes and zeros in [0, 15] and
  g = i // group_size. The grid spans [min(w, 0), max(w, 0)] of the group, so 0 is exact,
  as GPTQ's and AWQ's quantizers make it.

Packed INT4 storage holds two codes per byte: column 2j in the low nibble, 2j + 1 in the high.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "GROUP_SIZES",
    "GridError",
    "check_group_size",
    "codes_on_grid",
    "Int4Grid",
    "Int8Grid",
    "dequantize_int4",
    "dequantize_int8",
    "int4_grid",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "unpack_int4",
]

GROUP_SIZES = (32, 64, 128)
INT8_MAX = 127
INT4_MAX = 15
# A row or group of zeros gets this scale instead of 0, so its codes are all the zero point.
_TINY_SCALE = 1e-12


class GridError(ValueError):
    """A weight or setting a grid cannot take; the message says what was wrong and what is accepted."""


def _check_weight(weight: torch.Tensor, what: str) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise GridError(f"{what} quantizes a floating-point torch.Tensor; got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise GridError(
            f"{what} quantizes a non-empty 2-D (out_features, in_features) weight; got {tuple(weight.shape)}"
        )
    if not torch.isfinite(weight).all():
        raise GridError(f"{what}: the weight of shape {tuple(weight.shape)} holds inf or NaN; it needs finite values")


def check_group_size(in_features: int, group_size: int) -> None:
    """Refuse a group size INT4 does not take, or one that does not divide the layer's inputs."""
    if group_size not in GROUP_SIZES:
        raise GridError(f"group size must be one of {GROUP_SIZES}; got {group_size!r}")
    if in_features % group_size:
        raise GridError(
            f"group size {group_size} does not divide the layer's {in_features} input features; "
            f"choose one of {[g for g in GROUP_SIZES if in_features % g == 0] or 'none: leave this layer in fp'}"
        )


@dataclass(frozen=True)
class Int8Grid:
    """An INT8 weight: codes (int8, out x in) and one fp32 scale per output row."""

    codes: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class Int4Grid:
    """An INT4 weight before packing: codes (uint8 in [0, 15], out x in), and per (row, group)
    fp32 scales and uint8 zero points (out x in / group_size)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int


def quantize_int8(weight: torch.Tensor) -> Int8Grid:
    """Round-to-nearest INT8, symmetric per output channel."""
    _check_weight(weight, "INT8")
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=_TINY_SCALE)
    codes = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Grid(codes, scale)


def dequantize_int8(grid: Int8Grid) -> torch.Tensor:
    """The fp32 weight an `Int8Grid` stands for."""
    return grid.codes.float() * grid.scale[:, None]


def int4_grid(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) of the asymmetric INT4 grid over each group of `weight`'s columns: the
    grid spans [min(w, 0), max(w, 0)] with an integer zero point. `weight` may be any number of
    whole groups wide (GPTQ asks for one group at a time)."""
    w = weight.detach().float()
    groups = w.reshape(w.shape[0], -1, group_size)
    low = groups.amin(dim=2).clamp(max=0)
    high = groups.amax(dim=2).clamp(min=0)
    scales = ((high - low) / INT4_MAX).clamp(min=_TINY_SCALE)
    zeros = torch.round(-low / scales).clamp(0, INT4_MAX)
    return scales, zeros.to(torch.uint8)


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> Int4Grid:
    """Round-to-nearest INT4, asymmetric per group of `group_size` input columns."""
    _check_weight(weight, "INT4")
    check_group_size(weight.shape[1], group_size)
    scales, zeros = int4_grid(weight, group_size)
    codes = codes_on_grid(weight, scales, zeros, group_size)
    return Int4Grid(codes, scales, zeros, group_size)


def codes_on_grid(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The nearest INT4 codes of `weight` on a given grid (uint8, same shape as `weight`)."""
    w = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    codes = torch.round(w / scales[..., None]) + zeros[..., None].float()
    return codes.clamp(0, INT4_MAX).to(torch.uint8).reshape(weight.shape)


def dequantize_int4(grid: Int4Grid) -> torch.Tensor:
    """The fp32 weight an `Int4Grid` stands for."""
    out_features, in_features = grid.codes.shape
    codes = grid.codes.float().reshape(out_features, -1, grid.group_size)
    weight = (codes - grid.zeros[..., None].float()) * grid.scales[..., None]
    return weight.reshape(out_features, in_features)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two INT4 codes per byte (column 2j low nibble, 2j + 1 high): out x in/2 uint8."""
    if codes.shape[-1] % 2:
        raise GridError(f"INT4 packing needs an even number of columns; got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The codes `pack_int4` packed."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
