"""LoRA: low-rank adapters over a model's linear layers (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models"), and DoRA, its weight-decomposed form (Liu et al. 2024,
"DoRA: Weight-Decomposed Low-Rank Adaptation"), in PEFT's format both ways.

A LoRA layer keeps the base weight W frozen and learns a low-rank update: y = W x + b +
s * B A dropout(x), with A (r, in) and B (out, r), B starting at zero so training starts from
the base model. The scale s is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").

genforge computes queries, keys and values in one fused product (`qkv`), and a gated MLP's
gate and up in another (`gate_up`). PEFT puts one LoRA on each of Hugging Face's separate
modules (q_proj, k_proj, v_proj), so a LoRA layer here holds one (A, B) pair per targeted part
of the fused output, each with its own rank and alpha, and a part may have none (PEFT's usual
q_proj + v_proj leaves k alone). Where Hugging Face fuses too (GPT-2's c_attn, Phi-3's
qkv_proj) the layer has one part. Adapters name their tensors by the Hugging Face modules, so
`save_adapter` writes what `peft.PeftModel.from_pretrained` loads and `load_adapter` reads
what PEFT's `save_pretrained` writes.

DoRA (`use_dora=True`) also learns a magnitude per output row, m, and rescales each row of the
adapted weight W + s B A to it: y = m / ||W + s B A||_row * (W + s B A) x + b, the norm taken
as a constant (no gradient through it), as the paper's section 4.3 and PEFT do. Each Hugging
Face part of a fused layer has its own magnitude over its rows, as PEFT's separate modules do.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): `apply_lora` on a
model whose targets are `NF4Linear` (after `quantize.quantize_linears_nf4`) puts `QLoraLinear`
layers there, which compute the base output from the NF4 weight and add the float32 LoRA
update; the adapter is the same PEFT adapter as on the full-precision model.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import onednn
from ..checkpoint import LinearParts, hf_linear_parts
from ..model import Transformer
from ..quantize.nf4 import NF4Linear, nf4_linear
from ..swap import name_matches, plain_linear, swap_linears
from .peft_format import (
    ADAPTER_CONFIG,
    PEFT_PREFIX,
    adapter_weights_path,
    check_adapter_fits,
    check_adapter_shapes,
    read_adapter_config,
    read_adapter_tensors,
    write_adapter,
)

__all__ = [
    "DoraLinear",
    "LoraAdapterFiles",
    "LoraConfig",
    "LoraError",
    "LoraLinear",
    "LoraPart",
    "QLoraLinear",
    "adapter_dtype",
    "apply_lora",
    "load_adapter",
    "lora_key",
    "lora_state_dict",
    "lora_update",
    "merge_and_unload",
    "merge_lora",
    "peft_names",
    "plan_lora_parts",
    "read_lora_adapter",
    "save_adapter",
    "scaled_block_b",
    "stacked_a",
    "trainable_parameter_count",
    "unmerge_lora",
]

# PEFT's saved keys: the PeftModel's prefix, then the transformers module name.


class LoraError(ValueError):
    """A LoRA configuration, model or adapter that does not fit; the message says what was wrong."""


@dataclass
class LoraConfig:
    """What to adapt and how, with PEFT's field names and meanings.

    target_modules: a list of names, either Hugging Face module names as PEFT takes them
        (`["q_proj", "v_proj"]`: a name matches a module that is it or ends in `.name`) or
        genforge layer names (`["qkv", "o"]`, globs as `swap_linears` takes them; a fused layer
        named this way gets a LoRA on each of its parts); or one string, a regular expression
        that must match a whole module name in either convention.
    rank_pattern / alpha_pattern: per-module r and alpha, PEFT's way: the first key that matches
        the end of a module's Hugging Face name (as the regex `(.*\\.)?key$`) wins; genforge
        layer names are tried after.
    use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
    use_dora: DoRA (Liu et al. 2024): also learn each output row's magnitude (`DoraLinear`).
    bias: only "none" (biases stay frozen).
    """

    target_modules: list[str] | str
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    use_dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise LoraError(f"target_modules {self.target_modules!r} is not a regular expression: {err}") from None
        elif (
            not isinstance(self.target_modules, Sequence)
            or not self.target_modules
            or not all(isinstance(name, str) and name for name in self.target_modules)
        ):
            raise LoraError(
                f"target_modules must be a non-empty list of module names (e.g. ['q_proj', 'v_proj'] or "
                f"['qkv', 'o']) or one regular expression; got {self.target_modules!r}"
            )
        else:
            self.target_modules = list(self.target_modules)
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if not isinstance(self.lora_dropout, int | float) or not 0 <= self.lora_dropout < 1:
            raise LoraError(f"lora_dropout must be a probability in [0, 1); got {self.lora_dropout!r}")
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if not isinstance(self.use_dora, bool):
            raise LoraError(f"use_dora must be True or False; got {self.use_dora!r}")
        if self.bias != "none":
            raise LoraError(
                f"bias={self.bias!r} is not supported yet; accepted: 'none' (biases stay frozen, as PEFT's default)"
            )

    def rank_and_alpha(self, hf_name: str, genforge_name: str) -> tuple[int, float]:
        """The r and alpha of the module with these names (rank_pattern, alpha_pattern or the defaults)."""
        r_key = _pattern_key(self.rank_pattern, hf_name, genforge_name)
        alpha_key = _pattern_key(self.alpha_pattern, hf_name, genforge_name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[alpha_key] if alpha_key is not None else self.lora_alpha
        return r, alpha

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _check_rank(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraError(f"{what} must be an integer rank of at least 1; got {value!r}")


def _check_alpha(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise LoraError(f"{what} must be a positive number; got {value!r}")


def _pattern_key(pattern: dict, hf_name: str, genforge_name: str) -> str | None:
    # PEFT's get_pattern_key: the key, a regex, must match the end of the name after a dot.
    for name in (hf_name, genforge_name):
        for key in pattern:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
    return None


@dataclass(frozen=True)
class LoraPart:
    """One Hugging Face module's LoRA inside a genforge layer: its output rows start..start+rows."""

    hf_name: str  # model.layers.0.self_attn.q_proj
    key: str  # its last part, the key of its tensors in the layer (q_proj)
    start: int
    rows: int
    r: int
    alpha: float
    scaling: float


def stacked_a(parts: Sequence[LoraPart], lora_A: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(sum of r, in): every part's A, one above the other, for one product over all parts."""
    return torch.cat([lora_A[p.key] for p in parts])


def scaled_block_b(parts: Sequence[LoraPart], lora_B: Mapping[str, torch.Tensor], out_features: int) -> torch.Tensor:
    """(out, sum of r): each part's B times its scale in its rows and its rank's columns, zero
    over rows no part adapts; after `stacked_a`, one product gives every part's update."""
    total_rank = sum(p.r for p in parts)
    reference = lora_B[parts[0].key]
    rows, row, column = [], 0, 0
    for part in parts:
        if part.start > row:  # an untargeted part: no update
            rows.append(reference.new_zeros(part.start - row, total_rank))
        b = lora_B[part.key] * part.scaling
        rows.append(F.pad(b, (column, total_rank - column - part.r)))
        row, column = part.start + part.rows, column + part.r
    if row < out_features:
        rows.append(reference.new_zeros(out_features - row, total_rank))
    return torch.cat(rows)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a LoRA over a base of `base_dtype`: PEFT keeps adapters of a half-precision
    model in float32 (autocast_adapter_dtype)."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def lora_update(
    x: torch.Tensor,
    base_output: torch.Tensor,
    parts: Sequence[tuple[int, int, float]],
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
) -> torch.Tensor:
    """`base_output` plus each part's LoRA update s B A x in its own output rows (the rest as
    they are): parts are (start row, rows, scale s), in row order; a[i] is part i's A (r, in) and
    b[i] its B (rows, r). x (..., in) and base_output (..., out) share a dtype.

    One product makes every part's h = A x (the A stacked); each part's B product then adds
    into its rows of the output as it is computed. The backward makes each part's gradients from
    its own rows alone: a fused layer (q, k, v in one) costs what PEFT's separate layers do.

    Under torch.func transforms (DP-SGD's per-example gradients, `vmap(grad(...))`) the same
    update is made of plain operations, which those transforms see through."""
    if torch._C._are_functorch_transforms_active():
        return _composable_lora_update(x, base_output, parts, a, b)
    return _LoraUpdate.apply(x, base_output, tuple(parts), len(a), *a, *b)


def _composable_lora_update(x, base_output, parts, a, b) -> torch.Tensor:
    hidden = x @ torch.cat(tuple(a)).t()
    pieces, row, column = [], 0, 0
    for (start, rows, scale), part_b in zip(parts, b, strict=True):
        if start > row:  # rows without an adapter
            pieces.append(base_output[..., row:start])
        rank = part_b.shape[1]
        update = (hidden[..., column : column + rank] @ part_b.t()) * scale
        pieces.append(base_output[..., start : start + rows] + update)
        row, column = start + rows, column + rank
    if row < base_output.shape[-1]:
        pieces.append(base_output[..., row:])
    return torch.cat(pieces, dim=-1)


class _LoraUpdate(torch.autograd.Function):
    """Forward and backward of `lora_update`. With g the output's gradient and g_p its part's
    columns: d(base_output) = g, d(h_p) = s g_p B_p, d(B_p) = s g_p^T h_p, d(A) = d(h)^T x and
    d(x) = d(h) A (A stacked); only what a wanted gradient needs is computed."""

    @staticmethod
    def forward(ctx, x, base_output, parts, count, *adapters):
        a, b = adapters[:count], adapters[count:]
        flat = x.reshape(-1, x.shape[-1])
        stacked_a = torch.cat(a) if count > 1 else a[0]
        hidden = flat @ stacked_a.t()
        base = base_output.reshape(-1, base_output.shape[-1])
        out_features = base.shape[1]
        if count == 1 and parts[0][:2] == (0, out_features):  # one part over every row
            out = torch.addmm(base, hidden, b[0].t(), alpha=parts[0][2])
        else:
            out = torch.empty_like(base)
            row = column = 0
            for (start, rows, scale), part_b in zip(parts, b, strict=True):
                if start > row:  # rows without an adapter
                    out[:, row:start] = base[:, row:start]
                rank = part_b.shape[1]
                stop = start + rows
                torch.addmm(
                    base[:, start:stop],
                    hidden[:, column : column + rank],
                    part_b.t(),
                    alpha=scale,
                    out=out[:, start:stop],
                )
                row, column = stop, column + rank
            if row < out_features:
                out[:, row:] = base[:, row:]
        ctx.parts, ctx.count, ctx.x_shape = parts, count, x.shape
        want_a = any(ctx.needs_input_grad[4 : 4 + count])
        ctx.save_for_backward(flat if want_a else None, hidden, stacked_a, *b)
        return out.view(base_output.shape)

    @staticmethod
    def backward(ctx, grad_out):
        flat, hidden, stacked_a, *b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        want_x, want_base = needs[0], needs[1]
        want_a, want_b = needs[4 : 4 + ctx.count], needs[4 + ctx.count :]
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden, grad_b, column = [], [], 0
        for (start, rows, scale), part_b, wanted in zip(ctx.parts, b, want_b, strict=True):
            rank = part_b.shape[1]
            part_grad = grad[:, start : start + rows]
            grad_hidden.append(part_grad @ (part_b * scale))
            grad_b.append(part_grad.t() @ (hidden[:, column : column + rank] * scale) if wanted else None)
            column += rank
        grad_hidden = torch.cat(grad_hidden, dim=1) if len(grad_hidden) > 1 else grad_hidden[0]
        grad_x = (grad_hidden @ stacked_a).view(ctx.x_shape) if want_x else None
        grad_a = [None] * ctx.count
        if any(want_a):
            stacked = grad_hidden.t() @ flat
            ranks = [part_b.shape[1] for part_b in b]
            grad_a = [g if wanted else None for g, wanted in zip(stacked.split(ranks), want_a, strict=True)]
        return grad_x, grad_out if want_base else None, None, None, *grad_a, *grad_b


class LoraLinear(nn.Module):
    """A linear layer with LoRA updates on some or all parts of its output (see the module doc).

    The base `weight` and `bias` are this layer's own parameters, frozen, so the base model's
    state-dict keys stay as they were. Each part's A and B are `lora_A.<part>` and
    `lora_B.<part>`. All parts' A are one stacked product; each part's B then adds into its own
    rows of the base output (`lora_update`), so a fused layer's B products cost what separate
    layers' would, with no block-diagonal zeros multiplied and no separate addition.

    The frozen base product goes through `onednn.linear` (oneDNN on CPU fp32 where that pays,
    `F.linear` elsewhere): with the weight frozen, its backward makes only the input's gradient.
    """

    def __init__(self, base: nn.Linear, parts: Sequence[LoraPart], dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._hold_base(base)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.parts = tuple(parts)
        self.lora_dropout = dropout
        self.merged = False
        self.disabled = False  # set by `disabled_adapters`: the base layer's output alone
        dtype = adapter_dtype(self._base_dtype())
        device = self.weight.device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for part in self.parts:
            a = torch.empty(part.r, self.in_features, dtype=dtype, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init, as nn.Linear's
            self.lora_A[part.key] = nn.Parameter(a)
            self.lora_B[part.key] = nn.Parameter(torch.zeros(part.rows, part.r, dtype=dtype, device=device))

    def _hold_base(self, base: nn.Linear) -> None:
        """Take the base layer's tensors as this layer's own, under the same names."""
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)

    def _base_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        return onednn.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{p.key}: r={p.r} alpha={p.alpha}" for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, lora=[{parts}]"

    def _stacked_a(self) -> torch.Tensor:
        return stacked_a(self.parts, self.lora_A)

    def _scaled_block_b(self) -> torch.Tensor:
        return scaled_block_b(self.parts, self.lora_B, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """The update the LoRA parts add to `weight`, (out, in), in the adapter's dtype."""
        return self._scaled_block_b() @ self._stacked_a()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._base_output(x)
        if self.merged or self.disabled:
            return result
        lora_x = x.to(self.lora_A[self.parts[0].key].dtype)
        if self.training and self.lora_dropout:
            # PEFT's separate modules draw separate dropout masks: one product per part.
            hidden = torch.cat(
                [F.linear(F.dropout(lora_x, self.lora_dropout, True), self.lora_A[p.key]) for p in self.parts], dim=-1
            )
        elif lora_x.dtype == result.dtype:
            return lora_update(
                lora_x,
                result,
                [(p.start, p.rows, p.scaling) for p in self.parts],
                [self.lora_A[p.key] for p in self.parts],
                [self.lora_B[p.key] for p in self.parts],
            )
        else:  # a half-precision base: the update is made in the adapter's float32, then cast
            hidden = F.linear(lora_x, self._stacked_a())
        return result + F.linear(hidden, self._scaled_block_b()).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


class QLoraLinear(LoraLinear):
    """A LoRA layer over a frozen NF4 base (QLoRA): the base output comes from the NF4 weight,
    dequantized per call as `NF4Linear` does (no full-precision copy is kept), and the LoRA
    update is added in the adapter's dtype (float32), as in `LoraLinear`.

    The base layer's buffers (`weight`, the packed codes, `weight_absmax`,
    `weight_nested_absmax`, `weight_nested_offset`) and frozen `bias` become this layer's own,
    so the state-dict keys stay the quantized model's. Merging is refused: the update cannot be
    added to 4-bit codes without requantizing (and losing it in the rounding).
    """

    def _hold_base(self, base: NF4Linear) -> None:
        for name in ("weight", "weight_absmax", "weight_nested_absmax", "weight_nested_offset"):
            self.register_buffer(name, getattr(base, name))
        self.bias = base.bias
        self.blocksize, self.double_blocksize, self.dtype = base.blocksize, base.double_blocksize, base.dtype
        self.chunk_rows = base.chunk_rows

    quantized_weight = NF4Linear.quantized_weight

    def _base_dtype(self) -> torch.dtype:
        return self.dtype

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.quantized_weight(), self.bias, self.chunk_rows)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", nf4(blocksize={self.blocksize}, double_quant={self.weight_nested_absmax is not None})"
        )

    def merge(self) -> None:
        raise LoraError(_NF4_MERGE)

    def unmerge(self) -> None:  # never merged
        pass


_NF4_MERGE = (
    "cannot merge a LoRA into an NF4 (4-bit) base layer: the merged weight would have to be requantized. "
    "Dequantize first: load the model in full precision, load_adapter the saved adapter onto it, then merge"
)


class DoraLinear(LoraLinear):
    """A LoRA layer with DoRA's learned magnitudes (Liu et al. 2024, "DoRA: Weight-Decomposed
    Low-Rank Adaptation"), computed as PEFT 0.21.2 computes it.

    Each targeted part has `lora_magnitude_vector.<part>`, one value per output row, starting
    at the row norms of W. Over a part's rows, with f = m / ||W + s B A||_row (the norm
    detached: no gradient through it), the layer adds (f - 1) W x + f s B A x to W x + b, which
    is f (W + s B A) x + b; untargeted parts are left alone. In training with dropout, PEFT
    drops x for both terms, one mask per module, so each part then computes its own rows.
    """

    def __init__(self, base: nn.Linear, parts: Sequence[LoraPart], dropout: float) -> None:
        super().__init__(base, parts, dropout)
        dtype = self.lora_A[self.parts[0].key].dtype
        # B starts at zero, so the magnitudes start at the base weight's row norms (f = 1).
        norms = torch.linalg.norm(self.weight.detach().to(dtype), dim=1)
        self.lora_magnitude_vector = nn.ParameterDict(
            {part.key: nn.Parameter(norms[part.start : part.start + part.rows].clone()) for part in self.parts}
        )
        # Set by merge, for unmerge; a buffer so it moves with the model, kept out of the state dict.
        self.register_buffer("_merged_norms", None, persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"

    def _row_factors(self, norms: torch.Tensor) -> torch.Tensor:
        """(out,): m / norm over each targeted part's rows, 1 over untargeted rows."""
        reference = self.lora_magnitude_vector[self.parts[0].key]
        pieces, row = [], 0
        for part in self.parts:
            if part.start > row:
                pieces.append(reference.new_ones(part.start - row))
            rows = slice(part.start, part.start + part.rows)
            pieces.append(self.lora_magnitude_vector[part.key] / norms[rows])
            row = part.start + part.rows
        if row < self.out_features:
            pieces.append(reference.new_ones(self.out_features - row))
        return torch.cat(pieces)

    def _adapted_row_norms(self) -> torch.Tensor:
        """||W + s B A|| per output row, detached (a constant to the gradient, as in PEFT)."""
        with torch.no_grad():
            delta = self.delta_weight()
            return torch.linalg.norm(self.weight.to(delta.dtype) + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return result
        lora_x = x.to(self.lora_A[self.parts[0].key].dtype)
        norms = self._adapted_row_norms()
        if self.training and self.lora_dropout:
            weight = self.weight.to(lora_x.dtype)
            pieces, row = [], 0
            for part in self.parts:
                if part.start > row:
                    pieces.append(lora_x.new_zeros(*lora_x.shape[:-1], part.start - row))
                rows = slice(part.start, part.start + part.rows)
                dropped = F.dropout(lora_x, self.lora_dropout, True)
                factor = self.lora_magnitude_vector[part.key] / norms[rows]
                lora = F.linear(F.linear(dropped, self.lora_A[part.key]), self.lora_B[part.key]) * part.scaling
                pieces.append((factor - 1) * F.linear(dropped, weight[rows]) + factor * lora)
                row = part.start + part.rows
            if row < self.out_features:
                pieces.append(lora_x.new_zeros(*lora_x.shape[:-1], self.out_features - row))
            return result + torch.cat(pieces, dim=-1).to(result.dtype)
        # Without dropout W x is the base output less its bias, as PEFT takes it.
        base = result if self.bias is None else result - self.bias
        lora = F.linear(F.linear(lora_x, self._stacked_a()), self._scaled_block_b())
        factors = self._row_factors(norms)
        return result + ((factors - 1) * base + factors * lora).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        # W <- f (W + s B A); the norms are kept, as PEFT keeps them: the merged weight cannot give them back.
        if not self.merged:
            delta = self.delta_weight()
            self._merged_norms = torch.linalg.norm(self.weight.to(delta.dtype) + delta, dim=1)
            factors = self._row_factors(self._merged_norms).unsqueeze(1)
            self.weight.copy_((factors * (self.weight.to(delta.dtype) + delta)).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            delta = self.delta_weight()
            factors = self._row_factors(self._merged_norms).unsqueeze(1)
            self.weight.copy_((self.weight.to(delta.dtype) / factors - delta).to(self.weight.dtype))
            self._merged_norms = None
            self.merged = False


# ---------------------------------------------------------------------------------- apply
def _targeted(config: LoraConfig, genforge_name: str, hf_name: str) -> list[str]:
    """The target_modules entries that select this part (by its own or its layer's name)."""
    targets = config.target_modules
    if isinstance(targets, str):
        return [targets] if re.fullmatch(targets, hf_name) or re.fullmatch(targets, genforge_name) else []
    return [t for t in targets if hf_name == t or hf_name.endswith(f".{t}") or name_matches(genforge_name, [t])]


def _plan(
    model: Transformer, config: LoraConfig, every_target: bool = True
) -> tuple[dict[str, list[LoraPart]], dict[str, LinearParts]]:
    """Which parts of which layers get a LoRA, checked before anything changes. `every_target`:
    each target must match something (else, as PEFT loads adapters, one match is enough)."""
    if not isinstance(model, Transformer):
        raise LoraError(f"LoRA goes on a genforge Transformer (genforge.checkpoint.load_model); got {type(model)}")
    if getattr(model, "packed_for_inference", False):
        raise LoraError("this model was packed for CPU inference; apply LoRA to the model as loaded, before packing")
    if any(isinstance(module, LoraLinear) for module in model.modules()) or hasattr(model, "ia3_config"):
        raise LoraError("this model already has LoRA layers; apply or load one adapter into a freshly loaded model")
    layouts = hf_linear_parts(model, _LINEAR_KINDS)
    plan = plan_lora_parts(model, config, layouts, every_target)
    head = model.lm_head
    if "lm_head" in plan and head is not None and head.weight is model.embed_tokens.weight:
        raise LoraError(
            "lm_head shares its weight with embed_tokens (tied embeddings): a merged LoRA would change the "
            "embeddings too; leave lm_head out of target_modules"
        )
    return plan, layouts


def plan_lora_parts(
    model: Transformer, config: LoraConfig, layouts: dict[str, LinearParts], every_target: bool = True
) -> dict[str, list[LoraPart]]:
    """Genforge layer name -> the LoRA parts `config` puts on it (each Hugging Face module it
    targets, with its rank, alpha and scale), over the model's `layouts`
    (`checkpoint.hf_linear_parts` of the model as loaded). Refuses a rank beyond a layer and
    targets that match nothing (with `every_target`; else one match is enough)."""
    plan: dict[str, list[LoraPart]] = {}
    used: set[str] = set()
    for genforge_name, layout in layouts.items():
        layer = model.get_submodule(genforge_name)
        start = 0
        for hf_name, rows in zip(layout.names, layout.sizes, strict=True):
            matched = _targeted(config, genforge_name, hf_name)
            if matched and layout.row_order is not None:
                # PEFT's adapter rows follow the checkpoint's order, genforge's the model's (BLOOM's
                # per-head query_key_value); saving them as they are would load wrong in PEFT.
                raise LoraError(
                    f"a LoRA on {hf_name} is not supported yet: this {model.config.family} layer stores its rows "
                    "in another order than genforge's; target the other linear layers (e.g. dense, dense_h_to_4h, "
                    "dense_4h_to_h)"
                )
            if matched:
                used.update(matched)
                r, alpha = config.rank_and_alpha(hf_name, genforge_name)
                limit = min(layer.in_features, rows)
                if r > limit:
                    raise LoraError(
                        f"r={r} for {hf_name} ({genforge_name}) is larger than min(in, out) = min({layer.in_features}, "
                        f"{rows}) = {limit}; a rank above that adds nothing. Use r <= {limit} (or a rank_pattern entry)"
                    )
                key = hf_name.rsplit(".", 1)[-1]
                plan.setdefault(genforge_name, []).append(
                    LoraPart(hf_name, key, start, rows, r, alpha, config.scaling(r, alpha))
                )
            start += rows
    if isinstance(config.target_modules, str) or not every_target:
        unmatched = [] if plan else list(config.target_modules)
    else:
        unmatched = [t for t in config.target_modules if t not in used]
    if unmatched:
        shown = [config.target_modules] if isinstance(config.target_modules, str) else unmatched
        raise LoraError(
            f"target_modules {', '.join(map(repr, shown))} match no linear layer of this "
            f"{model.config.family} model; its linear layers end in {', '.join(_leaf_names(layouts))}"
        )
    return plan


def _leaf_names(layouts: dict[str, LinearParts]) -> list[str]:
    genforge = sorted({name.rsplit(".", 1)[-1] for name in layouts})
    hf = sorted({name.rsplit(".", 1)[-1] for layout in layouts.values() for name in layout.names})
    return [f"{', '.join(genforge)} (genforge names)", f"{', '.join(hf)} (Hugging Face names)"]


def apply_lora(model: Transformer, config: LoraConfig) -> Transformer:
    """Put LoRA layers on the linear layers `config.target_modules` selects, in place, and
    freeze everything else (only the LoRA A and B train, and DoRA's magnitudes). Returns `model`."""
    plan, layouts = _plan(model, config)
    return _install(model, config, plan, layouts)


def _install(
    model: Transformer, config: LoraConfig, plan: dict[str, list[LoraPart]], layouts: dict[str, LinearParts]
) -> Transformer:
    quantized = [name for name in plan if isinstance(model.get_submodule(name), NF4Linear)]
    if config.use_dora and quantized:
        raise LoraError(
            f"DoRA on an NF4 (4-bit) base layer ({quantized[0]}) is not supported yet; use plain LoRA "
            "(use_dora=False) for QLoRA, or DoRA on the full-precision model"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layer_class = DoraLinear if config.use_dora else LoraLinear

    def wrap(layer: nn.Module, name: str) -> LoraLinear:
        chosen = QLoraLinear if isinstance(layer, NF4Linear) else layer_class
        return chosen(layer, plan[name], config.lora_dropout)

    swap_linears(model, wrap, include=list(plan), kinds=_LINEAR_KINDS)
    # Kept for save_adapter: the config, and every layer's Hugging Face names (to write targets exactly).
    model.lora_config = config
    model.lora_layouts = layouts
    return model


# The layers LoRA wraps: plain linear layers, and NF4 ones for QLoRA.
_LINEAR_KINDS = (nn.Linear, NF4Linear)


def _refuse_nf4_merge(layers: dict[str, LoraLinear]) -> None:
    quantized = [name for name, layer in layers.items() if isinstance(layer, QLoraLinear)]
    if quantized:
        raise LoraError(f"{quantized[0]}: {_NF4_MERGE}")


def _lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}
    if not layers:
        raise LoraError("this model has no LoRA layers; call apply_lora or load_adapter first")
    return layers


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` computes as its base model: every LoRA (and DoRA, QLoRA) layer
    returns its base layer's output alone (PEFT's `disable_adapter`). The reference model of
    preference training and KL penalties, with no second copy of the weights. A merged layer
    holds its update in the base weight, so it is refused (unmerge first)."""
    layers = _lora_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise LoraError(f"{merged[0]} is merged, so its base weight holds the update; call unmerge_lora first")
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers.values():
            layer.disabled = False


def merge_lora(model: nn.Module) -> nn.Module:
    """Add every LoRA update into its base weight (inference at base-model speed); exact to rounding.
    Refused (LoraError, nothing merged) when a base layer is NF4."""
    layers = _lora_layers(model)
    _refuse_nf4_merge(layers)
    for layer in layers.values():
        layer.merge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA update and put plain `nn.Linear` layers back (PEFT's `merge_and_unload`):
    the model is then the fine-tuned base model, trainable as when loaded, which
    `checkpoint.save_model` exports. Refused (LoraError, nothing changed) when a base layer is NF4."""
    layers = _lora_layers(model)
    _refuse_nf4_merge(layers)
    for layer in layers.values():
        layer.merge()
    swap_linears(model, plain_linear, kinds=(LoraLinear,))
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    del model.lora_config, model.lora_layouts
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged LoRA updates out of the base weights again, to train or swap adapters."""
    for layer in _lora_layers(model).values():
        layer.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors alone, by genforge name (`blocks.0.attn.qkv.lora_A.q_proj`; DoRA's
    `blocks.0.attn.qkv.lora_magnitude_vector.q_proj` too)."""
    kinds = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")
    return {name: tensor for name, tensor in model.state_dict().items() if any(kind in name for kind in kinds)}


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared parameters counted once; an NF4 layer's
    quantized weight (buffers, not parameters) counts as the weights it holds."""
    parameters = list(model.parameters())
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (NF4Linear, QLoraLinear)))
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters) + quantized


def peft_names(model: nn.Module) -> dict[str, str]:
    """Each LoRA parameter's genforge name -> the key PEFT saves it under
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; a DoRA magnitude's key
    has no `.weight`: `...q_proj.lora_magnitude_vector`)."""
    names = {}
    for layer_name, layer in _lora_layers(model).items():
        kinds = ("lora_A", "lora_B", "lora_magnitude_vector") if isinstance(layer, DoraLinear) else ("lora_A", "lora_B")
        for part in layer.parts:
            for kind in kinds:
                names[f"{layer_name}.{kind}.{part.key}"] = lora_key(part.hf_name, kind)
    return names


# ----------------------------------------------------------------------------- PEFT format
def _saved_targets(parts: list[LoraPart], every_hf_name: list[str]) -> list[str]:
    """target_modules that select exactly these modules: their last names where that is exact."""
    targeted = {p.hf_name for p in parts}
    leaves = {name.rsplit(".", 1)[-1] for name in targeted}
    if {name for name in every_hf_name if name.rsplit(".", 1)[-1] in leaves} == targeted:
        return sorted(leaves)
    return sorted(targeted)


def _saved_pattern(parts: list[LoraPart], value: str, default) -> dict:
    """Per-module values that differ from the default: by last name where a name has one value."""
    by_leaf: dict[str, set] = {}
    for part in parts:
        by_leaf.setdefault(part.key, set()).add(getattr(part, value))
    pattern = {}
    for part in parts:
        own = getattr(part, value)
        if own != default:
            pattern[part.key if len(by_leaf[part.key]) == 1 else part.hf_name] = own
    return pattern


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA as a PEFT adapter directory (adapter_config.json and
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the
    transformers model. Assembled beside `directory` and renamed into place."""
    layers = _lora_layers(model)
    config: LoraConfig = model.lora_config
    layouts: dict[str, LinearParts] = model.lora_layouts
    parts = [part for layer in layers.values() for part in layer.parts]
    every_hf_name = [name for layout in layouts.values() for name in layout.names]
    conv1d = any(layouts[name].transposed for name in layers)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if model.config.causal else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": _saved_targets(parts, every_hf_name),
        "rank_pattern": _saved_pattern(parts, "r", config.r),
        "alpha_pattern": _saved_pattern(parts, "alpha", config.lora_alpha),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": "none",
        # GPT-2's Conv1D stores weights (in, out); PEFT records that, with A and B shaped as for nn.Linear.
        "fan_in_fan_out": conv1d,
        "inference_mode": True,
    }
    tensors = {
        peft_name: model.get_parameter(name).detach().contiguous().cpu()
        for name, peft_name in peft_names(model).items()
    }
    return write_adapter(directory, adapter_config, tensors)


# Fields of a PEFT LoRA config that change what the adapter computes and that genforge does not do yet.
_UNSUPPORTED = {
    "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "exclude_modules": "exclude_modules",
    "target_parameters": "target_parameters",
    "lora_bias": "lora_bias",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "aLoRA",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "layer_replication": "layer_replication",
}


def _read_adapter_config(directory: Path) -> LoraConfig:
    path = directory / ADAPTER_CONFIG
    saved = read_adapter_config(
        directory, "LORA", "load_adapter", LoraError, " (IA3 adapters: genforge.finetune.load_ia3_adapter)"
    )
    unsupported = [what for key, what in _UNSUPPORTED.items() if saved.get(key) not in (None, False, [], {}, "")]
    if unsupported:
        raise LoraError(f"{path} uses {', '.join(unsupported)}, which genforge's LoRA does not support yet")
    if saved.get("target_modules") in (None, [], ""):
        raise LoraError(f"{path} names no target_modules")
    return LoraConfig(
        target_modules=saved["target_modules"],
        r=saved.get("r", 8),
        lora_alpha=saved.get("lora_alpha", 8),
        lora_dropout=saved.get("lora_dropout", 0.0) or 0.0,
        use_rslora=bool(saved.get("use_rslora", False)),
        rank_pattern=saved.get("rank_pattern") or {},
        alpha_pattern=saved.get("alpha_pattern") or {},
        bias=saved.get("bias", "none"),
        use_dora=bool(saved.get("use_dora", False)),
    )


@dataclass
class LoraAdapterFiles:
    """A PEFT LoRA adapter directory read and checked against a model (`read_lora_adapter`),
    before anything is put on the model."""

    directory: Path
    config: LoraConfig
    plan: dict[str, list[LoraPart]]  # genforge layer name -> its LoRA parts
    layouts: dict[str, LinearParts]
    tensors: dict[str, torch.Tensor]  # by PEFT key
    # PEFT also saves the base weight of a targeted layer it counts as an embedding (lm_head),
    # which replaces the base rows on load: PEFT key -> (layer, part, stored transposed).
    base_rows: dict[str, tuple[str, LoraPart, bool]]

    def lora_tensors(self, layer_name: str, kind: str) -> dict[str, torch.Tensor]:
        """Part key -> the stored `kind` ("lora_A" or "lora_B") of each part of this layer."""
        return {part.key: self.tensors[lora_key(part.hf_name, kind)] for part in self.plan[layer_name]}


def lora_key(hf_name: str, kind: str) -> str:
    """The key PEFT saves a LoRA tensor under: `kind` is lora_A, lora_B (`.weight` added) or
    lora_magnitude_vector (DoRA's, without `.weight`)."""
    suffix = "" if kind == "lora_magnitude_vector" else ".weight"
    return f"{PEFT_PREFIX}{hf_name}.{kind}{suffix}"


def read_lora_adapter(
    model: Transformer, directory: str | Path, layouts: dict[str, LinearParts] | None = None
) -> LoraAdapterFiles:
    """Read the PEFT LoRA adapter in `directory` and check it against `model`: its config, which
    layers it targets, and every tensor's name and shape. `layouts`: the model's Hugging Face
    parts, taken by the caller from the model as loaded (`checkpoint.hf_linear_parts`), for a
    model whose layers are wrapped or packed since; None reads them from `model`, which must
    then have no adapter yet. Changes nothing."""
    directory = Path(directory)
    config = _read_adapter_config(directory)
    weights = adapter_weights_path(directory, LoraError)
    try:
        if layouts is None:
            plan, layouts = _plan(model, config, every_target=False)
        else:
            plan = plan_lora_parts(model, config, layouts, every_target=False)
    except LoraError as err:
        raise LoraError(f"the adapter in {directory} does not fit this model: {err}") from None
    expected = {}
    base_rows: dict[str, tuple[str, LoraPart, bool]] = {}
    for layer_name, parts in plan.items():
        in_features = model.get_submodule(layer_name).in_features
        for part in parts:
            expected[lora_key(part.hf_name, "lora_A")] = (part.r, in_features)
            expected[lora_key(part.hf_name, "lora_B")] = (part.rows, part.r)
            if config.use_dora:
                expected[lora_key(part.hf_name, "lora_magnitude_vector")] = (part.rows,)
            transposed = layouts[layer_name].transposed
            base_rows[f"{PEFT_PREFIX}{part.hf_name}.base_layer.weight"] = (layer_name, part, transposed)
    stored = read_adapter_tensors(weights)
    for key in stored.keys() & base_rows.keys():
        _, part, transposed = base_rows[key]
        in_features = expected[lora_key(part.hf_name, "lora_A")][1]
        expected[key] = (in_features, part.rows) if transposed else (part.rows, in_features)
    check_adapter_fits(directory, expected, stored, "LoRA tensors", LoraError, optional=base_rows.keys())
    check_adapter_shapes(directory, expected, stored, LoraError)
    base_rows = {key: where for key, where in base_rows.items() if key in stored}
    return LoraAdapterFiles(directory, config, plan, layouts, stored, base_rows)


def load_adapter(model: Transformer, directory: str | Path) -> Transformer:
    """Put the PEFT LoRA adapter saved in `directory` (by PEFT's `save_pretrained` or
    `save_adapter`; safetensors only) onto `model`, in place. Everything is checked against
    the model before the model changes."""
    files = read_lora_adapter(model, directory)
    for key, (layer_name, _, _) in files.base_rows.items():
        if isinstance(model.get_submodule(layer_name), NF4Linear):
            raise LoraError(
                f"the adapter in {files.directory} replaces base weights ({key}), which an NF4 layer cannot take; "
                "load it onto the full-precision model"
            )
    _install(model, files.config, files.plan, files.layouts)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, peft_name in peft_names(model).items():
            parameters[name].copy_(files.tensors[peft_name])
        for key, (layer_name, part, transposed) in files.base_rows.items():
            tensor = files.tensors[key].t() if transposed else files.tensors[key]
            model.get_submodule(layer_name).weight[part.start : part.start + part.rows].copy_(tensor)
    return model
