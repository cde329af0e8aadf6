"""SmoothQuant: move the activations' outlier channels into the weights before W8A8 (Xiao et
al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models").

Large language models' activations have a few input channels far larger than the rest, in
every token, so a per-tensor (or per-token) int8 grid spends its range on them and rounds the
others to a few codes. Weights have no such channels. For a product X W^T, any per-channel
factor s leaves the result unchanged: X W^T = (X diag(s)^-1) (W diag(s))^T. SmoothQuant picks

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (alpha = 0.5 by default)

so that channel j's activation range shrinks by s_j and its weight column grows by s_j; both
then have moderate ranges and quantize well. max|X_j| is measured on calibration rows;
max|W_j| is over every layer that reads the same X (the paper concatenates q, k and v).

The division needs no run-time work: it is folded into the norm that produces X (its weight,
and its bias for LayerNorm, divided by s), and W's columns are multiplied by s. In genforge's
pre-norm blocks the pairs are the attention norm with the fused `qkv`, and the MLP norm with
`up` or the fused `gate_up` (a mixture of experts: the router and every expert's `gate_up`).
`attn.o` and `mlp.down` have no norm before them and are quantized without smoothing, as in
the paper. Post-norm blocks (BERT) are refused: their norm's output is also the residual
stream, so dividing it would change the model.

Folding is exact in real arithmetic; in fp32 the logits move by rounding only (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .observers import channel_absmax
from .w8a8 import ActivationQuantError

__all__ = ["DEFAULT_ALPHA", "fold_smoothing", "smooth_model", "smoothing_factors", "smoothing_pairs"]

DEFAULT_ALPHA = 0.5
# Floors of the paper's reference code: a channel that never fires or a zero weight column
# would otherwise give a factor of 0 or infinity.
_MIN_STATISTIC = 1e-5


def smoothing_pairs(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(norm name, names of the linear layers that read its output) for each norm SmoothQuant
    can fold into, in module order. Refuses models whose blocks have no such norm."""
    config = getattr(model, "config", None)
    blocks = getattr(model, "blocks", None)
    if config is None or blocks is None:
        raise ActivationQuantError(
            f"SmoothQuant folds its factors into the norms of a genforge Transformer; got {type(model).__name__}"
        )
    if config.post_norm:
        raise ActivationQuantError(
            f"SmoothQuant cannot smooth family {config.family!r}: its blocks are post-norm (norm(x + attn(x)), as "
            "BERT), so no norm feeds qkv or the MLP alone: the norm's output is also the residual stream, and "
            "dividing it would change the model. Use method 'dynamic' (per-token) or 'llm_int8' for it"
        )
    pairs = []
    for index, block in enumerate(blocks):
        prefix = f"blocks.{index}"
        pairs.append((f"{prefix}.attn_norm", [f"{prefix}.attn.qkv"]))
        mlp = block.mlp
        if hasattr(mlp, "experts"):
            readers = [f"{prefix}.mlp.router"] + [f"{prefix}.mlp.experts.{e}.gate_up" for e in range(len(mlp.experts))]
        else:
            readers = [f"{prefix}.mlp.{'gate_up' if mlp.gate_up is not None else 'up'}"]
        pairs.append((f"{prefix}.mlp_norm", readers))
    for _, readers in pairs:
        for name in readers:
            layer = model.get_submodule(name)
            if type(layer) is not nn.Linear:
                raise ActivationQuantError(
                    f"{name} is a {type(layer).__name__}, not a plain nn.Linear: smooth the model before quantizing "
                    "it or attaching adapters"
                )
    return pairs


def smoothing_factors(
    activation_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = DEFAULT_ALPHA
) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), max|W_j| over the input column j of every
    weight in `weights` (each (out, in)); fp32, one per input channel."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ActivationQuantError(f"alpha (the migration strength) must be in [0, 1]; got {alpha!r}")
    weight_absmax = torch.cat([w.detach().float().abs() for w in weights], dim=0).amax(dim=0)
    if weight_absmax.shape != activation_absmax.shape:
        raise ActivationQuantError(
            f"the activation statistic has {tuple(activation_absmax.shape)} channels, the weights "
            f"{tuple(weight_absmax.shape)}"
        )
    activation = activation_absmax.float().clamp(min=_MIN_STATISTIC)
    factors = activation.pow(alpha) / weight_absmax.clamp(min=_MIN_STATISTIC).pow(1 - alpha)
    return factors.clamp(min=_MIN_STATISTIC)


def fold_smoothing(norm: nn.Module, linears: Sequence[nn.Linear], factors: torch.Tensor) -> None:
    """Divide `norm`'s output by `factors` (its weight, and bias if it has one) and multiply the
    input columns of each of `linears` by them, in place: the linears' outputs stay the same."""
    with torch.no_grad():
        offset = getattr(norm, "weight_offset", 0.0)
        # Gemma's norm multiplies by (weight + offset): the effective scale is what is divided.
        norm.weight.copy_(((norm.weight.float() + offset) / factors - offset).to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_((norm.bias.float() / factors).to(norm.bias.dtype))
        for linear in linears:
            linear.weight.copy_((linear.weight.float() * factors).to(linear.weight.dtype))


def smooth_model(
    model: nn.Module, rows: Sequence[torch.Tensor], alpha: float = DEFAULT_ALPHA, norms: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Measure max|X_j| at each smoothable norm's output over calibration `rows` (LongTensors
    of token ids) and fold the SmoothQuant factors into the model, in place. `norms` limits it
    to some of `smoothing_pairs(model)`'s norms. Returns {norm name: factors}."""
    pairs = smoothing_pairs(model)
    if norms is not None:
        known = {norm for norm, _ in pairs}
        unknown = [n for n in norms if n not in known]
        if unknown:
            raise ActivationQuantError(f"not smoothable norms: {unknown}; this model's are {sorted(known)}")
        pairs = [(norm, readers) for norm, readers in pairs if norm in norms]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ActivationQuantError(f"alpha (the migration strength) must be in [0, 1]; got {alpha!r}")
    statistics = channel_absmax(model, rows, [norm for norm, _ in pairs])
    applied = {}
    for norm, readers in pairs:
        linears = [model.get_submodule(name) for name in readers]
        factors = smoothing_factors(statistics[norm], [linear.weight for linear in linears], alpha)
        fold_smoothing(model.get_submodule(norm), linears, factors)
        applied[norm] = factors
    return applied
