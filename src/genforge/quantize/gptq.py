"""GPTQ: INT4 weights that correct their own rounding error (Frantar et al. 2023, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers").

A linear layer's output error on calibration inputs X is ||W X - Ŵ X||^2, a quadratic in the
weights with Hessian H = 2 X X^T, the same for every output row. Optimal Brain Quantization
(Frantar & Alistarh 2022) quantizes one input column at a time and moves the rest of the row
to absorb that column's rounding error: with q the quantized column i,

    err = (w_i - q_i) / [H^-1]_ii,     w_j -= err * [H^-1]_ij   for the columns j not yet quantized,

and then removes column i from the inverse Hessian. GPTQ makes that fast and stable:

- every row takes the columns in the same order, so one inverse serves all rows;
- the rows of the successively reduced H^-1 are the rows of the upper Cholesky factor U of
  H^-1 scaled by U_ii, so the update is err = (w_i - q_i) / U_ii, w_j -= err * U_ij, with no
  inverse to update (and Cholesky is stable where repeated downdates are not);
- "lazy batches": the updates inside a block of 128 columns are applied at once to the rest
  of the matrix (one matrix product instead of 128 rank-1 updates);
- dampening: percdamp x mean(diag H) is added to the diagonal, so H is invertible when some
  inputs are (nearly) linearly dependent;
- act-order: columns with the largest diagonal (the most input energy) go first, while most
  of the row is still free to absorb their error. The INT4 grid stays the standard per
  contiguous group one (`grid.Int4Grid`) because each group's scale and zero are fixed from
  the original weights before the sweep ("static groups"); without act-order each group's
  grid is taken from its columns as updated when the sweep reaches the group, as in the paper.

Columns whose input is always zero (H_ii = 0, "dead") cannot matter: they are set to 0 and
their diagonal to 1. Where the error comes from: rounding each weight to the group's 16
levels, minus what the later columns could absorb on the calibration inputs; text unlike the
calibration text gains less.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..model import Transformer
from .calibration import (
    CalibrationError,
    accumulate_statistics,
    block_linear_names,
    capture_block_inputs,
    run_block,
)
from .grid import GridError, Int4Grid, check_group_size, codes_on_grid, dequantize_int4, int4_grid, quantize_int4

__all__ = ["GPTQError", "gptq_quantize_model", "gptq_quantize_weight"]

DEFAULT_EXCLUDE = ("router",)  # a MoE router is tiny, and a flipped routing costs far more than its bits save


class GPTQError(ValueError):
    """A weight, Hessian or setting GPTQ cannot take; the message says what was wrong and what is accepted."""


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float, block_size: int) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise GPTQError(
            f"GPTQ quantizes a 2-D floating-point (out_features, in_features) weight; got "
            f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}"
        )
    columns = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (columns, columns):
        raise GPTQError(
            f"the Hessian must be ({columns}, {columns}) for a weight with {columns} input features; "
            f"got {tuple(getattr(hessian, 'shape', ()))}"
        )
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise GPTQError("the weight and the Hessian must hold finite values (no inf or NaN)")
    try:
        check_group_size(columns, group_size)
    except GridError as error:
        raise GPTQError(str(error)) from None
    if not 0.0 <= damp < 1.0:
        raise GPTQError(f"damp is a share of the mean Hessian diagonal in [0, 1); got {damp!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise GPTQError(f"block_size must be a positive integer (128 in the paper); got {block_size!r}")


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    diagonal = torch.arange(hessian.shape[0], device=hessian.device)
    dampening = damp * hessian.diagonal().mean()
    damped = hessian.clone()
    damped[diagonal, diagonal] += dampening
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info):
        raise GPTQError(
            f"the calibration Hessian is not positive definite even with damp={damp}; raise damp "
            "(e.g. 0.1) or give more calibration tokens"
        )
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> Int4Grid:
    """The INT4 grid (asymmetric, per contiguous group of `group_size` input columns) GPTQ
    chooses for `weight` (out x in) given the Hessian 2 X^T X / n of its inputs (in x in).

    The arithmetic runs in float64 when the Hessian is float64 (as `LinearStatistics` gives
    it), else in float32. `block_size` is rounded to a multiple of `group_size` so that a
    group's grid (without act-order) is taken from columns that carry every earlier update.
    """
    _check_inputs(weight, hessian, group_size, damp, block_size)
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    rows, columns = weight.shape
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype=dtype, device=w.device).clone()

    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    if act_order:
        # Static groups: each contiguous group's grid from the original weights, fixed before
        # the permuted sweep visits its columns in whatever order.
        static_scales, static_zeros = int4_grid(w, group_size)
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    else:
        order = torch.arange(columns, device=w.device)
    group_of = order // group_size  # the group of each swept column, in original numbering

    u = _inverse_hessian_factor(h, damp)
    block_size = max(1, block_size // group_size) * group_size
    codes = torch.zeros(rows, columns, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(rows, columns // group_size, dtype=torch.float32, device=w.device)
    zeros = torch.zeros(rows, columns // group_size, dtype=torch.uint8, device=w.device)
    if act_order:
        scales, zeros = static_scales, static_zeros

    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for offset in range(end - start):
            column = start + offset
            group = int(group_of[column])
            if not act_order and column % group_size == 0:
                # The group's grid from its columns as they are now, every earlier update applied.
                group_scales, group_zeros = int4_grid(block[:, offset : offset + group_size], group_size)
                scales[:, group], zeros[:, group] = group_scales[:, 0], group_zeros[:, 0]
            w_column = block[:, offset]
            scale, zero = scales[:, group : group + 1], zeros[:, group : group + 1]
            q_codes = codes_on_grid(w_column[:, None], scale, zero, 1)
            codes[:, column] = q_codes[:, 0]
            q_column = ((q_codes.to(dtype) - zero.to(dtype)) * scale.to(dtype))[:, 0]
            error = (w_column - q_column) / u[column, column]
            # Spread this column's error over the block's later columns now...
            block[:, offset:] -= error[:, None] * u[column, column:end][None, :]
            errors[:, offset] = error
        # ...and over the columns after the block in one product (the lazy batch).
        w[:, end:] -= errors @ u[start:end, end:]

    if act_order:
        inverse = torch.argsort(order)
        codes = codes[:, inverse]
    return Int4Grid(codes, scales.float(), zeros, group_size)


def gptq_quantize_model(
    model: Transformer,
    calibration_rows,
    group_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Int4Grid]:
    """GPTQ INT4 grids for the linear layers of `model`'s blocks, quantized sequentially.

    Block by block, and inside a block layer by layer in execution order (qkv, o, gate_up,
    down), each layer's Hessian is taken from its inputs with every layer before it already
    quantized, as GPTQ's sequential mode does; the next block then sees this block's quantized
    outputs. `calibration_rows` is a list of 1-D LongTensors (or a (rows, seq) tensor).

    The model is changed in place: each quantized layer's `weight` holds its dequantized INT4
    values afterwards (what the later layers were calibrated against), so the model computes
    what the quantized one will. The LM head (outside the blocks) stays in fp; `include` /
    `exclude` select layers by name pattern (`genforge.swap`). `progress`, when given, is
    called with a line per quantized layer.
    """
    if not isinstance(model, Transformer):
        raise GPTQError(f"gptq_quantize_model takes a genforge Transformer; got {type(model).__name__}")
    per_block = block_linear_names(model, include, exclude, "GPTQ")
    if not any(per_block):
        raise GPTQError("no linear layer inside the blocks is selected; check include / exclude")
    for names in per_block:
        for name in names:
            layer = model.get_submodule(name)
            try:
                check_group_size(layer.in_features, group_size)
            except GridError as error:
                raise GPTQError(f"{name}: {error}") from None
    if model.lm_head is not None and any(
        model.get_submodule(name).weight is model.lm_head.weight for names in per_block for name in names
    ):
        raise CalibrationError("a selected layer shares its weight with the LM head; exclude it")

    grids: dict[str, Int4Grid] = {}
    was_training = model.training
    model.eval()
    try:
        calls = capture_block_inputs(model, calibration_rows, batch_size)
        for index, block in enumerate(model.blocks):
            for name in per_block[index]:
                layer: nn.Linear = model.get_submodule(name)
                with accumulate_statistics({name: layer}, hessian=True, mean_abs=False) as statistics:
                    with torch.no_grad():
                        for call in calls:
                            call.run(block)
                stats = statistics[name]
                if stats.hessian is None:
                    # A MoE expert no calibration token was routed to: nothing to correct
                    # against, so round to nearest.
                    grid = quantize_int4(layer.weight, group_size)
                else:
                    grid = gptq_quantize_weight(layer.weight, stats.hessian, group_size, damp, act_order, block_size)
                with torch.no_grad():
                    layer.weight.copy_(dequantize_int4(grid).to(layer.weight.dtype))
                grids[name] = grid
                if progress is not None:
                    progress(f"gptq {name}: {stats.count} calibration tokens")
            calls = run_block(block, calls)
    finally:
        model.train(was_training)
    return grids
