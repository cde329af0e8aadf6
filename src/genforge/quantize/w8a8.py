"""W8A8 linear layers: INT8 weights and INT8 activations, multiplied in integers.

Weight-only quantization (NF4, INT4, GPTQ) saves memory but still multiplies in floating point.
Quantizing the activations too lets the product itself run as int8 x int8 -> int32 and be
scaled back once per output: y[m, n] = s_x[m] * s_w[n] * sum_k qx[m, k] qw[n, k] + b[n]
(Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"; Dettmers et al. 2022 for the per-token scales).

Weights are always the shared INT8 grid (`grid.quantize_int8`: symmetric, [-127, 127], one
scale per output channel, or one for the whole tensor). Activations are quantized in one of
three ways:

- **per token, at run time** (`DynamicInt8Linear`, activation="per_token", the default): each
  row of x gets its own symmetric scale max|x[m]| / 127. One large token costs only its own row.
- **per tensor, affine, at run time** (`DynamicInt8Linear`, activation="per_tensor"): the
  arithmetic of torch.ao's dynamic quantization (`torch.ao.quantization.quantize_dynamic`, the
  fbgemm / x86 engine): one uint8 grid over [min(x, 0), max(x, 0)] with a zero point, chosen as
  fbgemm's `ChooseQuantizationParams` chooses it, over 0..127 with `reduce_range` (fbgemm's
  default, which keeps its 16-bit intermediate sums from saturating) or 0..255 without.
- **per tensor, fixed** (`StaticInt8Linear`): a scale (and zero point when asymmetric) chosen
  once from calibration data (`observers.calibrate`), so nothing is measured at run time.

The int32 products come from `torch._int_mm` on CPUs with AVX-512 (VNNI does the int8 dot
products); elsewhere from fp32 products of the codes over slices of the inner dimension short
enough that every partial sum is an exact integer in fp32, so both paths give the same int32
result. These are inference layers: no gradient flows through the rounding.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .grid import INT8_MAX, GridError, quantize_int8

__all__ = [
    "ACTIVATION_MODES",
    "ActivationQuantError",
    "DynamicInt8Linear",
    "StaticInt8Linear",
    "WEIGHT_GRANULARITIES",
    "affine_qparams",
    "int8_matmul",
    "quantize_affine",
    "quantize_per_token",
    "quantize_weight_int8",
]

ACTIVATION_MODES = ("per_token", "per_tensor")
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
# A row of zeros gets this absmax instead of 0, so its codes are all 0 (no division by zero).
_TINY = 1e-12
# fbgemm's floor on an affine scale (ChooseQuantizationParams' SMALL_SCALE_THRESHOLD).
_SMALL_SCALE = 6.1e-5
# Inner-dimension slice of the fp32 fallback: 1024 * 128 * 127 < 2^24, so each partial sum of
# int8 products is an exact integer in fp32.
_EXACT_FP32_SLICE = 1024


class ActivationQuantError(ValueError):
    """A layer, model or setting activation quantization cannot take; the message says what was
    wrong and what is accepted."""


# --------------------------------------------------------------------------- integer products
@functools.cache
def _cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _int_mm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "cpu":
        # Without AVX-512 torch._int_mm is a scalar loop, slower than the fp32 fallback.
        return _cpu_has_avx512()
    if a.device.type == "cuda":
        m, k = a.shape
        return m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0
    return False


def int8_matmul(a: torch.Tensor, b: torch.Tensor, use_int_mm: bool | None = None) -> torch.Tensor:
    """a @ b.T in exact integers: a (M, K) and b (N, K) int8, result (M, N) int32.

    `torch._int_mm` where it is fast (`use_int_mm=None` decides; True or False forces a path),
    else fp32 products of the codes over slices of at most 1024 inner columns, each an exact
    integer, summed in int32 (fp64 off the CPU, where fp32 products may run as TF32)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ActivationQuantError(
            f"int8_matmul multiplies int8 (M, K) by int8 (N, K); got {a.dtype} {tuple(a.shape)} "
            f"and {b.dtype} {tuple(b.shape)}"
        )
    if a.shape[0] == 0:
        return torch.zeros(0, b.shape[0], dtype=torch.int32, device=a.device)
    if use_int_mm is None:
        use_int_mm = _int_mm_usable(a, b)
    if use_int_mm:
        # b.t() is a view: _int_mm reads the (N, K) codes in place, faster than a transposed copy.
        return torch._int_mm(a, b.t())
    if a.device.type != "cpu":
        return (a.double() @ b.double().t()).to(torch.int32)
    total = None
    for start in range(0, a.shape[1], _EXACT_FP32_SLICE):
        stop = start + _EXACT_FP32_SLICE
        part = (a[:, start:stop].float() @ b[:, start:stop].float().t()).to(torch.int32)
        total = part if total is None else total + part
    return total


# ----------------------------------------------------------------------- activation quantizers
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per row of a 2-D x: (codes int8 (M, K), absmax fp32 (M,)), with
    x[m] ~ codes[m] * absmax[m] / 127. Codes are round(x * (127 / absmax)), multiplying by the
    reciprocal as bitsandbytes' `int8_vectorwise_quant` does, so the two give the same codes."""
    absmax = x.abs().amax(dim=1).float().clamp(min=_TINY)
    codes = torch.round(x * (INT8_MAX / absmax)[:, None]).to(torch.int8)
    return codes, absmax


def affine_qparams(low: float, high: float, reduce_range: bool) -> tuple[float, int]:
    """(scale, zero_point) of the uint8 grid over [min(low, 0), max(high, 0)], as fbgemm's
    `ChooseQuantizationParams` (what torch.ao's dynamic linear uses) computes them: the scale
    in float64 then rounded to fp32, floored at 6.1e-5, and the zero point taken from whichever
    end of the range loses less, rounded and clamped to the grid."""
    qmin, qmax = 0, 127 if reduce_range else 255
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / (qmax - qmin)
    scale32 = torch.tensor(scale, dtype=torch.float32)
    # fbgemm precomputes 1 / scale in fp32; a scale whose reciprocal overflows is replaced.
    if scale32 == 0 or torch.isinf(1 / scale32):
        scale = 0.1
    if scale < _SMALL_SCALE:
        original, scale = scale, _SMALL_SCALE
        if low == 0.0:
            high = _SMALL_SCALE * (qmax - qmin)
        elif high == 0.0:
            low = -_SMALL_SCALE * (qmax - qmin)
        else:
            low, high = low * (_SMALL_SCALE / original), high * (_SMALL_SCALE / original)
    from_low, from_high = qmin - low / scale, qmax - high / scale
    low_error, high_error = abs(qmin) - abs(low / scale), abs(qmax) - abs(high / scale)
    zero_point = from_low if low_error < high_error else from_high
    zero_point = qmin if zero_point < qmin else qmax if zero_point > qmax else round(zero_point)
    return float(torch.tensor(scale, dtype=torch.float32)), int(zero_point)


def quantize_affine(x: torch.Tensor, scale: float, zero_point: int, qmax: int = 255) -> torch.Tensor:
    """Unsigned codes of x on the affine grid (scale, zero_point), as int16 values in [0, qmax]:
    round(x * (1 / scale) + zero_point) with the product and sum rounded once to fp32, as
    fbgemm's fused multiply-add quantizer does. (In fp64 the product of two fp32 values and
    the sum with an integer below 256 are exact, so one rounding to fp32 is the FMA's.)"""
    inverse = (torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32)).item()
    fused = (x.double() * inverse + zero_point).float()
    return torch.round(fused).clamp(0, qmax).to(torch.int16)


# ---------------------------------------------------------------------------------- weights
def _check_linear(linear: nn.Module, what: str) -> None:
    if not isinstance(linear, nn.Linear):
        raise ActivationQuantError(f"{what} converts an nn.Linear; got {type(linear).__name__}")


def quantize_weight_int8(weight: torch.Tensor, granularity: str = "per_channel") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, in), scale fp32 (out,) or (1,)) on the shared INT8 grid, one scale per
    output channel or one for the whole tensor."""
    if granularity not in WEIGHT_GRANULARITIES:
        raise ActivationQuantError(f"weight granularity must be one of {WEIGHT_GRANULARITIES}; got {granularity!r}")
    try:
        if granularity == "per_channel":
            grid = quantize_int8(weight)
            return grid.codes, grid.scale
        grid = quantize_int8(weight.reshape(1, -1))
        return grid.codes.reshape(weight.shape), grid.scale
    except GridError as err:
        raise ActivationQuantError(str(err)) from None


class _Int8WeightLinear(nn.Module):
    """Shared storage of the W8A8 layers: `weight` (int8 codes, out x in), `weight_scale`
    (fp32, per output channel or one), and a frozen fp `bias`."""

    kind = ""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._row_sums: tuple[tuple, torch.Tensor] | None = None

    @property
    def weight_granularity(self) -> str:
        return "per_tensor" if self.weight_scale.numel() == 1 and self.out_features > 1 else "per_channel"

    def weight_row_sums(self) -> torch.Tensor:
        """sum_k codes[n, k] (int32, (out,)): the zero-point correction of an affine input,
        kept until the codes change (a state-dict load replaces them)."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if self._row_sums is None or self._row_sums[0] != key:
            self._row_sums = (key, self.weight.sum(dim=1, dtype=torch.int32))
        return self._row_sums[1]

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ActivationQuantError(
                f"{type(self).__name__} takes inputs (..., {self.in_features}); got {tuple(x.shape)}"
            )
        return x.reshape(-1, self.in_features).float()

    def _finish(self, accumulated: torch.Tensor, input_scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        # In place on the fresh fp32 copy: a decode step's product is small, and allocations count.
        out = accumulated.float().mul_(input_scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight the codes stand for."""
        scale = self.weight_scale if self.weight_scale.numel() > 1 else self.weight_scale.expand(self.out_features)
        return self.weight.float() * scale[:, None]


class DynamicInt8Linear(_Int8WeightLinear):
    """y = x W^T + b with INT8 weights and activations quantized at run time (dynamic W8A8).

    activation="per_token" (default): a symmetric int8 scale per row of x (the leading
    dimensions flattened). activation="per_tensor": torch.ao's dynamic quantization, one
    affine uint8 grid over the whole input with `reduce_range` as its fbgemm engine uses it.
    Weights: the shared INT8 grid per output channel (default) or per tensor.
    """

    kind = "dynamic"

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        activation: str = "per_token",
        reduce_range: bool = True,
    ) -> None:
        if activation not in ACTIVATION_MODES:
            raise ActivationQuantError(f"activation must be one of {ACTIVATION_MODES}; got {activation!r}")
        super().__init__(codes, scale, bias)
        self.activation, self.reduce_range = activation, bool(reduce_range)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        activation: str = "per_token",
        weight_granularity: str = "per_channel",
        reduce_range: bool = True,
    ) -> DynamicInt8Linear:
        _check_linear(linear, "DynamicInt8Linear.from_linear")
        codes, scale = quantize_weight_int8(linear.weight, weight_granularity)
        return cls(codes, scale, linear.bias, activation, reduce_range)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        activation: str = "per_token",
        weight_granularity: str = "per_channel",
        reduce_range: bool = True,
    ) -> DynamicInt8Linear:
        if weight_granularity not in WEIGHT_GRANULARITIES:
            raise ActivationQuantError(
                f"weight granularity must be one of {WEIGHT_GRANULARITIES}; got {weight_granularity!r}"
            )
        scales = out_features if weight_granularity == "per_channel" else 1
        return cls(
            torch.zeros(out_features, in_features, dtype=torch.int8),
            torch.zeros(scales),
            torch.zeros(out_features) if bias else None,
            activation,
            reduce_range,
        )

    def settings(self) -> dict:
        settings = {"activation": self.activation, "weight_granularity": self.weight_granularity}
        if self.activation == "per_tensor":
            settings["reduce_range"] = self.reduce_range
        return settings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._check_input(x)
        if self.activation == "per_token":
            codes, absmax = quantize_per_token(rows)
            accumulated = int8_matmul(codes, self.weight)
            return self._finish(accumulated, (absmax / INT8_MAX)[:, None], x.shape)
        if rows.numel() == 0:
            low = high = 0.0
        else:
            low, high = (float(v) for v in torch.aminmax(rows))
        scale, zero_point = affine_qparams(low, high, self.reduce_range)
        codes = quantize_affine(rows, scale, zero_point, 127 if self.reduce_range else 255)
        # (q - z) . w = q . w - z * sum(w); the codes move into int8 by -128 when they reach
        # past 127, and the shift joins the zero point.
        shift = 0 if self.reduce_range else 128
        accumulated = int8_matmul((codes - shift).to(torch.int8), self.weight)
        accumulated = accumulated - (zero_point - shift) * self.weight_row_sums()
        return self._finish(accumulated, torch.tensor(scale), x.shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + ", ".join(f"{key}={value}" for key, value in self.settings().items())
        )


class StaticInt8Linear(_Int8WeightLinear):
    """y = x W^T + b with INT8 weights and activations on a fixed per-tensor grid (static W8A8).

    The input grid comes from calibration (`observers.calibrate`): symmetric, codes in
    [-127, 127] and zero point 0, or asymmetric, codes in [-128, 127] with an integer zero
    point, so that x ~ scale * (codes - zero_point). Inputs beyond the calibrated range are
    clipped; that, and the rounding, is the whole activation error. The input grid is stored
    as buffers `weight_input_scale` and `weight_input_zero_point` (the layer contract keeps
    every tensor of a quantized layer under `weight*`).
    """

    kind = "static"

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        input_scale: float,
        input_zero_point: int = 0,
        symmetric: bool = True,
    ) -> None:
        super().__init__(codes, scale, bias)
        self.symmetric = bool(symmetric)
        self.register_buffer("weight_input_scale", torch.tensor([float(input_scale)]))
        self.register_buffer("weight_input_zero_point", torch.tensor([int(input_zero_point)], dtype=torch.int32))

    @staticmethod
    def input_grid(low: float, high: float, symmetric: bool = True) -> tuple[float, int]:
        """(scale, zero_point) of the int8 grid covering [low, high] (0 always inside)."""
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ActivationQuantError(f"an input range needs finite low <= high; got ({low}, {high})")
        low, high = min(low, 0.0), max(high, 0.0)
        if symmetric:
            return max(max(-low, high) / INT8_MAX, _TINY), 0
        scale = max((high - low) / 255, _TINY)
        return scale, int(max(-128, min(127, round(-128 - low / scale))))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        input_range: tuple[float, float] | None = None,
        symmetric: bool = True,
        weight_granularity: str = "per_channel",
    ) -> StaticInt8Linear:
        """A static layer for `linear` whose inputs were observed within `input_range` (low, high)."""
        _check_linear(linear, "StaticInt8Linear.from_linear")
        if input_range is None:
            raise ActivationQuantError(
                "a static layer needs the range of its inputs: from_linear(linear, input_range=(low, high)); "
                "observers.calibrate measures it over calibration data"
            )
        input_scale, zero_point = cls.input_grid(*map(float, input_range), symmetric)
        codes, scale = quantize_weight_int8(linear.weight, weight_granularity)
        return cls(codes, scale, linear.bias, input_scale, zero_point, symmetric)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        symmetric: bool = True,
        weight_granularity: str = "per_channel",
    ) -> StaticInt8Linear:
        if weight_granularity not in WEIGHT_GRANULARITIES:
            raise ActivationQuantError(
                f"weight granularity must be one of {WEIGHT_GRANULARITIES}; got {weight_granularity!r}"
            )
        return cls(
            torch.zeros(out_features, in_features, dtype=torch.int8),
            torch.zeros(out_features if weight_granularity == "per_channel" else 1),
            torch.zeros(out_features) if bias else None,
            input_scale=1.0,
            symmetric=symmetric,
        )

    def settings(self) -> dict:
        return {"symmetric": self.symmetric, "weight_granularity": self.weight_granularity}

    def input_range(self) -> tuple[float, float]:
        """The (low, high) of the input grid: what passes unclipped."""
        scale, zero_point = float(self.weight_input_scale), int(self.weight_input_zero_point)
        low = -INT8_MAX if self.symmetric else -128
        return scale * (low - zero_point), scale * (INT8_MAX - zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._check_input(x)
        scale, zero_point = self.weight_input_scale, self.weight_input_zero_point
        low = -INT8_MAX if self.symmetric else -128
        codes = (torch.round(rows / scale) + zero_point).clamp(low, INT8_MAX).to(torch.int8)
        accumulated = int8_matmul(codes, self.weight)
        if not self.symmetric:
            accumulated = accumulated - zero_point * self.weight_row_sums()
        return self._finish(accumulated, scale, x.shape)

    def extra_repr(self) -> str:
        low, high = self.input_range()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"symmetric={self.symmetric}, input_range=({low:.4g}, {high:.4g})"
        )
