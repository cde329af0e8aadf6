"""Quantization methods by name: what `genforge quantize --method M` runs.

Each method is a function `(model, calibration, options) -> details` that replaces linear layers
of a floating-point genforge model with quantized layers of a registered kind
(`quantize.saved.LAYER_KINDS`), in place, and returns the JSON details worth keeping with the
saved model (block size, bits, what it measured). `calibration`, for the methods that need it,
is a list of token-id rows, each a (1, L) LongTensor from representative text; the others get
None. `METHODS` lists them; a new method is one entry.

`quantize_model` runs one and adds what every method is judged by: the bytes of the model's
tensors before and after, and the bits per weight of the quantized layers (codes and their
scales, biases excluded).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..swap import linear_names
from .activation import ACTIVATION_METHODS
from .nf4 import NF4Linear, quantize_linears_nf4
from .saved import quantized_layers

__all__ = [
    "METHODS",
    "QuantizeMethod",
    "QuantizeOptions",
    "model_bytes",
    "quantize_model",
    "quantized_bits_per_weight",
]


@dataclass(frozen=True)
class QuantizeOptions:
    """The settings a method may read; None means the method's own default.

    bits: weight bits (a method that has one width refuses another).
    group_size: input columns sharing a scale (NF4: its block size).
    include, exclude: which linear layers, as `swap.linear_names` patterns; the LM head stays in
        floating point by default, as transformers' bitsandbytes integration and GPTQ keep it.
    progress: called with each layer's name once it is quantized (the command draws a bar).
    """

    bits: int | None = None
    group_size: int | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] = ("lm_head",)
    progress: Callable[[str], None] = field(default=lambda name: None, compare=False)

    def layer_names(self, model: nn.Module) -> list[str]:
        """The linear layers these options select in `model`."""
        return linear_names(model, self.include, self.exclude)


@dataclass(frozen=True)
class QuantizeMethod:
    """One quantization method: its function, whether it reads calibration text, and a line for --help."""

    quantize: Callable[[nn.Module, list[torch.Tensor] | None, QuantizeOptions], dict]
    needs_calibration: bool
    summary: str


def _nf4(model: nn.Module, calibration: list[torch.Tensor] | None, options: QuantizeOptions) -> dict:
    """NF4 with double quantization (QLoRA), round to nearest: no calibration."""
    if options.bits not in (None, 4):
        raise ValueError(f"nf4 stores 4 bits per weight; --bits takes 4 or nothing, got {options.bits}")
    blocksize = options.group_size or 64
    names = options.layer_names(model)
    # Every layer's shape is checked against the block size first, so a bad setting leaves the model as it was.
    for name in names:
        layer = model.get_submodule(name)
        try:
            with torch.device("meta"):
                NF4Linear.empty(layer.in_features, layer.out_features, layer.bias is not None, blocksize=blocksize)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    for name in names:
        quantize_linears_nf4(model, include=[name], exclude=(), blocksize=blocksize, double_quant=True)
        options.progress(name)
    return {"blocksize": blocksize, "double_quant": True}


def _activation(method: str) -> Callable[[nn.Module, list[torch.Tensor] | None, QuantizeOptions], dict]:
    """An activation method of `quantize.activation` (W8A8 weights and inputs) as a table entry."""

    def run(model: nn.Module, calibration: list[torch.Tensor] | None, options: QuantizeOptions) -> dict:
        if options.bits not in (None, 8) or options.group_size is not None:
            raise ValueError(
                f"{method} quantizes weights and inputs to 8 bits per output channel; drop --bits/--group-size"
            )
        details = ACTIVATION_METHODS[method](
            model, calibration, {"include": options.include, "exclude": options.exclude}
        )
        for name in details["layers"]:
            options.progress(name)
        return details

    return run


METHODS: dict[str, QuantizeMethod] = {
    "nf4": QuantizeMethod(_nf4, False, "4-bit NormalFloat with double quantization (QLoRA), round to nearest"),
    "dynamic": QuantizeMethod(
        _activation("dynamic"), False, "W8A8: int8 weights, inputs quantized per token at run time"
    ),
    "static": QuantizeMethod(
        _activation("static"), True, "W8A8: int8 weights, inputs on a grid calibrated once (min-max)"
    ),
    "smoothquant": QuantizeMethod(
        _activation("smoothquant"), True, "W8A8 after moving input outliers into the weights (SmoothQuant, alpha 0.5)"
    ),
    "llm_int8": QuantizeMethod(
        _activation("llm_int8"), False, "int8 with outlier input features (|x| > 6) in floating point (LLM.int8())"
    ),
}


def _unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors of `module`'s state dict, a tensor shared by two names (a tied head) once."""
    seen, tensors = set(), []
    for tensor in module.state_dict().values():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in seen:
            seen.add(key)
            tensors.append(tensor)
    return tensors


def model_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a saved `model` holds (its state dict, shared tensors once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def quantized_bits_per_weight(model: nn.Module) -> float | None:
    """Bits per weight of `model`'s quantized layers: their codes and scales (not their biases)
    over their in x out weights; None without a quantized layer."""
    layers = quantized_layers(model)
    if not layers:
        return None
    stored = sum(
        t.numel() * t.element_size()
        for layer in layers.values()
        for name, t in layer.state_dict().items()
        if not name.startswith("bias")
    )
    return 8 * stored / sum(layer.in_features * layer.out_features for layer in layers.values())


def quantize_model(
    model: nn.Module,
    method: str,
    calibration: list[torch.Tensor] | None = None,
    options: QuantizeOptions | None = None,
) -> dict:
    """Quantize the floating-point `model` in place with `METHODS[method]` and return a summary:
    the method's details, the layers it quantized (count and kinds), the bytes of the model's
    tensors before and after and the bits per weight of the quantized layers. Refused
    (ValueError), before any change: an unknown method, a method that needs calibration rows
    without them, a model that already has quantized layers."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; accepted: {', '.join(METHODS)}")
    spec = METHODS[method]
    if spec.needs_calibration and not calibration:
        raise ValueError(f"--method {method} needs calibration rows (token ids from representative text); got none")
    already = quantized_layers(model)
    if already:
        name, layer = next(iter(already.items()))
        raise ValueError(
            f"this model is already quantized ({name} is {layer.kind}); quantize the floating-point model instead"
        )
    options = options or QuantizeOptions()
    before = model_bytes(model)
    details = spec.quantize(model, calibration if spec.needs_calibration else None, options)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"--method {method} quantized no layer: do --include / --exclude leave any?")
    after = model_bytes(model)
    return {
        "method": method,
        "layers_quantized": len(layers),
        "kinds": dict(sorted(Counter(layer.kind for layer in layers.values()).items())),
        "bytes_before": before,
        "bytes_after": after,
        "compression": round(before / after, 3),
        "bits_per_weight": round(quantized_bits_per_weight(model), 3),
        "details": details,
    }
