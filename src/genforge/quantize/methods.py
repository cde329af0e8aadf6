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
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..swap import linear_names, swap_linears
from .activation import ACTIVATION_METHODS
from .awq import DEFAULT_EXCLUDE as AWQ_EXCLUDE
from .awq import awq_quantize_model
from .gptq import DEFAULT_EXCLUDE as GPTQ_EXCLUDE
from .gptq import gptq_quantize_model
from .nf4 import NF4Linear, quantize_linears_nf4
from .saved import quantized_layers
from .weight_only import Int4Linear, quantize_weights

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
    include, exclude: which linear layers, as `swap.linear_names` patterns; exclude None takes
        the method's default (`QuantizeMethod.default_exclude`).
    progress: called with each layer's name once it is quantized (the command draws a bar).
    """

    bits: int | None = None
    group_size: int | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    progress: Callable[[str], None] = field(default=lambda name: None, compare=False)

    def layer_names(self, model: nn.Module) -> list[str]:
        """The linear layers these options select in `model`."""
        return linear_names(model, self.include, self.exclude if self.exclude is not None else ("lm_head",))


@dataclass(frozen=True)
class QuantizeMethod:
    """One quantization method: its function, whether it reads calibration text, a line for --help,
    and the layers it leaves in floating point unless told otherwise. The LM head stays fp for
    most, as transformers' bitsandbytes integration and GPTQ keep it; the weight-only INT8/INT4
    kernels quantize it too, because the head is a fifth to a third of a small model's bytes and
    an fp head caps their decode speed-up at 2.2-2.6x instead of 3.9-5.3x (docs/compression.md)."""

    quantize: Callable[[nn.Module, list[torch.Tensor] | None, QuantizeOptions], dict]
    needs_calibration: bool
    summary: str
    default_exclude: tuple[str, ...] = ("lm_head",)


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


def _bits(method: str, options: QuantizeOptions, bits: int) -> None:
    if options.bits not in (None, bits):
        raise ValueError(f"{method} stores {bits} bits per weight; --bits takes {bits} or nothing, got {options.bits}")


def _round_to_nearest(bits: int) -> Callable[[nn.Module, list[torch.Tensor] | None, QuantizeOptions], dict]:
    """Weight-only INT8 (per output channel) or INT4 (per group), round to nearest."""
    method = f"int{bits}"

    def run(model: nn.Module, calibration: list[torch.Tensor] | None, options: QuantizeOptions) -> dict:
        _bits(method, options, bits)
        if bits == 8 and options.group_size is not None:
            raise ValueError("int8 has one scale per output channel; --group-size applies to int4, nf4, gptq and awq")
        group_size = options.group_size or 128
        names = quantize_weights(model, method, group_size, options.include, options.exclude)
        for name in names:
            options.progress(name)
        return {"bits": bits} | ({"group_size": group_size} if bits == 4 else {})

    return run


def _install_int4_grids(model: nn.Module, grids: dict, options: QuantizeOptions) -> None:
    """Put each calibrated `Int4Grid` into the model as an `Int4Linear`, keeping the layer's bias."""

    def int4_layer(layer: nn.Linear, name: str) -> Int4Linear:
        options.progress(name)
        return Int4Linear.from_grid(grids[name], None if layer.bias is None else layer.bias.detach())

    swap_linears(model, int4_layer, include=list(grids))


def _flat_rows(calibration: list[torch.Tensor]) -> list[torch.Tensor]:
    """The (1, L) calibration rows as the 1-D token rows `quantize.calibration` reads."""
    return [row.reshape(-1) for row in calibration]


def _gptq(model: nn.Module, calibration: list[torch.Tensor] | None, options: QuantizeOptions) -> dict:
    """GPTQ INT4 (Frantar et al. 2023): layer by layer, errors compensated through the calibration Hessian."""
    _bits("gptq", options, 4)
    group_size = options.group_size or 128
    exclude = (*options.exclude, *GPTQ_EXCLUDE)
    grids = gptq_quantize_model(model, _flat_rows(calibration), group_size, include=options.include, exclude=exclude)
    _install_int4_grids(model, grids, options)
    return {"bits": 4, "group_size": group_size, "damp": 0.01, "act_order": True}


def _awq(model: nn.Module, calibration: list[torch.Tensor] | None, options: QuantizeOptions) -> dict:
    """AWQ INT4 (Lin et al. 2024): activation-aware scales folded into the preceding ops, then INT4."""
    _bits("awq", options, 4)
    group_size = options.group_size or 128
    exclude = (*options.exclude, *AWQ_EXCLUDE)
    result = awq_quantize_model(model, _flat_rows(calibration), group_size, include=options.include, exclude=exclude)
    _install_int4_grids(model, result.grids, options)
    return {"bits": 4, "group_size": group_size, "alphas": result.alphas, "unscaled": result.unscaled}


METHODS: dict[str, QuantizeMethod] = {
    "int8": QuantizeMethod(_round_to_nearest(8), False, "weight-only INT8 per output channel, round to nearest", ()),
    "int4": QuantizeMethod(
        _round_to_nearest(4), False, "weight-only INT4 per group (--group-size), round to nearest", ()
    ),
    "gptq": QuantizeMethod(_gptq, True, "weight-only INT4, GPTQ: rounding errors compensated layer by layer"),
    "awq": QuantizeMethod(_awq, True, "weight-only INT4, AWQ: activation-aware scales, then round to nearest"),
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
    if options.exclude is None:
        options = replace(options, exclude=spec.default_exclude)
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
