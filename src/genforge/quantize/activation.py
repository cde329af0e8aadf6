"""Activation quantization of a model's linear layers: one entry point per method, all through
the Linear seam (`swap.swap_linears`).

| method        | layer (kind)                   | activations                              | needs calibration |
|---------------|--------------------------------|------------------------------------------|-------------------|
| `dynamic`     | `DynamicInt8Linear` (dynamic)  | int8 at run time, per token (or torch.ao's per-tensor affine) | no |
| `static`      | `StaticInt8Linear` (static)    | int8 on a fixed per-tensor grid from an observer | yes        |
| `smoothquant` | static or dynamic, after smoothing (Xiao et al. 2023) | as static / dynamic | yes        |
| `llm_int8`    | `Int8MixedLinear` (llm_int8)   | int8 per token, outlier features in fp (Dettmers et al. 2022) | no |

Each entry takes the model, calibration rows (a list of LongTensors of token ids) where the
method needs them, `include` / `exclude` name patterns (the output head stays in fp by
default) and the method's options, replaces the layers in place and returns a details dict:
`{"method": ..., "layers": {name: {"kind": ..., **settings}}, ...}` (the `layers` block is the
saved model's `quantization_config.layers`), plus what calibration and smoothing measured.

Everything is checked before the model changes: a bad option, missing or malformed
calibration rows, or a layer no calibration token reached leaves it as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..swap import linear_names, swap_linears
from .llm_int8 import DEFAULT_THRESHOLD, Int8MixedLinear
from .observers import calibrate, check_calibration_rows, make_observer
from .smoothquant import DEFAULT_ALPHA, smooth_model, smoothing_pairs
from .w8a8 import (
    ACTIVATION_MODES,
    WEIGHT_GRANULARITIES,
    ActivationQuantError,
    DynamicInt8Linear,
    StaticInt8Linear,
)

__all__ = [
    "ACTIVATION_METHODS",
    "quantize_activations",
    "quantize_dynamic",
    "quantize_llm_int8",
    "quantize_smoothquant",
    "quantize_static",
]


def _selected(model: nn.Module, include, exclude) -> list[str]:
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    if adapted:
        raise ActivationQuantError(
            f"this model has adapter layers ({adapted[0]}, ...): merge them first (merge_lora), then quantize"
        )
    names = linear_names(model, include, exclude)
    if not names:
        raise ActivationQuantError("no linear layer is selected; check include and exclude")
    for name in names:
        weight = model.get_submodule(name).weight
        if not torch.isfinite(weight).all():
            raise ActivationQuantError(f"{name}: the weight holds inf or NaN; quantization needs finite weights")
    return names


def _install(model: nn.Module, built: dict[str, nn.Module], method: str, **extra) -> dict:
    by_id = {id(model.get_submodule(name)): layer for name, layer in built.items()}
    swap_linears(model, lambda linear, _: by_id[id(linear)], list(built), ())
    layers = {name: {"kind": layer.kind, **layer.settings()} for name, layer in built.items()}
    return {"method": method, "layers": layers, **extra}


def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ActivationQuantError(f"{name} must be one of {tuple(choices)}; got {value!r}")


def _needs_calibration(method: str, calibration) -> None:
    if calibration is None:
        raise ActivationQuantError(
            f"method {method!r} needs calibration data: pass calibration=[LongTensor of token ids, ...] "
            "(a few hundred tokens of text like the model's inputs; on the command line, --calibration FILE)"
        )


def quantize_dynamic(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = ("lm_head",),
    activation: str = "per_token",
    weight_granularity: str = "per_channel",
    reduce_range: bool = True,
) -> dict:
    """Dynamic W8A8: replace the selected linear layers with `DynamicInt8Linear`, in place.
    activation="per_tensor" with weight_granularity="per_tensor" or "per_channel" reproduces
    torch.ao's `quantize_dynamic` (see `w8a8`)."""
    _check_choice("activation", activation, ACTIVATION_MODES)
    _check_choice("weight_granularity", weight_granularity, WEIGHT_GRANULARITIES)
    names = _selected(model, include, exclude)
    built = {
        name: DynamicInt8Linear.from_linear(model.get_submodule(name), activation, weight_granularity, reduce_range)
        for name in names
    }
    return _install(model, built, "dynamic")


def _static_layers(
    model: nn.Module,
    names: list[str],
    calibration,
    observer,
    symmetric: bool,
    weight_granularity: str,
    options: dict,
) -> tuple[dict[str, nn.Module], dict]:
    observers = calibrate(model, calibration, observer, include=names, exclude=(), symmetric=symmetric, **options)
    unreached = [name for name in names if not observers[name].values]
    if unreached:
        raise ActivationQuantError(
            f"no calibration token reached {', '.join(unreached)} (experts the router never chose?): give more "
            "calibration rows, or exclude these layers"
        )
    ranges = {name: observers[name].range() for name in names}
    built = {
        name: StaticInt8Linear.from_linear(model.get_submodule(name), ranges[name], symmetric, weight_granularity)
        for name in names
    }
    rows = check_calibration_rows(model, calibration)
    details = {
        "calibration": {"rows": sum(r.shape[0] for r in rows), "tokens": sum(r.numel() for r in rows)}
        | next(iter(observers.values())).settings(),
        "input_ranges": {name: [round(low, 6), round(high, 6)] for name, (low, high) in ranges.items()},
    }
    return built, details


def quantize_static(
    model: nn.Module,
    calibration: Sequence[torch.Tensor] | None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = ("lm_head",),
    observer: str | Callable = "minmax",
    symmetric: bool = True,
    weight_granularity: str = "per_channel",
    **observer_options,
) -> dict:
    """Static W8A8: calibrate each selected layer's input range with `observer` ("minmax",
    "percentile" (option percentile=99.99), "mse" (option steps=200)) over the calibration
    rows, then replace the layers with `StaticInt8Linear`, in place."""
    _needs_calibration("static", calibration)
    _check_choice("weight_granularity", weight_granularity, WEIGHT_GRANULARITIES)
    make_observer(observer, symmetric=symmetric, **observer_options)  # bad options fail before any work
    names = _selected(model, include, exclude)
    built, details = _static_layers(
        model, names, calibration, observer, symmetric, weight_granularity, observer_options
    )
    return _install(model, built, "static", **details)


def quantize_smoothquant(
    model: nn.Module,
    calibration: Sequence[torch.Tensor] | None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = ("lm_head",),
    alpha: float = DEFAULT_ALPHA,
    activation: str = "static",
    observer: str | Callable = "minmax",
    symmetric: bool = True,
    weight_granularity: str = "per_channel",
    **observer_options,
) -> dict:
    """SmoothQuant W8A8: fold the smoothing factors (strength `alpha`) into the norms and the
    layers that read them, then quantize the selected layers: activation="static" (per-tensor
    grids calibrated on the smoothed model with `observer`; the paper's O3) or "per_token"
    (dynamic; the paper's O1). Smoothing changes the fp model only by rounding."""
    _needs_calibration("smoothquant", calibration)
    _check_choice("activation", activation, ("static", "per_token"))
    _check_choice("weight_granularity", weight_granularity, WEIGHT_GRANULARITIES)
    if activation == "static":
        make_observer(observer, symmetric=symmetric, **observer_options)
    elif observer_options:
        raise ActivationQuantError(f"observer options {sorted(observer_options)} apply only to activation='static'")
    check_calibration_rows(model, calibration)
    names = _selected(model, include, exclude)
    pairs = smoothing_pairs(model)
    chosen = set(names)
    norms = [norm for norm, readers in pairs if chosen.intersection(readers)]
    factors = smooth_model(model, calibration, alpha, norms)
    smoothing = {
        "alpha": alpha,
        "norms": {norm: readers for norm, readers in pairs if norm in factors},
        "largest_factor": round(max(float(f.max()) for f in factors.values()), 6) if factors else None,
    }
    if activation == "per_token":
        built = {
            name: DynamicInt8Linear.from_linear(model.get_submodule(name), "per_token", weight_granularity)
            for name in names
        }
        return _install(model, built, "smoothquant", smoothing=smoothing)
    built, details = _static_layers(
        model, names, calibration, observer, symmetric, weight_granularity, observer_options
    )
    return _install(model, built, "smoothquant", smoothing=smoothing, **details)


def quantize_llm_int8(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = ("lm_head",),
    threshold: float = DEFAULT_THRESHOLD,
) -> dict:
    """LLM.int8(): replace the selected linear layers with `Int8MixedLinear` (outlier threshold
    `threshold`), in place."""
    names = _selected(model, include, exclude)
    Int8MixedLinear.empty(1, 1, False, threshold)  # a bad threshold fails before any work
    built = {name: Int8MixedLinear.from_linear(model.get_submodule(name), threshold) for name in names}
    return _install(model, built, "llm_int8")


def _no_calibration(function: Callable) -> Callable:
    def run(model, calibration, options):
        return function(model, **options)

    return run


def _with_calibration(function: Callable) -> Callable:
    def run(model, calibration, options):
        return function(model, calibration, **options)

    return run


# method -> function(model, calibration rows or None, options dict) -> details: the table the
# command line's `genforge quantize` reads.
ACTIVATION_METHODS: dict[str, Callable[[nn.Module, Sequence[torch.Tensor] | None, dict], dict]] = {
    "dynamic": _no_calibration(quantize_dynamic),
    "static": _with_calibration(quantize_static),
    "smoothquant": _with_calibration(quantize_smoothquant),
    "llm_int8": _no_calibration(quantize_llm_int8),
}


def quantize_activations(
    model: nn.Module,
    method: str,
    calibration: Sequence[torch.Tensor] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = ("lm_head",),
    **options,
) -> dict:
    """Quantize `model`'s linear layers' weights and activations to int8 with `method`
    ("dynamic", "static", "smoothquant", "llm_int8"), in place; the details dict. "static" and
    "smoothquant" need `calibration` (a list of LongTensors of token ids); the others ignore it."""
    _check_choice("method", method, tuple(ACTIVATION_METHODS))
    return ACTIVATION_METHODS[method](model, calibration, {"include": include, "exclude": exclude, **options})
