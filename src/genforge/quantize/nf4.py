"""NF4: 4-bit NormalFloat weights with double quantization (Dettmers et al. 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs"), in bitsandbytes' layout.

A weight is cut into blocks of `blocksize` consecutive values (row-major). Each block keeps its
absolute maximum (absmax) and each value the index of the nearest of 16 NF4 levels to
value / absmax. The levels are quantiles of a standard normal, scaled to [-1, 1] with an exact
zero, so that normally distributed weights use every code about equally. Two codes share a
byte, the first value in the high nibble.

Double quantization compresses the fp32 absmax too: bitsandbytes subtracts their mean (the
offset) and quantizes the centred values to 8 bits in blocks of 256 with its dynamic map
(Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning"), keeping one fp32
absmax per block of 256. That takes the statistics from 32 / 64 = 0.5 bits per weight to about
0.127.

Everything here follows `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4",
blocksize=64, compress_statistics=...)` and `dequantize_4bit` operation for operation, and is
checked against them on CPU (tests/test_quantize_nf4.py): the packed codes, the fp32 absmax,
the offset, the nested absmax and every dequantized weight are equal bit for bit. The 8-bit
absmax indices take the nearest dynamic level, as bitsandbytes' pure-torch and CUDA quantizers
do (equal to the former); its native CPU kernel's search lands one level off on a few in a
thousand.

`NF4Linear` decodes on genforge's 4-bit kernel (`quantize.kernels.lut4_linear`, the one INT4
uses, with the NF4 table), which reads the packed bytes, wherever a compiled kernel serves the
product (fp32 weights and inputs on the CPU, no gradient asked, whole blocks per row); elsewhere
it dequantizes the weight on every call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..onednn import linear as onednn_linear
from ..swap import linear_names, swap_linears
from . import kernels

__all__ = [
    "NF4_LEVELS",
    "NF4Error",
    "NF4Linear",
    "NF4Weight",
    "dequantize_nf4",
    "nf4_linear",
    "quantize_linears_nf4",
    "quantize_nf4",
]

# The 16 NF4 levels, as bitsandbytes' get_4bit_type("nf4") hardcodes them (QLoRA's appendix E).
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# A value exactly halfway between two levels takes the lower one: torch.bucketize (right=False)
# over these midpoints, as bitsandbytes' CPU quantizer does.
_NF4_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2

# The dtypes an NF4 weight may have been quantized from (and dequantizes back to), by name.
_WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# bitsandbytes' block sizes for 4-bit quantization.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# A zero block divides by this instead of 0 (bitsandbytes' clamp), so its values all map to 0.
_TINY_ABSMAX = 1e-38


class NF4Error(ValueError):
    """A weight or setting NF4 cannot quantize; the message says what was wrong and what is accepted."""


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map(signed=True)`: the 256 levels of the 8-bit dynamic type
    (Dettmers 2015) that double quantization stores the centred absmax in, built the same way so
    that its float32 values are the same."""
    max_exponent_bits, non_sign_bits = 7, 7
    levels: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        levels += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        levels += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32)


DYNAMIC_LEVELS = _dynamic_map()
_DYNAMIC_MIDPOINTS = (DYNAMIC_LEVELS[:-1] + DYNAMIC_LEVELS[1:]) / 2


@dataclass(frozen=True)
class NF4Weight:
    """A weight in NF4, laid out as bitsandbytes' `quantize_4bit` returns it.

    codes: uint8, numel / 2 bytes, two 4-bit level indices each (the first in the high nibble).
    absmax: one per block of `blocksize` values: fp32, or with double quantization uint8 indices
        into `DYNAMIC_LEVELS` (bitsandbytes' `QuantState.absmax`).
    nested_absmax: with double quantization, fp32, one per block of `double_blocksize` absmax
        (bitsandbytes' `QuantState.state2.absmax`); None without.
    nested_offset: with double quantization, the fp32 mean subtracted from the absmax before
        quantizing them (`QuantState.offset`), a 0-d tensor; None without.
    shape, dtype: the original weight's.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    double_blocksize: int = 256

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def _check_layout(shape: torch.Size, blocksize: int, double_blocksize: int) -> None:
    """Refuse a weight shape or block sizes NF4 cannot take (the checks that need no values)."""
    if len(shape) != 2:
        raise NF4Error(f"NF4 quantizes a 2-D (out_features, in_features) weight; got shape {tuple(shape)}")
    if blocksize not in BLOCKSIZES:
        raise NF4Error(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes); got {blocksize!r}")
    if not isinstance(double_blocksize, int) or double_blocksize < 1:
        raise NF4Error(f"double_blocksize must be a positive int (bitsandbytes uses 256); got {double_blocksize!r}")
    if shape.numel() == 0 or shape.numel() % blocksize:
        # Padding would work, but a silently padded last block changes its absmax and the layout
        # other tools expect; linear layers' sizes are multiples of 64 in practice.
        raise NF4Error(
            f"a weight of shape {tuple(shape)} has {shape.numel()} values, not a (non-zero) multiple "
            f"of blocksize {blocksize}; accepted: weights whose number of values is a multiple of the blocksize"
        )


def _check_weight(weight: torch.Tensor, blocksize: int, double_blocksize: int) -> None:
    if not isinstance(weight, torch.Tensor):
        raise NF4Error(f"NF4 quantizes a torch.Tensor; got {type(weight).__name__}")
    if weight.dtype not in _WEIGHT_DTYPES.values():
        raise NF4Error(f"NF4 quantizes float32, float16 or bfloat16 weights; got {weight.dtype}")
    _check_layout(weight.shape, blocksize, double_blocksize)
    if not torch.isfinite(weight).all():
        raise NF4Error(f"the weight of shape {tuple(weight.shape)} holds inf or NaN; NF4 needs finite values")


def _blockwise_indices(values: torch.Tensor, midpoints: torch.Tensor, blocksize: int):
    """Blockwise absmax quantization of flat fp32 `values` to the level whose midpoints are given:
    (indices, absmax). The last block may be short (bitsandbytes' 8-bit path allows it)."""
    count = values.numel()
    full = count - count % blocksize
    blocks = values[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Multiplying by the reciprocal, not dividing, as bitsandbytes does: the products differ in
    # the last bit for some values, and that bit can move a value across a midpoint.
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=_TINY_ABSMAX)).unsqueeze(1), -1, 1).reshape(-1)
    if full < count:  # the short last block divides, as bitsandbytes' does
        tail_absmax = values[full:].abs().amax().clamp(min=_TINY_ABSMAX)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(values[full:] / tail_absmax, -1, 1)])
    return torch.bucketize(scaled, midpoints).to(torch.uint8), absmax


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, double_blocksize: int = 256
) -> NF4Weight:
    """Quantize a 2-D float weight to NF4 (QLoRA), with double quantization of the block absmax
    when `double_quant`, as bitsandbytes' `quantize_4bit(weight, quant_type="nf4",
    blocksize=blocksize, compress_statistics=double_quant)` does (it always uses
    double_blocksize=256). Each value takes the nearest level; one exactly halfway takes the
    lower. Refuses (NF4Error) a weight that is not 2-D, not float, not finite, or whose number
    of values is not a multiple of `blocksize`, before any work."""
    _check_weight(weight, blocksize, double_blocksize)
    flat = weight.detach().reshape(-1).float()
    indices, absmax = _blockwise_indices(flat, _NF4_MIDPOINTS.to(flat.device), blocksize)
    codes = (indices[0::2] << 4) | indices[1::2]
    if not double_quant:
        return NF4Weight(codes, absmax, weight.shape, weight.dtype, blocksize, double_blocksize=double_blocksize)
    offset = absmax.mean()
    absmax_indices, nested_absmax = _blockwise_indices(
        absmax - offset, _DYNAMIC_MIDPOINTS.to(flat.device), double_blocksize
    )
    return NF4Weight(
        codes, absmax_indices, weight.shape, weight.dtype, blocksize, nested_absmax, offset, double_blocksize
    )


def _absmax_fp32(q: NF4Weight) -> torch.Tensor:
    """The per-block absmax as fp32, decoding the double quantization if there is one."""
    if not q.double_quant:
        return q.absmax
    levels = DYNAMIC_LEVELS.to(q.absmax.device)[q.absmax.long()]
    count = levels.numel()
    full = count - count % q.double_blocksize
    scales = q.nested_absmax
    decoded = (levels[:full].view(-1, q.double_blocksize) * scales[: full // q.double_blocksize].unsqueeze(1)).view(-1)
    if full < count:
        decoded = torch.cat([decoded, levels[full:] * scales[-1]])
    return decoded + q.nested_offset


def _dequantize_codes(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 values of packed `codes` whose blocks have these fp32 `absmax`."""
    indices = torch.stack([codes >> 4, codes & 0xF], dim=1).view(-1).long()
    return (NF4_LEVELS.to(codes.device)[indices].view(-1, blocksize) * absmax.unsqueeze(1)).view(-1)


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """The weight an `NF4Weight` stands for, in its original shape and dtype: equal to
    bitsandbytes' `dequantize_4bit` (computed in fp32, then cast)."""
    return _dequantize_codes(q.codes, _absmax_fp32(q), q.blocksize).view(q.shape).to(q.dtype)


def _weight_rows(q: NF4Weight, chunk_rows: int):
    """(start, stop, rows): the weight dequantized at most `chunk_rows` rows at a time, in its dtype."""
    out_features, in_features = q.shape
    if out_features <= chunk_rows:
        yield 0, out_features, dequantize_nf4(q)
        return
    absmax = _absmax_fp32(q)
    bytes_per_row = in_features // 2
    for start in range(0, out_features, chunk_rows):
        stop = min(start + chunk_rows, out_features)
        codes = q.codes[start * bytes_per_row : stop * bytes_per_row]
        # start and stop are whole rows and whole blocks (chunk_rows is a multiple of the rows per block).
        block_absmax = absmax[start * in_features // q.blocksize : stop * in_features // q.blocksize]
        yield (
            start,
            stop,
            _dequantize_codes(codes, block_absmax, q.blocksize).view(stop - start, in_features).to(q.dtype),
        )


class _NF4Product(torch.autograd.Function):
    """x W^T + b that keeps no dequantized weight for the backward pass: the gradient of x
    dequantizes W again (as bitsandbytes' MatMul4Bit does), so training holds the 4-bit codes
    only. W itself gets no gradient (it is frozen); a trainable bias would get its own. The
    products go through `onednn.linear` (oneDNN on CPU fp32, `F.linear` elsewhere)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, q: NF4Weight, chunk_rows: int) -> torch.Tensor:
        ctx.q, ctx.chunk_rows = q, chunk_rows
        outputs = [
            onednn_linear(x, rows.to(x.dtype), None if bias is None else bias[start:stop])
            for start, stop, rows in _weight_rows(q, chunk_rows)
        ]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            for start, stop, rows in _weight_rows(ctx.q, ctx.chunk_rows):
                # d(x) = d(y) W: a linear layer whose weight is W^T (oneDNN on CPU fp32, as `onednn.linear`).
                part = onednn_linear(grad[..., start:stop], rows.to(grad.dtype).t())
                grad_x = part if grad_x is None else grad_x + part
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None, chunk_rows: int) -> torch.Tensor:
    """x W^T + b with W the NF4 weight `q`, dequantized at most `chunk_rows` rows at a time
    (a whole number of blocks), and dequantized again for the gradient of x rather than kept:
    `NF4Linear`'s product, and QLoRA's base output."""
    return _NF4Product.apply(x, bias, q, chunk_rows)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (QLoRA): y = x W^T + b with W
    dequantized on every call (in row chunks of at most `chunk_values` values, so a large
    layer never holds its whole fp weight at once). The bias stays in floating point, frozen.

    Where a compiled kernel serves the product (see `forward`), it reads the packed bytes
    directly instead (`quantize.kernels`). The packed weight is stored as
    buffers named `weight` (codes), `weight_absmax`, `weight_nested_absmax` and
    `weight_nested_offset`, so the layer's state-dict keys keep its name.

    A quantized layer kind (`kind = "nf4"`) of the saved format (`quantize.saved`): `settings()`
    and `empty(...)` describe and rebuild it.
    """

    kind = "nf4"

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None = None, chunk_values: int = 1 << 24) -> None:
        super().__init__()
        out_features, in_features = q.shape
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_blocksize, self.dtype = q.blocksize, q.double_blocksize, q.dtype
        self.register_buffer("weight", q.codes)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_nested_absmax", q.nested_absmax)
        self.register_buffer("weight_nested_offset", q.nested_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Rows per chunk: as many as fit in chunk_values, and a whole number of blocks.
        rows_per_block = q.blocksize // math.gcd(in_features, q.blocksize)
        self.chunk_rows = max(rows_per_block, chunk_values // in_features // rows_per_block * rows_per_block)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        """An `NF4Linear` holding `linear`'s weight in NF4 and its bias as it was."""
        return cls(quantize_nf4(linear.weight, blocksize, double_quant), linear.bias)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        blocksize: int = 64,
        double_quant: bool = True,
        double_blocksize: int = 256,
        dtype: str = "float32",
    ) -> NF4Linear:
        """A shell with zero tensors shaped and typed as `quantize_nf4` makes them for an
        (out_features, in_features) weight of `dtype` with these settings, for
        `load_state_dict(..., assign=True)` to fill (the saved format's loader)."""
        if dtype not in _WEIGHT_DTYPES:
            raise NF4Error(f"NF4 weight dtype must be one of {', '.join(_WEIGHT_DTYPES)}; got {dtype!r}")
        if not isinstance(double_quant, bool):
            raise NF4Error(f"double_quant is true or false; got {double_quant!r}")
        shape = torch.Size((out_features, in_features))
        _check_layout(shape, blocksize, double_blocksize)
        blocks = shape.numel() // blocksize
        codes = torch.zeros(shape.numel() // 2, dtype=torch.uint8)
        if double_quant:
            q = NF4Weight(
                codes,
                torch.zeros(blocks, dtype=torch.uint8),
                shape,
                _WEIGHT_DTYPES[dtype],
                blocksize,
                torch.zeros(-(-blocks // double_blocksize), dtype=torch.float32),
                torch.zeros((), dtype=torch.float32),
                double_blocksize,
            )
        else:
            absmax = torch.zeros(blocks, dtype=torch.float32)
            q = NF4Weight(codes, absmax, shape, _WEIGHT_DTYPES[dtype], blocksize, double_blocksize=double_blocksize)
        return cls(q, torch.zeros(out_features) if bias else None)

    def settings(self) -> dict:
        """What `empty` needs beyond the shapes and bias, as JSON values."""
        return {
            "blocksize": self.blocksize,
            "double_quant": self.weight_nested_absmax is not None,
            "double_blocksize": self.double_blocksize,
            "dtype": {v: k for k, v in _WEIGHT_DTYPES.items()}[self.dtype],
        }

    def quantized_weight(self) -> NF4Weight:
        """The stored weight as an `NF4Weight`."""
        return NF4Weight(
            self.weight,
            self.weight_absmax,
            torch.Size((self.out_features, self.in_features)),
            self.dtype,
            self.blocksize,
            self.weight_nested_absmax,
            self.weight_nested_offset,
            self.double_blocksize,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32 and self.in_features % self.blocksize == 0 and kernels.compiled_path(x, "lut4"):
            # Whole blocks per row: block g of row o holds columns g * blocksize onwards, the
            # kernel's groups, and each weight is NF4_LEVELS[code] * absmax as dequantize_nf4's.
            packed = self.weight.view(self.out_features, self.in_features // 2)
            absmax = _kernel_absmax(self).view(self.out_features, -1)
            return kernels.lut4_linear(x, packed, NF4_LEVELS, absmax, None, self.blocksize, True, self.bias)
        return nf4_linear(x, self.quantized_weight(), self.bias, self.chunk_rows)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.weight_nested_absmax is not None}"
        )


def _kernel_absmax(layer: NF4Linear) -> torch.Tensor:
    """The layer's fp32 absmax (double quantization decoded), kept between calls and decoded
    again when a buffer is replaced or written to (`load_state_dict`)."""
    buffers = (layer.weight_absmax, layer.weight_nested_absmax, layer.weight_nested_offset)
    key = tuple((b.data_ptr(), b._version) if b is not None else None for b in buffers)
    cached = layer.__dict__.get("_kernel_absmax_cache")
    if cached is None or cached[0] != key:
        cached = (key, _absmax_fp32(layer.quantized_weight()).float().contiguous())
        layer.__dict__["_kernel_absmax_cache"] = cached
    return cached[1]


def quantize_linears_nf4(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
) -> list[str]:
    """Replace the linear layers `swap.swap_linears` selects with `NF4Linear`, in place, and
    return their names. The output head stays in full precision by default, as transformers'
    bitsandbytes integration keeps lm_head (and a tied head shares the embeddings' weight).

    Every selected weight is checked before any layer is replaced, so a bad one leaves the
    model as it was. A model that already has adapters (LoRA's `lora_A`) is refused: their
    wrapped layers are no longer linear layers here, so only the others would be quantized;
    QLoRA quantizes first, then applies LoRA.
    """
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    if adapted:
        raise NF4Error(
            f"this model already has LoRA layers ({adapted[0]}, ...): quantize_linears_nf4 would skip them and "
            "quantize only the rest. For QLoRA call quantize_linears_nf4 first, then apply_lora"
        )
    for name in linear_names(model, include, exclude):
        weight = model.get_submodule(name).weight
        try:
            _check_weight(weight, blocksize, 256)
        except NF4Error as err:
            raise NF4Error(f"{name}: {err}") from None
    return swap_linears(
        model, lambda linear, _: NF4Linear.from_linear(linear, blocksize, double_quant), include, exclude
    )
