"""Compression: quantized linear layers, installed through the Linear seam (`swap.swap_linears`),
pruning, and export (`docs/compression.md`).

- `grid`, `weight_only`, `kernels`: INT8/INT4 weights on packed-byte CPU kernels; `gptq`, `awq`,
  `qat` land on the same INT4 grid.
- `w8a8`, `observers`, `smoothquant`, `llm_int8`, `activation`: int8 activations too.
- `saved`, `methods`: quantized model directories and `genforge quantize`'s table.

- `nf4`: 4-bit NormalFloat weights with double quantization (QLoRA), in bitsandbytes' layout
  (`docs/compression.md`).
- `prune`: magnitude and N:M pruning (zeros, same shapes), MLP neurons and attention heads
  removed (smaller config), with importance scores (`docs/compression.md`, "Pruning").
"""

from .activation import quantize_activations
from .awq import AWQError, AWQResult, awq_quantize_model
from .gptq import GPTQError, gptq_quantize_model, gptq_quantize_weight
from .methods import METHODS, QuantizeOptions, quantize_model
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
from .qat import FakeQuantLinear, QATError, convert_qat, prepare_qat
from .saved import (
    LAYER_KINDS,
    QuantizedCheckpointError,
    is_quantized,
    load_quantized,
    register_layer_kind,
    save_quantized,
)
from .weight_only import Int4Linear, Int8Linear, quantize_weights

__all__ = [
    "AWQError",
    "AWQResult",
    "FakeQuantLinear",
    "GPTQError",
    "Int4Linear",
    "Int8Linear",
    "LAYER_KINDS",
    "METHODS",
    "QATError",
    "QuantizeOptions",
    "QuantizedCheckpointError",
    "awq_quantize_model",
    "convert_qat",
    "gptq_quantize_model",
    "gptq_quantize_weight",
    "is_quantized",
    "load_quantized",
    "prepare_qat",
    "quantize_activations",
    "quantize_model",
    "quantize_weights",
    "register_layer_kind",
    "save_quantized",
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
