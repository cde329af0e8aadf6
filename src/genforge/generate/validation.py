"""Checks shared by the decoding knobs: `SamplingParams` and the logits processors.

Every knob is checked when it is built, so bad input fails before any decoding, with a
message naming the knob, what it got and what it accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch


def is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def finite(v: Any) -> Any:
    return torch.isfinite(v) if isinstance(v, torch.Tensor) else math.isfinite(v)


def check_knob(
    name: str,
    value: Any,
    ok: Callable[[Any], Any],
    requirement: str,
    *,
    integer: bool = False,
    hint: str = "",
) -> Any:
    """Normalise a scalar or per-row knob and raise ``ValueError`` if ``ok`` fails.

    Scalars become ``int``/``float``. Tensors must be 1-D and become int64 or float64:
    float64 keeps Python-float precision, so arithmetic such as ``1 - top_p`` rounds to the
    logits dtype exactly the way transformers' Python-scalar arithmetic does.
    """
    suffix = f" {hint}" if hint else ""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.numel() == 0:
            raise ValueError(
                f"{name} given per row must be a non-empty 1-D tensor (one value per batch row), "
                f"got shape {tuple(value.shape)}"
            )
        if integer:
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f"{name} given per row must be an integer tensor, got {value.dtype}")
            value = value.long()
        else:
            value = value.double()
        bad = ~ok(value)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(f"{name} must be {requirement}; rows {rows} have {value[bad][:5].tolist()}.{suffix}")
        return value
    if integer:
        if not is_int(value):
            raise ValueError(f"{name} must be an integer {requirement}, got {value!r}.{suffix}")
        value = int(value)
    else:
        if not is_real(value):
            raise ValueError(f"{name} must be a number {requirement}, got {value!r}.{suffix}")
        value = float(value)
    if not ok(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}.{suffix}")
    return value


def normalise_bias(bias: Any, where: str) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise ValueError(f"{where} must be a mapping token_id -> bias, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        # JSON object keys are strings (OpenAI sends {"50256": -100}); accept decimal strings.
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if not is_int(key) or key < 0:
            raise ValueError(f"{where} keys must be token ids (integers >= 0), got {key!r}")
        if not is_real(value) or math.isnan(value) or value == math.inf:
            raise ValueError(f"{where}[{key}] must be a finite number, or -inf to ban the token; got {value!r}")
        out[int(key)] = float(value)
    return out


def normalise_token_ids(ids: Any, name: str) -> tuple[int, ...]:
    if is_int(ids):
        ids = [ids]
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if not isinstance(ids, Sequence) or isinstance(ids, str):
        raise ValueError(f"{name} must be an int or a sequence of ints, got {type(ids).__name__}")
    out = []
    for t in ids:
        if not is_int(t) or t < 0:
            raise ValueError(f"{name} must hold token ids (integers >= 0), got {t!r}")
        out.append(int(t))
    return tuple(out)
