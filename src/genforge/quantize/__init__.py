"""Quantized linear layers, installed through the Linear seam (`swap.swap_linears`).

- `nf4`: 4-bit NormalFloat weights with double quantization (QLoRA), in bitsandbytes' layout
  (`docs/compression.md`).
"""

from .nf4 import NF4Error, NF4Linear, NF4Weight, dequantize_nf4, quantize_linears_nf4, quantize_nf4

__all__ = ["NF4Error", "NF4Linear", "NF4Weight", "dequantize_nf4", "quantize_linears_nf4", "quantize_nf4"]
