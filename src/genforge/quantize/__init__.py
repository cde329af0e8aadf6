"""Compression: quantized linear layers, installed through the Linear seam (`swap.swap_linears`),
and pruning.

- `nf4`: 4-bit NormalFloat weights with double quantization (QLoRA), in bitsandbytes' layout
  (`docs/compression.md`).
- `prune`: magnitude and N:M pruning (zeros, same shapes), MLP neurons and attention heads
  removed (smaller config), with importance scores (`docs/compression.md`, "Pruning").
"""

from .nf4 import NF4Error, NF4Linear, NF4Weight, dequantize_nf4, quantize_linears_nf4, quantize_nf4
from .prune import (
    PruneError,
    PruneResult,
    head_importance,
    hold_masks,
    neuron_importance,
    prune_heads,
    prune_magnitude,
    prune_model,
    prune_n_m,
    prune_neurons,
)

__all__ = [
    "NF4Error",
    "NF4Linear",
    "NF4Weight",
    "dequantize_nf4",
    "quantize_linears_nf4",
    "quantize_nf4",
    "PruneError",
    "PruneResult",
    "head_importance",
    "hold_masks",
    "neuron_importance",
    "prune_heads",
    "prune_magnitude",
    "prune_model",
    "prune_n_m",
    "prune_neurons",
]
