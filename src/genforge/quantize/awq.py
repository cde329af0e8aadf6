"""AWQ: activation-aware INT4 weights (Lin et al. 2024, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration").

A few input channels of each linear layer carry much larger activations than the rest, and
the rounding error of their weights costs the most output error. AWQ protects them without
mixed precision: the layer computes W x = (W diag(s)) (diag(s)^-1 x), so scaling weight
column c by s_c > 1 and dividing the input by s_c changes nothing in full precision, but the
rounding error of that column shrinks by about s_c relative to its weight (as long as the
group's range, set by its largest weight, does not grow as much). The input division is
folded into the operation that produces the input, so it costs nothing at run time:

- the norm before qkv (`attn_norm`) and before the MLP's input projection (`mlp_norm`), in
  pre-norm blocks: the norm's weight (and a LayerNorm's bias) divided by s;
- the value rows of `qkv` for the attention output projection `o`: attention mixes value
  vectors with weights that sum to one, so its output is linear in v and dividing v's
  channels divides o's inputs exactly (with grouped-query attention, the query heads that
  share a value head share its scales);
- the up half of `gate_up` for `down` in a gated MLP: down's input is act(gate) * up, linear
  in up. A plain MLP's act(up(x)) is not, so its `down` is not scaled, nor are the layers of a
  post-norm block (BERT), whose norm output also feeds the residual.

s = mean|x|^alpha per input channel (normalised so max(s) * min(s) = 1), with alpha searched
on a grid in [0, 1) to minimise the error of the module's output (attention, MLP, or the
layer) after round-to-nearest INT4 of the scaled weights, on the calibration inputs. Then,
optionally, each group's range is clipped (a shrink factor searched per row and group) where
that lowers the group's share of the output error. The grids are round-to-nearest INT4 of
the scaled, clipped weights (`grid.quantize_int4`). Where the error comes from: rounding is
still round-to-nearest; AWQ only chooses which weights it hurts least.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..model import Attention, Block, MixtureOfExperts, Transformer
from .calibration import BlockCall, block_linear_names, capture_block_inputs, run_block
from .grid import GridError, Int4Grid, check_group_size, dequantize_int4, quantize_int4

__all__ = ["AWQError", "AWQResult", "awq_quantize_model"]

DEFAULT_EXCLUDE = ("router",)  # a MoE router is tiny, and a flipped routing costs far more than its bits save


class AWQError(ValueError):
    """A model or setting AWQ cannot take; the message says what was wrong and what is accepted."""


@dataclass
class AWQResult:
    """AWQ's grids by layer name, the alpha chosen for each scaled site (named by its first
    layer), and the layers left unscaled with the reason."""

    grids: dict[str, Int4Grid]
    alphas: dict[str, float]
    unscaled: dict[str, str]


@dataclass
class _Site:
    """A set of linear layers that read one input, the operation the scales fold into, and
    the module whose output the alpha search scores."""

    name: str
    consumers: list[tuple[str, nn.Linear]]  # (name, layer) reading the scaled input
    fold: Callable[[torch.Tensor], None]  # divide the producer of that input by the scales
    inspect: nn.Module
    # o under grouped-query attention: o's input channels are (query head, head_dim), and the
    # query heads of a group read one value head, so they share that value channel's scale.
    value_heads: int = 0
    heads_per_value: int = 1


def _rtn(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    return dequantize_int4(quantize_int4(weight, group_size)).to(weight.dtype)


def _fold_into_norm(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    def fold(scales: torch.Tensor) -> None:
        # norm(x) * (weight + offset): dividing the effective weight (and a LayerNorm's bias)
        # divides the output. Gemma keeps its weight as an offset from one.
        offset = norm.weight_offset
        norm.weight.copy_(((norm.weight.float() + offset) / scales - offset).to(norm.weight.dtype))
        if norm.bias is not None:
            norm.bias.div_(scales.to(norm.bias.dtype))

    return fold


def _fold_into_rows(layer: nn.Linear, start: int) -> Callable[[torch.Tensor], None]:
    def fold(scales: torch.Tensor) -> None:
        rows = slice(start, start + scales.numel())
        layer.weight[rows].div_(scales[:, None].to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias[rows].div_(scales.to(layer.bias.dtype))

    return fold


def _sites(block: Block, prefix: str, selected: set[str], unscaled: dict[str, str]) -> list[_Site]:
    """The scalable sites of one block, in execution order, for the selected layers."""
    sites = []

    def chosen(pairs):
        return [(name, layer) for name, layer in pairs if layer is not None and name in selected]

    attn: Attention = block.attn
    mlp = block.mlp
    qkv = chosen([(f"{prefix}.attn.qkv", attn.qkv)])
    if block.post_norm:
        for name, _ in qkv:
            unscaled[name] = "post-norm block: the norm before it also feeds the residual"
    elif qkv:
        sites.append(_Site(qkv[0][0], qkv, _fold_into_norm(block.attn_norm), attn))

    o = chosen([(f"{prefix}.attn.o", attn.o)])
    if o:
        v_start = (attn.num_heads + attn.num_kv_heads) * attn.head_dim
        group = attn.num_heads // attn.num_kv_heads
        sites.append(_Site(o[0][0], o, _fold_into_rows(attn.qkv, v_start), attn.o, attn.num_kv_heads, group))

    if isinstance(mlp, MixtureOfExperts):
        experts = list(mlp.experts)
        expert_prefix = [f"{prefix}.mlp.experts.{i}" for i in range(len(experts))]
    else:
        experts, expert_prefix = [mlp], [f"{prefix}.mlp"]
    inputs = chosen(
        [(f"{p}.gate_up", e.gate_up) for p, e in zip(expert_prefix, experts)]
        + [(f"{p}.up", e.up) for p, e in zip(expert_prefix, experts)]
    )
    if block.post_norm:
        for name, _ in inputs:
            unscaled[name] = "post-norm block: the norm before it also feeds the residual"
    elif inputs:
        fold_norm = _fold_into_norm(block.mlp_norm)
        router = getattr(mlp, "router", None)

        def fold(scales: torch.Tensor, fold_norm=fold_norm, router=router) -> None:
            fold_norm(scales)
            if router is not None and f"{prefix}.mlp.router" not in selected:
                # The router reads the same normed input and stays in fp: it takes the scales
                # into its weight so that its logits do not change.
                router.weight.mul_(scales.to(router.weight.dtype))

        site = _Site(inputs[0][0], inputs, fold, mlp)
        if router is not None and f"{prefix}.mlp.router" in selected:
            site.consumers.append((f"{prefix}.mlp.router", router))
        sites.append(site)

    for p, expert in zip(expert_prefix, experts):
        down = chosen([(f"{p}.down", expert.down)])
        if not down:
            continue
        if expert.gate_up is None:
            unscaled[down[0][0]] = "its input act(up(x)) is not linear in up, so no exact fold"
            continue
        inner = expert.down.in_features
        sites.append(_Site(down[0][0], down, _fold_into_rows(expert.gate_up, inner), expert.down))
    return sites


def _output(module: nn.Module, args: tuple) -> torch.Tensor:
    out = module(*args)
    return out[0] if isinstance(out, tuple) else out


class _InputRecorder:
    """Forward pre-hooks keeping the positional inputs of some modules for every batch."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.inputs: dict[int, list[tuple]] = {id(m): [] for m in modules}
        self.handles = []
        for module in modules:

            def keep(module, args):
                detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
                self.inputs[id(module)].append(detached)

            self.handles.append(module.register_forward_pre_hook(keep))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _value_channels(values: torch.Tensor, site: _Site) -> torch.Tensor:
    """Per-channel values of o's input (query heads x head_dim) averaged over the query heads
    that share a value head: (value heads x head_dim). Other sites: as they are."""
    if not site.value_heads:
        return values
    return values.view(site.value_heads, site.heads_per_value, -1).mean(dim=1).reshape(-1)


def _expand(scales: torch.Tensor, site: _Site) -> torch.Tensor:
    """Scales over the consumers' input channels: per value channel repeated for each query
    head of its group (o), else as they are."""
    if not site.value_heads:
        return scales
    return scales.view(site.value_heads, 1, -1).expand(-1, site.heads_per_value, -1).reshape(-1)


def _squared_error(site: _Site, inputs: list[tuple], reference: list[torch.Tensor]) -> float:
    return sum(float((_output(site.inspect, args) - ref).float().pow(2).sum()) for args, ref in zip(inputs, reference))


def _search_scales(
    site: _Site, inputs: list[tuple], consumer_input: torch.Tensor, grid_points: int, group_size: int
) -> tuple[torch.Tensor, float, float, float]:
    """(scales, alpha, error at alpha=0, best error): s = mean|x|^alpha with alpha on
    `grid_points` values in [0, 1), chosen to minimise the inspected module's squared output
    error after RTN INT4 of the consumers' scaled weights. The weights are restored."""
    mean_abs = _value_channels(consumer_input.abs().float().mean(dim=0), site)
    originals = [layer.weight.detach().clone() for _, layer in site.consumers]
    reference = [_output(site.inspect, args) for args in inputs]
    best = (float("inf"), 0.0, torch.ones_like(mean_abs))
    plain_error = float("nan")
    try:
        for step in range(grid_points):
            alpha = step / grid_points
            scales = mean_abs.pow(alpha).clamp(min=1e-4)
            # Centred on 1 (geometric mean of the extremes), so the weights' scale stays put.
            scales = scales / (scales.max() * scales.min()).sqrt()
            expanded = _expand(scales, site)
            for (_, layer), weight in zip(site.consumers, originals):
                layer.weight.copy_(_rtn(weight * expanded, group_size) / expanded)
            error = _squared_error(site, inputs, reference)
            if step == 0:
                plain_error = error
            if error < best[0]:
                best = (error, alpha, scales)
    finally:
        for (_, layer), weight in zip(site.consumers, originals):
            layer.weight.copy_(weight)
    return best[2], best[1], plain_error, best[0]


def _search_clip(
    weight: torch.Tensor, inputs: torch.Tensor, group_size: int, grid_points: int, max_shrink: float, max_tokens: int
) -> torch.Tensor:
    """`weight` with each (row, group) clamped to [r * min, r * max] for the shrink r in
    [1 - max_shrink, 1] that minimises that group's share of the output error on `inputs`
    (tokens x in): sum over tokens of (x_g . (w_g - q_g))^2. r = 1 keeps the group as it was."""
    if inputs.shape[0] > max_tokens:
        # Evenly spaced tokens: the error sums need a sample, not all of them.
        inputs = inputs[torch.linspace(0, inputs.shape[0] - 1, max_tokens).long()]
    rows, columns = weight.shape
    groups = columns // group_size
    w = weight.float().reshape(rows, groups, group_size)
    x = inputs.float().reshape(-1, groups, group_size)  # tokens x groups x group_size
    low = w.amin(dim=2, keepdim=True).clamp(max=0)
    high = w.amax(dim=2, keepdim=True).clamp(min=0)
    best_error = torch.full((rows, groups), float("inf"))
    best = w.clone()
    for step in range(grid_points):
        ratio = 1.0 - max_shrink * step / grid_points
        clipped = torch.maximum(torch.minimum(w, high * ratio), low * ratio)
        quantized = dequantize_int4(quantize_int4(clipped.reshape(rows, columns), group_size)).reshape(w.shape)
        # (tokens, groups, rows): each group's contribution to each output, error alone.
        error = _group_error(x, w - quantized)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better[..., None], clipped, best)
    return best.reshape(rows, columns).to(weight.dtype)


def _group_error(x: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    """sum over tokens of (x[t, g] . difference[r, g])^2, per (row r, group g)."""
    per_token = torch.einsum("tgc,rgc->trg", x, difference)
    return per_token.pow(2).sum(dim=0)


@torch.no_grad()
def awq_quantize_model(
    model: Transformer,
    calibration_rows,
    group_size: int = 128,
    grid_points: int = 20,
    clip: bool = True,
    max_shrink: float = 0.5,
    clip_grid_points: int = 20,
    clip_tokens: int = 2048,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> AWQResult:
    """AWQ INT4 grids for the linear layers of `model`'s blocks, block by block.

    For each block, on its calibration inputs: each scalable site (see the module doc) gets the
    scales its alpha search chose, folded into the producer of its input and multiplied into
    its layers' weights; then each layer's groups are clipped (`clip`); then each layer is
    round-to-nearest INT4. The next block is calibrated on this block's quantized outputs.

    The model is changed in place: the norms before qkv and the MLP, and the value rows of qkv
    and the up rows of gate_up, hold the folded scales; every quantized layer's `weight` holds
    its dequantized INT4 values. The model therefore computes what the quantized one will, and
    a layer built from a grid must be put into this model (with its changed norms), not into
    the original. The LM head stays in fp.
    """
    if not isinstance(model, Transformer):
        raise AWQError(f"awq_quantize_model takes a genforge Transformer; got {type(model).__name__}")
    if not isinstance(grid_points, int) or grid_points < 1:
        raise AWQError(f"grid_points (alphas tried in [0, 1)) must be a positive integer; got {grid_points!r}")
    if not 0.0 <= max_shrink < 1.0:
        raise AWQError(f"max_shrink (the most a group's range is clipped) must be in [0, 1); got {max_shrink!r}")
    per_block = block_linear_names(model, include, exclude, "AWQ")
    if not any(per_block):
        raise AWQError("no linear layer inside the blocks is selected; check include / exclude")
    for names in per_block:
        for name in names:
            try:
                check_group_size(model.get_submodule(name).in_features, group_size)
            except GridError as error:
                raise AWQError(f"{name}: {error}") from None

    grids: dict[str, Int4Grid] = {}
    alphas: dict[str, float] = {}
    unscaled: dict[str, str] = {}
    was_training = model.training
    model.eval()
    try:
        calls = capture_block_inputs(model, calibration_rows, batch_size)
        for index, block in enumerate(model.blocks):
            selected = set(per_block[index])
            if not selected:
                calls = run_block(block, calls)
                continue
            sites = _sites(block, f"blocks.{index}", selected, unscaled)
            for site in sites:
                inputs, consumer_input = _record(block, calls, site)
                if consumer_input is None:
                    unscaled[site.name] = "no calibration token reached it (a MoE expert none was routed to)"
                    continue
                scales, alpha, _, _ = _search_scales(site, inputs, consumer_input, grid_points, group_size)
                site.fold(scales)
                expanded = _expand(scales, site)
                for _, layer in site.consumers:
                    layer.weight.mul_(expanded.to(layer.weight.dtype))
                alphas[site.name] = alpha
                if progress is not None:
                    progress(f"awq {site.name}: alpha {alpha:.2f}")
            for name in per_block[index]:
                layer = model.get_submodule(name)
                layer_input = _record_layer(block, calls, layer) if clip else None
                if layer_input is not None:
                    layer.weight.copy_(
                        _search_clip(layer.weight, layer_input, group_size, clip_grid_points, max_shrink, clip_tokens)
                    )
                grid = quantize_int4(layer.weight, group_size)
                layer.weight.copy_(dequantize_int4(grid).to(layer.weight.dtype))
                grids[name] = grid
            calls = run_block(block, calls)
    finally:
        model.train(was_training)
    return AWQResult(grids, alphas, unscaled)


def _record(block: Block, calls: list[BlockCall], site: _Site) -> tuple[list[tuple], torch.Tensor | None]:
    """The inspected module's positional inputs per batch, from running `block` on `calls`, and
    its first input over all batches (tokens x features): what the site's layers read (the
    normed hidden states for attention and the MLP, the layer's own input for o and down)."""
    recorder = _InputRecorder([site.inspect])
    try:
        for call in calls:
            call.run(block)
    finally:
        recorder.remove()
    inputs = recorder.inputs[id(site.inspect)]
    if not inputs:
        return inputs, None
    return inputs, torch.cat([args[0].reshape(-1, args[0].shape[-1]) for args in inputs])


def _record_layer(block: Block, calls: list[BlockCall], layer: nn.Linear) -> torch.Tensor | None:
    """The layer's inputs (tokens x in_features) from running `block` on `calls`; None when it saw none."""
    recorder = _InputRecorder([layer])
    try:
        for call in calls:
            call.run(block)
    finally:
        recorder.remove()
    recorded = recorder.inputs[id(layer)]
    return torch.cat([args[0].reshape(-1, args[0].shape[-1]) for args in recorded]) if recorded else None
