"""Pruning: weights set to zero (magnitude, N:M) and parts of the model removed (MLP neurons,
attention heads).

Two kinds, with different costs and gains:

- **Zeroing weights keeps every shape.** Magnitude pruning (Han et al. 2015, "Learning both
  Weights and Connections") zeroes the weights of smallest |w|. It can be unstructured per layer
  (each layer loses the same share) or global (one threshold over all the selected layers, so
  layers with many small weights lose more). N:M semi-structured pruning (Mishra et al. 2021,
  "Accelerating Sparse Deep Neural Networks"; 2:4 is what NVIDIA's sparse tensor cores run)
  keeps the N largest |w| in every group of M consecutive input weights of a row. The model is
  no smaller on disk and no faster on dense kernels: the zeros are still stored and multiplied.
  The gain comes only from a sparse format or a sparse kernel (2:4 on Ampere-and-later GPUs).
- **Structured pruning removes rows and columns.** An MLP neuron j is row j of `up` (for a
  gated MLP, rows j and intermediate_size + j of the fused `gate_up`, which holds gate then
  up) plus column j of `down`. An attention head is its rows of the fused `qkv` (query heads,
  then key heads, then value heads, each `head_dim` rows) plus its `head_dim` columns of `o`.
  The model gets smaller and faster on any hardware, and `Config` records the new sizes, so
  `checkpoint.save_model` writes a directory transformers loads.

Importance, for choosing what to remove:

- A neuron's is magnitude based: ||w_in,j|| × ||w_out,j||, with ||gate_j|| × ||up_j|| as the
  input side of a gated MLP (a bias joins its row's norm). A neuron of importance 0 adds
  nothing to the output, because every activation here maps 0 to 0.
- A head's is Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"): put a gate
  ξ_h = 1 on each head's output and take I_h = E_x |∂L(x)/∂ξ_h|, the expected absolute
  gradient of the language-model loss with respect to the gate, over calibration text (one
  gradient per sequence, then the mean of their absolute values). It is the first-order
  estimate of how much the loss changes when the head is masked. The paper also normalises the
  scores of each layer; here every layer loses the same number of heads, so it would not
  change the choice.

Transformers' config has one `intermediate_size`, one `num_attention_heads` and one
`num_key_value_heads` for every layer, so structured pruning removes the same number of neurons
or heads in every layer and picks, in each layer, the least important ones.

Heads under grouped-query attention: each key/value head serves a group of consecutive query
heads, and transformers (as genforge) maps query head h to key/value head h // group_size. Two
removals keep that mapping valid, with every group the same size:
- `unit="query"` removes the same number of query heads from every group (the group gets
  smaller; the key/value heads stay). Under plain multi-head attention (groups of one) a query
  head goes with its key/value head.
- `unit="group"` removes whole groups: a key/value head and all its query heads.
Any other choice leaves groups of different sizes, which neither model can express, and is
refused.

`torch.nn.utils.prune` is the reference for the magnitude masks: the k = round(sparsity × n)
smallest |w| are found with `torch.topk(largest=False)`, as its `L1Unstructured` does, so ties
are broken the same way and the masks are identical (global: over the layers' weights
concatenated in module order, as `global_unstructured` does).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..model import MLP, Attention, Transformer
from ..swap import linear_names

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_INCLUDE",
    "HEAD_UNITS",
    "METHODS",
    "PruneError",
    "PruneResult",
    "apply_masks",
    "calibration_rows",
    "head_importance",
    "heads_to_remove",
    "hold_masks",
    "magnitude_masks",
    "n_m_mask",
    "n_m_masks",
    "neuron_importance",
    "parse_n_m",
    "prune_heads",
    "prune_magnitude",
    "prune_model",
    "prune_n_m",
    "prune_neurons",
    "remove_heads",
    "remove_neurons",
    "weight_sparsity",
]

METHODS = ("magnitude", "2:4", "neurons", "heads")  # and any "N:M"
HEAD_UNITS = ("query", "group")
# The linear layers of the blocks; the LM head and the embeddings are left dense (they are tied
# in many models, and the head's errors reach every token directly), as is an MoE router.
DEFAULT_INCLUDE = ("blocks.*",)
DEFAULT_EXCLUDE = ("router",)
# Families whose Hugging Face config carries `head_dim`: the others (GPT-2, BERT) derive it as
# hidden_size / heads, so a model with fewer heads could not be exported.
_HEAD_DIM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral")
# transformers' LlamaConfig (5.x, `validate_architecture`) refuses a hidden_size that is not a
# multiple of num_attention_heads, even with head_dim given.
_HEADS_DIVIDE_HIDDEN = ("llama",)


class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message says what is accepted."""


@dataclass
class PruneResult:
    """What one pruning call did.

    `zero_fraction` is the share of exact zeros over the selected weights after pruning (for
    structured methods, over the whole blocks' linear weights that remain). `removed` counts
    the neurons or heads taken out of each layer (structured methods only).
    """

    method: str
    sparsity: float
    parameters_before: int
    parameters_after: int
    zero_fraction: float
    layers: list[str]
    removed: dict[str, int] = field(default_factory=dict)
    config_changes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"config_changes": {k: list(v) for k, v in self.config_changes.items()}}


# ------------------------------------------------------------------------------- selection
def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise PruneError(
            f"sparsity must be a number in [0, 1) (the share of weights, neurons or heads to remove), got {sparsity!r}"
        )
    return float(sparsity)


def _selected_linears(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str]) -> dict[str, nn.Linear]:
    try:
        names = linear_names(model, DEFAULT_INCLUDE if include is None else include, exclude)
    except ValueError as err:
        raise PruneError(str(err)) from None
    if not names:
        raise PruneError(f"no linear layer is selected by include={include!r}, exclude={tuple(exclude)!r}")
    layers = {name: model.get_submodule(name) for name in names}
    for name, layer in layers.items():
        if not layer.weight.is_floating_point():
            raise PruneError(f"{name} holds {layer.weight.dtype} weights; prune a floating-point model")
    return layers


def _count_to_prune(sparsity: float, size: int) -> int:
    # torch.nn.utils.prune's rule for a fractional amount: Python's round (halves to even).
    return round(sparsity * size)


def _mask_smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A keep-mask (bool, the shape of `scores`) that drops the `count` smallest |scores|.

    `torch.topk(largest=False)` picks them, as `torch.nn.utils.prune.L1Unstructured` does, so
    ties fall the same way."""
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if count:
        dropped = torch.topk(scores.abs().reshape(-1), k=count, largest=False).indices
        keep.view(-1)[dropped] = False
    return keep


# ----------------------------------------------------------------------- zeroing weights
def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[str, torch.Tensor]:
    """Keep-masks (bool, True = kept) of unstructured magnitude pruning for each selected layer.

    scope="layer": each layer loses round(sparsity × its size) weights of smallest |w|
    (`torch.nn.utils.prune.l1_unstructured`). scope="global": round(sparsity × total) weights
    of smallest |w| over all selected layers together (`global_unstructured`).
    """
    sparsity = _check_sparsity(sparsity)
    if scope not in ("global", "layer"):
        raise PruneError(f"scope must be 'global' (one threshold over all layers) or 'layer', got {scope!r}")
    layers = _selected_linears(model, include, exclude)
    weights = {name: layer.weight.detach() for name, layer in layers.items()}
    if scope == "layer":
        return {name: _mask_smallest(w, _count_to_prune(sparsity, w.numel())) for name, w in weights.items()}
    together = torch.cat([w.reshape(-1) for w in weights.values()])
    keep = _mask_smallest(together, _count_to_prune(sparsity, together.numel()))
    pieces = keep.split([w.numel() for w in weights.values()])
    return {name: piece.view(w.shape) for (name, w), piece in zip(weights.items(), pieces)}


def parse_n_m(method: str) -> tuple[int, int]:
    """(N, M) from a method name like "2:4"."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", method)
    if not match:
        raise PruneError(f"an N:M method is written like '2:4', got {method!r}")
    return int(match.group(1)), int(match.group(2))


def _check_n_m(n: int, m: int) -> None:
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PruneError(f"{name} must be a positive integer, got {value!r}")
    if n > m:
        raise PruneError(f"N:M keeps N of every M weights, so N must not exceed M; got {n}:{m}")


def n_m_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask of N:M semi-structured pruning of a (out, in) weight: in every group of `m`
    consecutive input weights of a row, the `n` of largest |w| are kept (ties as `torch.topk`
    breaks them). `in` must be a multiple of `m`."""
    _check_n_m(n, m)
    if weight.dim() != 2:
        raise PruneError(f"N:M pruning takes a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if columns % m:
        raise PruneError(f"N:M groups of {m} need the input size to be a multiple of {m}; this weight has {columns}")
    groups = weight.detach().abs().reshape(rows, columns // m, m)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.view(rows, columns)


def n_m_masks(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[str, torch.Tensor]:
    """`n_m_mask` for every selected layer; every one is checked before any mask is made."""
    _check_n_m(n, m)
    layers = _selected_linears(model, include, exclude)
    uneven = [f"{name} ({layer.in_features})" for name, layer in layers.items() if layer.in_features % m]
    if uneven:
        raise PruneError(
            f"N:M groups of {m} need input sizes that are multiples of {m}; these layers are not: {', '.join(uneven)} "
            "(leave them out with exclude=)"
        )
    return {name: n_m_mask(layer.weight, n, m) for name, layer in layers.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, the weights each keep-mask drops (exact +0.0, whatever the sign was)."""
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        if keep.shape != weight.shape:
            raise PruneError(f"the mask for {name} has shape {tuple(keep.shape)}, the weight {tuple(weight.shape)}")
        weight.masked_fill_(~keep.to(weight.device), 0.0)


def hold_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[RemovableHandle]:
    """Keep pruned weights at zero while the model trains (a recovery fine-tune).

    A gradient hook on each masked weight zeroes the gradient of its pruned entries. With a
    zero gradient from the start, Adam's moments stay zero and its step is zero, and decoupled
    weight decay (AdamW) scales a zero to zero, so the pruned weights never move. Returns the
    hooks' handles: `handle.remove()` ends it.
    """
    handles = []
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        kept = keep.to(device=weight.device, dtype=weight.dtype)
        handles.append(weight.register_hook(lambda grad, kept=kept: grad * kept))
    return handles


def weight_sparsity(model: nn.Module, include: Sequence[str] | None = None, exclude=DEFAULT_EXCLUDE) -> float:
    """The share of exact zeros among the selected layers' weights."""
    layers = _selected_linears(model, include, exclude)
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
    return zeros / sum(layer.weight.numel() for layer in layers.values())


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_magnitude(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> tuple[PruneResult, dict[str, torch.Tensor]]:
    """Magnitude pruning in place (`magnitude_masks`); returns the result and the masks (for
    `hold_masks` during a recovery fine-tune)."""
    masks = magnitude_masks(model, sparsity, scope, include, exclude)
    apply_masks(model, masks)
    count = _parameter_count(model)
    zeros = weight_sparsity(model, include, exclude)
    return PruneResult(f"magnitude-{scope}", float(sparsity), count, count, zeros, list(masks)), masks


def prune_n_m(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> tuple[PruneResult, dict[str, torch.Tensor]]:
    """N:M pruning in place (`n_m_masks`); returns the result and the masks."""
    masks = n_m_masks(model, n, m, include, exclude)
    apply_masks(model, masks)
    count = _parameter_count(model)
    zeros = weight_sparsity(model, include, exclude)
    return PruneResult(f"{n}:{m}", 1 - n / m, count, count, zeros, list(masks)), masks


# --------------------------------------------------------------------- removing neurons
def _dense_blocks(model: Transformer, what: str) -> None:
    if not isinstance(model, Transformer):
        raise PruneError(f"structured pruning takes a genforge Transformer, got {type(model).__name__}")
    if model.config.num_experts:
        raise PruneError(
            f"pruning {what} of a mixture-of-experts model is not supported (each expert would need its own "
            "intermediate size); prune a dense model, or use magnitude or N:M pruning"
        )


def _plain_weight(layer: nn.Module, name: str) -> nn.Linear:
    if not isinstance(layer, nn.Linear):
        raise PruneError(
            f"{name} is a {type(layer).__name__}, not a linear layer: merge adapters or undo quantization before "
            "structured pruning"
        )
    return layer


def _sliced_linear(layer: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None):
    """A plain `nn.Linear` holding `layer`'s weight rows `rows` and columns `columns` (bias rows too)."""
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if columns is not None:
        weight = weight[:, columns]
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=layer.bias.requires_grad)
    return new


def _row_norms(layer: nn.Linear, rows: slice) -> torch.Tensor:
    weight = layer.weight.detach()[rows].float()
    if layer.bias is None:
        return weight.norm(dim=1)
    return torch.cat((weight, layer.bias.detach()[rows].float()[:, None]), dim=1).norm(dim=1)


@torch.no_grad()
def neuron_importance(model: Transformer) -> torch.Tensor:
    """(num_layers, intermediate_size) magnitude importance of each MLP neuron:
    ||w_in,j|| × ||down[:, j]||, where w_in,j is row j of `up` (with its bias), or for a gated
    MLP ||gate_j|| × ||up_j||. Zero means the neuron adds exactly nothing to the output."""
    _dense_blocks(model, "neurons")
    inner = model.config.intermediate_size
    scores = []
    for i, block in enumerate(model.blocks):
        mlp: MLP = block.mlp
        out_norm = _plain_weight(mlp.down, f"blocks.{i}.mlp.down").weight.detach().float().norm(dim=0)
        if mlp.gate_up is not None:
            gate_up = _plain_weight(mlp.gate_up, f"blocks.{i}.mlp.gate_up")
            in_norm = _row_norms(gate_up, slice(0, inner)) * _row_norms(gate_up, slice(inner, 2 * inner))
        else:
            in_norm = _row_norms(_plain_weight(mlp.up, f"blocks.{i}.mlp.up"), slice(None))
        scores.append(in_norm * out_norm)
    return torch.stack(scores)


def _keep_indices(kept: Sequence[Sequence[int]] | torch.Tensor, size: int, what: str, layers: int) -> list[list[int]]:
    kept = [sorted(int(j) for j in row) for row in kept]
    if len(kept) != layers:
        raise PruneError(f"give the {what} to keep for each of the {layers} layers, got {len(kept)} lists")
    for i, row in enumerate(kept):
        if len(set(row)) != len(row) or any(not 0 <= j < size for j in row):
            raise PruneError(f"layer {i}: {what} to keep must be distinct indices in 0..{size - 1}, got {row}")
    if len({len(row) for row in kept}) != 1:
        raise PruneError(
            f"every layer must keep the same number of {what} (transformers' config has one size for all "
            f"layers); got {[len(row) for row in kept]}"
        )
    if not kept[0]:
        raise PruneError(f"every layer must keep at least one of its {what}")
    return kept


def _replace_config(model: Transformer, **changes) -> dict[str, tuple[int, int]]:
    before = model.config
    model.config = dataclasses.replace(before, **changes)
    return {name: (getattr(before, name), value) for name, value in changes.items() if getattr(before, name) != value}


@torch.no_grad()
def remove_neurons(model: Transformer, kept: Sequence[Sequence[int]]) -> dict[str, tuple[int, int]]:
    """Keep only neurons `kept[i]` of layer i's MLP (the same count in every layer): the rows
    of `up` / `gate_up` and the columns of `down` of the others are removed, and
    `config.intermediate_size` follows. Returns the config change."""
    _dense_blocks(model, "neurons")
    inner = model.config.intermediate_size
    kept = _keep_indices(kept, inner, "neurons", len(model.blocks))
    for i, (block, row) in enumerate(zip(model.blocks, kept)):
        mlp: MLP = block.mlp
        index = torch.tensor(row, device=mlp.down.weight.device)
        if mlp.gate_up is not None:
            gate_up = _plain_weight(mlp.gate_up, f"blocks.{i}.mlp.gate_up")
            mlp.gate_up = _sliced_linear(gate_up, rows=torch.cat((index, index + inner)))
        else:
            mlp.up = _sliced_linear(_plain_weight(mlp.up, f"blocks.{i}.mlp.up"), rows=index)
        mlp.down = _sliced_linear(_plain_weight(mlp.down, f"blocks.{i}.mlp.down"), columns=index)
    return _replace_config(model, intermediate_size=len(kept[0]))


def prune_neurons(model: Transformer, sparsity: float, importance: torch.Tensor | None = None) -> PruneResult:
    """Remove round(sparsity × intermediate_size) MLP neurons from every layer, the least
    important of each layer (`neuron_importance` unless `importance` is given)."""
    sparsity = _check_sparsity(sparsity)
    _dense_blocks(model, "neurons")
    inner = model.config.intermediate_size
    count = _count_to_prune(sparsity, inner)
    if count >= inner:
        raise PruneError(f"sparsity {sparsity} would remove all {inner} neurons of each layer; use a smaller one")
    if sparsity > 0 and count == 0:
        raise PruneError(
            f"sparsity {sparsity} rounds to 0 of the {inner} neurons of each layer, so nothing would be removed; "
            f"use a sparsity above {0.5 / inner:g}"
        )
    scores = neuron_importance(model) if importance is None else importance
    if tuple(scores.shape) != (len(model.blocks), inner):
        raise PruneError(f"importance must have shape (layers, intermediate_size) = {(len(model.blocks), inner)}")
    before = _parameter_count(model)
    kept = [row.topk(inner - count).indices.tolist() for row in scores]
    changes = remove_neurons(model, kept)
    removed = {f"blocks.{i}.mlp": count for i in range(len(model.blocks))}
    return PruneResult(
        "neurons",
        sparsity,
        before,
        _parameter_count(model),
        weight_sparsity(model),
        list(removed),
        removed,
        changes,
    )


# ------------------------------------------------------------------------ removing heads
def calibration_rows(ids: Sequence[int] | torch.Tensor, seq_len: int, samples: int) -> torch.Tensor:
    """Up to `samples` non-overlapping rows of `seq_len` tokens from `ids`, (rows, seq_len)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if seq_len < 2 or samples < 1:
        raise PruneError(f"calibration needs seq_len >= 2 and samples >= 1, got seq_len={seq_len}, samples={samples}")
    rows = min(samples, ids.numel() // seq_len)
    if rows == 0:
        raise PruneError(
            f"the calibration text has {ids.numel()} tokens, fewer than one row of {seq_len}; give a longer text"
        )
    return ids[: rows * seq_len].view(rows, seq_len)


def _head_gate_hook(gates: list[torch.Tensor | None], layer: int, heads: int):
    def gate_heads(module, args):
        (x,) = args
        batch, seq, width = x.shape
        gated = x.view(batch, seq, heads, width // heads) * gates[layer][:, None, :, None].to(x.dtype)
        return (gated.view(batch, seq, width),)

    return gate_heads


def head_importance(
    model: Transformer, rows: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 8
) -> torch.Tensor:
    """(num_layers, num_heads) head importance of Michel et al. 2019: E_x |∂L(x)/∂ξ_h|.

    Each head's output (before `attn.o`) is multiplied by a gate ξ = 1 of its own for each
    sequence; L(x) is a sequence's mean next-token loss. The gradient of each sequence's loss
    with respect to its gates is taken, and their absolute values are averaged over the
    sequences of `rows` ((n, seq_len) token ids, or an iterable of such batches).
    """
    if not isinstance(model, Transformer) or not model.config.causal or model.lm_head is None:
        raise PruneError("head importance uses the next-token loss: it needs a genforge causal language model")
    batches = rows.split(batch_size) if isinstance(rows, torch.Tensor) else rows
    config = model.config
    gates: list[torch.Tensor | None] = [None] * len(model.blocks)
    handles = [
        block.attn.o.register_forward_pre_hook(_head_gate_hook(gates, i, block.attn.num_heads))
        for i, block in enumerate(model.blocks)
    ]
    total = torch.zeros(len(model.blocks), config.num_heads, dtype=torch.float64)
    sequences = 0
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it will be used
    try:
        for batch in batches:
            batch = batch.to(model.device)
            if batch.dim() != 2 or batch.shape[1] < 2:
                raise PruneError(f"calibration batches are (rows, seq_len >= 2) token ids, got {tuple(batch.shape)}")
            for i in range(len(gates)):
                gates[i] = torch.ones(batch.shape[0], config.num_heads, device=model.device, requires_grad=True)
            logits = model(batch).logits[:, :-1].float()
            losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(dim=1)
            # Each sequence's loss depends only on its own gates, so one backward of the sum
            # gives every sequence's own gradient.
            grads = torch.autograd.grad(losses.sum(), gates)
            total += torch.stack([g.abs().sum(dim=0) for g in grads]).double().cpu()
            sequences += batch.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if sequences == 0:
        raise PruneError("head importance needs at least one calibration sequence")
    return (total / sequences).float()


def _check_head_family(model: Transformer) -> None:
    if not isinstance(model, Transformer):
        raise PruneError(f"structured pruning takes a genforge Transformer, got {type(model).__name__}")
    family = model.config.family
    if family not in _HEAD_DIM_FAMILIES:
        raise PruneError(
            f"a {family} config derives head_dim as hidden_size / heads, so a model with fewer heads could not be "
            f"exported; head pruning supports {', '.join(_HEAD_DIM_FAMILIES)}"
        )


@torch.no_grad()
def remove_heads(model: Transformer, kept: Sequence[Sequence[int]]) -> dict[str, tuple[int, int]]:
    """Keep only query heads `kept[i]` of layer i, with the key/value heads they use.

    Every layer must keep the same number of query heads, and every key/value group that keeps
    any of its query heads must keep the same number of them (see the module doc on GQA); groups
    left with none are removed with their key/value head. `config.num_heads` and
    `config.num_kv_heads` follow (head_dim stays). Returns the config change.
    """
    _check_head_family(model)
    config = model.config
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    group = heads // kv_heads
    kept = _keep_indices(kept, heads, "query heads", len(model.blocks))
    kept_groups = []
    for i, row in enumerate(kept):
        sizes: dict[int, int] = {}
        for h in row:
            sizes[h // group] = sizes.get(h // group, 0) + 1
        if len(set(sizes.values())) != 1:
            raise PruneError(
                f"layer {i}: the kept query heads {row} leave key/value groups of different sizes {sizes} "
                f"(groups of {group} query heads share a key/value head); keep the same number from every group "
                "kept, or remove whole groups"
            )
        kept_groups.append(sorted(sizes))
    if len({len(g) for g in kept_groups}) != 1:
        raise PruneError(
            f"every layer must keep the same number of key/value heads; got {[len(g) for g in kept_groups]}"
        )
    new_heads, hidden = len(kept[0]), config.hidden_size
    if config.family in _HEADS_DIVIDE_HIDDEN and hidden % new_heads:
        accepted = [n for n in range(1, heads) if hidden % n == 0]
        raise PruneError(
            f"transformers' {config.family} config needs hidden_size ({hidden}) to be a multiple of the number of "
            f"heads, so {new_heads} heads could not be exported; head counts it accepts below {heads}: "
            f"{', '.join(map(str, accepted))}"
        )
    for i, (block, row, groups) in enumerate(zip(model.blocks, kept, kept_groups)):
        attn: Attention = block.attn
        qkv = _plain_weight(attn.qkv, f"blocks.{i}.attn.qkv")
        o = _plain_weight(attn.o, f"blocks.{i}.attn.o")
        device = qkv.weight.device

        def channels(head_indices, offset):
            return [offset + h * dim + c for h in head_indices for c in range(dim)]

        rows = channels(row, 0) + channels(groups, heads * dim) + channels(groups, (heads + kv_heads) * dim)
        attn.qkv = _sliced_linear(qkv, rows=torch.tensor(rows, device=device))
        attn.o = _sliced_linear(o, columns=torch.tensor(channels(row, 0), device=device))
        attn.num_heads, attn.num_kv_heads = len(row), len(groups)
    return _replace_config(model, num_heads=len(kept[0]), num_kv_heads=len(kept_groups[0]))


def heads_to_remove(num_heads: int, num_kv_heads: int, sparsity: float, unit: str = "query") -> int:
    """How many query heads per layer a `sparsity` removes, rounded to what keeps groups even:
    unit="query": round(sparsity × group size) from every group (plain multi-head attention:
    round(sparsity × heads)); unit="group": round(sparsity × key/value heads) whole groups."""
    sparsity = _check_sparsity(sparsity)
    if unit not in HEAD_UNITS:
        raise PruneError(f"unit must be one of {', '.join(HEAD_UNITS)}, got {unit!r}")
    group = num_heads // num_kv_heads
    if unit == "group":
        return _count_to_prune(sparsity, num_kv_heads) * group
    if group == 1:
        return _count_to_prune(sparsity, num_heads)
    return _count_to_prune(sparsity, group) * num_kv_heads


def prune_heads(model: Transformer, count: int, importance: torch.Tensor, unit: str = "query") -> PruneResult:
    """Remove `count` query heads from every layer, the least important by `importance`
    ((num_layers, num_heads), e.g. `head_importance`).

    unit="query": `count` / num_kv_heads query heads from every key/value group (under
    multi-head attention, any `count` heads with their key/value heads); `count` must then be
    a multiple of num_kv_heads. unit="group": `count` / group_size whole groups, scored by the
    sum of their heads' importance; `count` must be a multiple of the group size.
    """
    _check_head_family(model)
    if unit not in HEAD_UNITS:
        raise PruneError(f"unit must be one of {', '.join(HEAD_UNITS)}, got {unit!r}")
    config = model.config
    heads, kv_heads = config.num_heads, config.num_kv_heads
    group = heads // kv_heads
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise PruneError(f"count (query heads to remove per layer) must be an integer >= 0, got {count!r}")
    if count >= heads:
        raise PruneError(f"removing {count} of the {heads} heads of each layer leaves none; remove fewer")
    if tuple(importance.shape) != (len(model.blocks), heads):
        raise PruneError(f"importance must have shape (layers, heads) = {(len(model.blocks), heads)}")
    scores = importance.detach().float().cpu()
    before = _parameter_count(model)
    if unit == "group" or group == 1:
        if count % group:
            raise PruneError(
                f"removing whole key/value groups of {group} query heads: count must be a multiple of {group}, "
                f"got {count}"
            )
        drop_groups = count // group
        if drop_groups >= kv_heads:
            raise PruneError(f"removing {drop_groups} of {kv_heads} key/value groups leaves none")
        group_scores = scores.view(len(model.blocks), kv_heads, group).sum(dim=-1)
        kept_groups = [row.topk(kv_heads - drop_groups).indices.tolist() for row in group_scores]
        kept = [[g * group + j for g in groups for j in range(group)] for groups in kept_groups]
    else:
        per_group = count // kv_heads
        if count % kv_heads:
            accepted = ", ".join(str(kv_heads * k) for k in range(group))
            raise PruneError(
                f"removing {count} query heads per layer leaves the {kv_heads} key/value groups of {group} uneven: "
                f"every group must lose as many; accepted counts: {accepted} (or unit='group' to remove whole groups)"
            )
        if per_group >= group:
            raise PruneError(f"removing {per_group} of the {group} query heads of every group leaves none")
        kept = []
        for row in scores:
            by_group = row.view(kv_heads, group)
            kept.append(
                [g * group + int(j) for g in range(kv_heads) for j in by_group[g].topk(group - per_group).indices]
            )
    changes = remove_heads(model, kept)
    removed = {f"blocks.{i}.attn": count for i in range(len(model.blocks))}
    return PruneResult(
        f"heads-{unit}",
        count / heads,
        before,
        _parameter_count(model),
        weight_sparsity(model),
        list(removed),
        removed,
        changes,
    )


# ------------------------------------------------------------------------------ one entry
def prune_model(
    model: Transformer,
    method: str,
    sparsity: float | None = None,
    calibration: torch.Tensor | None = None,
    scope: str = "global",
    head_unit: str = "query",
) -> tuple[PruneResult, dict[str, torch.Tensor]]:
    """Prune `model` in place by `method` and return the result and the keep-masks (empty for
    structured methods, whose removed parts are gone).

    method: "magnitude" (`scope` "global" or "layer"), "N:M" such as "2:4" (the sparsity is
    1 - N/M by construction: pass none), "neurons" or "heads" (`calibration`: (rows, seq_len)
    token ids for `head_importance`; `sparsity` → `heads_to_remove`).
    """
    if method not in ("magnitude", "neurons", "heads") and ":" not in str(method):
        raise PruneError(f"method must be one of {', '.join(METHODS)} (or any N:M), got {method!r}")
    if ":" in str(method):
        if sparsity is not None:
            n, m = parse_n_m(method)
            raise PruneError(
                f"{method} pruning keeps {n} of every {m} weights (sparsity {1 - n / m:g}); give no sparsity"
            )
        return prune_n_m(model, *parse_n_m(method))
    if sparsity is None:
        raise PruneError(f"{method} pruning needs a sparsity in [0, 1)")
    if method == "magnitude":
        return prune_magnitude(model, sparsity, scope)
    if method == "neurons":
        return prune_neurons(model, sparsity), {}
    if calibration is None:
        raise PruneError(
            "head pruning scores heads by the loss gradient on calibration text: pass calibration rows "
            "(genforge prune takes --calibration FILE, default the standard library's source)"
        )
    _check_head_family(model)
    count = heads_to_remove(model.config.num_heads, model.config.num_kv_heads, sparsity, head_unit)
    if count >= model.config.num_heads:
        raise PruneError(f"sparsity {sparsity} would remove every head; use a smaller one")
    if sparsity > 0 and count == 0:
        config = model.config
        units = config.num_kv_heads if head_unit == "group" else config.num_heads // config.num_kv_heads
        what = "key/value groups" if head_unit == "group" else "query heads of each group"
        if config.num_heads == config.num_kv_heads and head_unit == "query":
            units, what = config.num_heads, "heads"
        raise PruneError(
            f"sparsity {sparsity} rounds to 0 of the {units} {what}, so nothing would be removed; "
            f"use a sparsity above {0.5 / units:g}"
        )
    return prune_heads(model, count, head_importance(model, calibration), head_unit), {}
