"""LLM.int8(): INT8 products with the outlier features kept in floating point (Dettmers et al.
2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale").

From a few billion parameters on, a handful of hidden dimensions carry activations up to 20x
larger than the rest, in almost every token. One such value sets the int8 scale of its whole
row and crushes the others to a few codes. LLM.int8() splits the product by input feature:

- the columns of x where some |x| reaches the threshold (6.0) anywhere in the batch are
  multiplied in floating point, with the matching columns of W;
- every other column is multiplied in int8 with vector-wise scales: one absmax scale per row
  of x (per token) and one per output channel of W, accumulated in int32.

y = s_x s_w (q_x q_W^T) + x[:, outliers] W[:, outliers]^T + b.

`Int8MixedLinear` computes what bitsandbytes' `Linear8bitLt(has_fp16_weights=False,
threshold=6.0)` computes in inference on CPU (its `MatMul8bitLt`), and is checked against it
(tests/test_quantize_activation.py):

- the weight is rounded to fp16 and then put on the shared INT8 grid per output channel
  (`grid.quantize_int8`), as bitsandbytes' `Int8Params` quantizes the fp16 weight;
- x is rounded to fp16 for the int8 part (bitsandbytes casts it); values at or above the
  threshold are left out of the row scales, and the outlier columns' codes are zero;
- the outlier columns are multiplied with the input as given (fp32) and with the dequantized
  int8 weight columns: bitsandbytes keeps no fp weight once it has quantized (with
  has_fp16_weights=False), and which columns are outliers is known only per batch, so
  keeping fp columns would mean keeping the whole fp weight.

bitsandbytes runs its decomposition only outside training on CPU; in training mode it
multiplies by the dequantized weight instead. This layer computes the same in both modes.
"""

from __future__ import annotations

import torch
from torch import nn

from .grid import INT8_MAX
from .w8a8 import ActivationQuantError, _Int8WeightLinear, int8_matmul, quantize_per_token, quantize_weight_int8

__all__ = ["DEFAULT_THRESHOLD", "Int8MixedLinear", "outlier_columns"]

DEFAULT_THRESHOLD = 6.0
# The largest finite fp16: inputs are clamped to it before the cast, so a huge value becomes
# an outlier column (computed from the fp32 input) rather than an inf in the row scale.
_FP16_MAX = 65504.0


def _check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 0:
        raise ActivationQuantError(
            f"threshold must be a number >= 0 (0 turns the fp outlier part off); got {threshold!r}"
        )
    return float(threshold)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The input features (columns of a 2-D x) where some |x| >= threshold, after rounding to
    fp16 as the int8 part sees x; empty when threshold is 0."""
    if threshold <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    half = x.clamp(-_FP16_MAX, _FP16_MAX).half()
    return torch.nonzero((half.abs() >= threshold).any(dim=0)).view(-1)


class Int8MixedLinear(_Int8WeightLinear):
    """A frozen linear layer computed as LLM.int8(): int8 vector-wise products plus the outlier
    input features in floating point (see the module docstring). Stores `weight` (int8 codes,
    out x in), `weight_scale` (fp32 per output channel) and the fp `bias`; `threshold` is its
    one setting (0 disables the decomposition: a plain vector-wise int8 product)."""

    kind = "llm_int8"

    def __init__(
        self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, threshold: float = DEFAULT_THRESHOLD
    ) -> None:
        super().__init__(codes, scale, bias)
        self.threshold = _check_threshold(threshold)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD) -> Int8MixedLinear:
        if not isinstance(linear, nn.Linear):
            raise ActivationQuantError(
                f"Int8MixedLinear.from_linear converts an nn.Linear; got {type(linear).__name__}"
            )
        threshold = _check_threshold(threshold)
        weight = linear.weight.detach()
        if weight.abs().max() > _FP16_MAX:
            raise ActivationQuantError(
                f"the weight holds values up to {float(weight.abs().max()):.4g}, beyond fp16's {_FP16_MAX}: "
                "LLM.int8() takes its scales from the fp16 weight"
            )
        codes, scale = quantize_weight_int8(weight.half().float(), "per_channel")
        return cls(codes, scale, linear.bias, threshold)

    @classmethod
    def empty(
        cls, in_features: int, out_features: int, bias: bool, threshold: float = DEFAULT_THRESHOLD
    ) -> Int8MixedLinear:
        return cls(
            torch.zeros(out_features, in_features, dtype=torch.int8),
            torch.zeros(out_features),
            torch.zeros(out_features) if bias else None,
            threshold,
        )

    def settings(self) -> dict:
        return {"threshold": self.threshold}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._check_input(x)
        half = rows.clamp(-_FP16_MAX, _FP16_MAX).half()
        columns = outlier_columns(rows, self.threshold)
        if columns.numel():
            # The outlier values leave the row scales (the rest of their columns still count,
            # as in bitsandbytes), and their whole columns leave the int8 product.
            half = half.masked_fill(half.abs() >= self.threshold, 0)
        codes, absmax = quantize_per_token(half)
        if columns.numel():
            codes[:, columns] = 0
        out = self._finish(int8_matmul(codes, self.weight), (absmax / INT8_MAX)[:, None], rows.shape)
        if columns.numel():
            weight_columns = self.weight[:, columns].float() * self.weight_scale[:, None]
            out = out.addmm(rows[:, columns], weight_columns.t())
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={self.threshold}"
        )
