"""Tensor parallelism: every layer's matrices split across the processes of one group.

Megatron-LM (Shoeybi et al. 2019) splits a transformer block so that each of its two halves
needs one all-reduce forward and one backward: the first linear of attention (q/k/v) and of
the MLP (gate/up) is split by output columns ("column parallel"), so each rank computes its
own heads and its own slice of the intermediate activations with no communication, and the
second linear (attention's output projection, the MLP's down projection) is split by input
rows ("row parallel"), each rank producing a partial sum of the full output that one
all-reduce completes. Norms, embeddings and the residual stream stay whole on every rank.
The LM head of an untied model is split by vocabulary and its logits gathered.

genforge builds the plans with `torch.distributed.tensor.parallel` (`ColwiseParallel`,
`RowwiseParallel`, `SequenceParallel`) on a one-dimensional `DeviceMesh`, so the same code runs
on CPU with gloo and on CUDA with NCCL. Sequence parallelism (Korthikanti et al. 2022, optional)
also splits the residual stream and the blocks' norms by position between the linears.

Fused weights. `model.py` computes q, k and v in one `qkv` product whose rows are laid out
[q heads | k heads | v heads], and a gated MLP's gate and up in one `gate_up` product laid out
[gate | up]. A plain column split of such a weight would hand rank 0 all of q and part of k.
So before sharding, the rows are reordered so that each rank's contiguous share holds whole
heads of each part: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] and [gate_0 up_0 | gate_1 up_1 | ...].
Each rank's attention then runs with num_heads / degree query heads and num_kv_heads / degree
key/value heads (query head h of rank r still reads the key/value head of its own group), and
its MLP with intermediate_size / degree channels. `full_state_dict` and `full_gradients` undo
the reorder, so what they return has genforge's canonical layout and state-dict keys.

A sharded model's `config` describes the heads its rank holds (`local_config`), so a KV cache
built from it (`cache.make_kv_cache`) holds each rank's own heads; the whole model's config is
`model.tensor_parallel.full_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..model import MLP, Attention, MixtureOfExperts, Transformer
from ..seq2seq import refuse_encoder_decoder


class TensorParallelError(ValueError):
    """A tensor-parallel setting that cannot work for this model."""


@dataclass(frozen=True)
class TensorParallelLayout:
    """How a model was sharded: over `degree` ranks of `mesh`, from `full_config`."""

    degree: int
    full_config: Config
    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    vocab_parallel_head: bool  # the LM head split by vocabulary (untied models)
    sequence_parallel: bool = False  # the residual stream and the blocks' norms split by position


def accepted_degrees(config: Config) -> list[int]:
    """Every tensor-parallel degree that divides the query heads, the key/value heads and the
    intermediate size of `config`."""
    common = math.gcd(math.gcd(config.num_heads, config.num_kv_heads), config.intermediate_size)
    return [d for d in range(1, common + 1) if common % d == 0]


def check_tensor_parallel(config: Config, degree: int) -> None:
    """Refuse a degree that would split a head or an MLP channel group unevenly, naming the
    numbers that it does not divide and the degrees that do work."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise TensorParallelError(f"the tensor-parallel degree must be a positive integer, got {degree!r}")
    refuse_encoder_decoder(config, "tensor parallelism", "its plan splits one decoder stack's attention and MLP")
    not_divided = [
        f"{name} ({value})"
        for name, value in (
            ("num_heads", config.num_heads),
            ("num_kv_heads", config.num_kv_heads),
            ("intermediate_size", config.intermediate_size),
        )
        if value % degree
    ]
    if not_divided:
        raise TensorParallelError(
            f"tensor-parallel degree {degree} does not divide {', '.join(not_divided)} of this {config.family} model: "
            f"each rank must hold whole heads and an equal share of the MLP; accepted degrees: "
            f"{', '.join(map(str, accepted_degrees(config)))}"
        )


def local_config(config: Config, degree: int) -> Config:
    """`config` as one rank of `degree` sees it: its share of the query and key/value heads
    and of the MLP's intermediate size (head_dim and everything else unchanged)."""
    check_tensor_parallel(config, degree)
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // degree,
        num_kv_heads=config.num_kv_heads // degree,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size // degree,
    )


def fused_row_order(part_sizes: tuple[int, ...], degree: int) -> torch.Tensor:
    """The row permutation that turns a fused weight laid out [part_0 | part_1 | ...] into
    [rank 0's share of every part | rank 1's share | ...], each part split in `degree` equal,
    contiguous pieces. `fused_rows[order]` is the sharded layout; `argsort(order)` undoes it."""
    starts = [sum(part_sizes[:i]) for i in range(len(part_sizes))]
    order = []
    for rank in range(degree):
        for start, size in zip(starts, part_sizes):
            share = size // degree
            order.extend(range(start + rank * share, start + (rank + 1) * share))
    return torch.tensor(order, dtype=torch.long)


def _fused_layouts(model: Transformer, degree: int) -> dict[str, torch.Tensor]:
    """Parameter name -> row order, for every fused weight and bias of `model`."""
    config, hd = model.config, model.config.head_dim
    qkv = fused_row_order((config.num_heads * hd, config.num_kv_heads * hd, config.num_kv_heads * hd), degree)
    gate_up = fused_row_order((config.intermediate_size, config.intermediate_size), degree)
    orders = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            for kind in ("weight", "bias"):
                if getattr(module.qkv, kind, None) is not None:
                    orders[f"{name}.qkv.{kind}"] = qkv
        elif isinstance(module, MLP) and module.gate_up is not None:
            for kind in ("weight", "bias"):
                if getattr(module.gate_up, kind, None) is not None:
                    orders[f"{name}.gate_up.{kind}"] = gate_up
    return orders


def _check_plain_linears(model: Transformer) -> None:
    for name, module in model.named_modules():
        if isinstance(module, Attention | MLP):
            for child_name, child in module.named_children():
                if child_name in ("qkv", "o", "gate_up", "up", "down") and type(child) is not nn.Linear:
                    raise TensorParallelError(
                        f"{name}.{child_name} is a {type(child).__name__}, not a plain nn.Linear: tensor parallelism "
                        "splits floating-point weights; shard the model before packing, quantizing or wrapping "
                        "it with adapters (merge LoRA/DoRA/IA3 first)"
                    )


def tensor_parallel_mesh(degree: int | None = None, device: str | torch.device = "cpu"):
    """A one-dimensional DeviceMesh over the `degree` ranks (default: the whole world) of the
    process group this process has joined (`distributed.init_distributed`)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise TensorParallelError(
            "tensor parallelism runs one process per shard: launch with torchrun (torchrun --nproc-per-node N ...) "
            "and join the process group first (genforge.train.distributed.init_distributed)"
        )
    world = dist.get_world_size()
    degree = world if degree is None else degree
    if degree != world:
        raise TensorParallelError(
            f"tensor-parallel degree {degree} must equal the number of processes ({world}); genforge does not "
            "combine tensor with data parallelism in one job"
        )
    return init_device_mesh(torch.device(device).type, (degree,), mesh_dim_names=("tp",))


def parallelize_transformer(model: Transformer, mesh=None, sequence_parallel: bool = False) -> Transformer:
    """Shard `model` in place over the ranks of `mesh` (default: every process of the job);
    every rank must hold the same weights beforehand (build with the same seed, or load the
    same checkpoint). Returns the model, whose `config` is now the rank's `local_config` and
    whose `tensor_parallel` attribute is the `TensorParallelLayout`.

    sequence_parallel (Korthikanti et al. 2022): between the blocks' linears, the residual
    stream and the blocks' norms are split by sequence position instead of repeated on every
    rank, so each rank stores 1/degree of those activations. The row-parallel linears then end
    in a reduce-scatter instead of an all-reduce and the column-parallel ones start with an
    all-gather: the same bytes moved. For training (a decode step's one position does not
    split), and not with mixture-of-experts layers, whose router sees all tokens at once.

    The degree is checked against the heads and intermediate size before anything changes.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    if getattr(model, "tensor_parallel", None) is not None:
        raise TensorParallelError("this model is already sharded for tensor parallelism")
    if sequence_parallel and model.config.num_experts:
        raise TensorParallelError(
            "sequence parallelism splits the tokens between the blocks' linears; a mixture-of-experts router "
            "needs them all: leave sequence_parallel off for this model"
        )
    if mesh is None:
        mesh = tensor_parallel_mesh(device=model.device)
    degree = mesh.size()
    full_config = model.config
    check_tensor_parallel(full_config, degree)
    _check_plain_linears(model)
    # Column-parallel linears take the rank's sequence share and gather it; row-parallel ones
    # reduce-scatter their partial sums back into sequence shares.
    if sequence_parallel:
        column = lambda: ColwiseParallel(input_layouts=Shard(1))  # noqa: E731
        row = lambda: RowwiseParallel(output_layouts=Shard(1), use_local_output=False)  # noqa: E731
    else:
        column, row = ColwiseParallel, RowwiseParallel

    with torch.no_grad():
        for name, order in _fused_layouts(model, degree).items():
            parameter = model.get_parameter(name)
            parameter.copy_(parameter[order.to(parameter.device)])

    heads, kv_heads = full_config.num_heads // degree, full_config.num_kv_heads // degree
    for block in model.blocks:
        parallelize_module(block.attn, mesh, {"qkv": column(), "o": row()})
        block.attn.num_heads, block.attn.num_kv_heads = heads, kv_heads
        mlps = block.mlp.experts if isinstance(block.mlp, MixtureOfExperts) else [block.mlp]
        for mlp in mlps:
            first = "gate_up" if mlp.gate_up is not None else "up"
            parallelize_module(mlp, mesh, {first: column(), "down": row()})
        if sequence_parallel:
            parallelize_module(block, mesh, {"attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel()})
            for norm in (block.attn_norm, block.mlp_norm):
                for parameter in norm.parameters():
                    _replicate_gradient(parameter, mesh)
        if block.attn.q_norm is not None:
            # Each rank normalises only its own heads with the shared q/k norm weights, so
            # their gradients are partial sums that must be added over the ranks.
            for norm in (block.attn.q_norm, block.attn.k_norm):
                _sum_gradient_over(norm.weight, mesh)

    # The vocabulary projection is the largest matmul of a small model: split it by vocabulary
    # rows and gather the logits. A tied head shares its weight with the embedding table, which
    # stays whole, so it stays whole too (as does a vocabulary the degree does not divide).
    vocab_parallel = (
        model.lm_head is not None
        and not full_config.tie_word_embeddings
        and model.lm_transform is None
        and full_config.vocab_size % degree == 0
    )
    if vocab_parallel:
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})

    if sequence_parallel:
        _split_sequence_around_blocks(model, mesh)

    model.config = local_config(full_config, degree)
    model.tensor_parallel = TensorParallelLayout(degree, full_config, mesh, vocab_parallel, sequence_parallel)
    return model


def _split_sequence_around_blocks(model: Transformer, mesh) -> None:
    """The embeddings' output (whole on every rank) enters the first block as this rank's
    share of the positions; the last block's output is gathered whole again for the final norm
    and the head. Backward, the gradients take the opposite collectives."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def split(module, args):
        hidden = DTensor.from_local(args[0], mesh, [Replicate()], run_check=False)
        return (hidden.redistribute(mesh, [Shard(1)]), *args[1:])

    def gather(module, args, output):
        return output.redistribute(mesh, [Replicate()]).to_local()

    model.blocks[0].register_forward_pre_hook(split)
    model.blocks[-1].register_forward_hook(gather)


def _replicate_gradient(parameter: nn.Parameter, mesh) -> None:
    """A norm weight applied to each rank's share of the positions gets a partial gradient
    from each rank; sum it once here, so the optimizer and the clipping see whole gradients."""
    from torch.distributed.tensor import DTensor, Replicate

    def whole(grad):
        return grad.redistribute(mesh, [Replicate()]) if isinstance(grad, DTensor) else grad

    parameter.register_hook(whole)


def _sum_gradient_over(parameter: nn.Parameter, mesh) -> None:
    import torch.distributed._functional_collectives as funcol

    parameter.register_hook(lambda grad: funcol.all_reduce(grad, "sum", mesh).wait())


def _layout(model: Transformer) -> TensorParallelLayout:
    layout = getattr(model, "tensor_parallel", None)
    if layout is None:
        raise TensorParallelError("this model is not sharded; call parallelize_transformer first")
    return layout


def _canonical(model: Transformer, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors (DTensors gathered) with the fused rows back in genforge's layout."""
    from torch.distributed.tensor import DTensor

    layout = _layout(model)
    # The row orders depend on the whole model's head counts, not the rank's.
    local = model.config
    model.config = layout.full_config
    try:
        orders = _fused_layouts(model, layout.degree)
    finally:
        model.config = local
    out = {}
    for name, tensor in tensors.items():
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if name in orders:
            whole = whole[torch.argsort(orders[name]).to(whole.device)]
        out[name] = whole.detach()
    return out


def full_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The whole model's weights under genforge's state-dict keys and layout, on every rank
    (a collective: every rank of the mesh must call it). Load it into an unsharded
    `Transformer(model.tensor_parallel.full_config)` or save it with `checkpoint.save_model`."""
    return _canonical(model, dict(model.state_dict()))


def full_gradients(model: Transformer) -> dict[str, torch.Tensor]:
    """Each parameter's whole gradient, named and laid out as `full_state_dict` (a collective)."""
    return _canonical(model, {name: p.grad for name, p in model.named_parameters() if p.grad is not None})


def clip_gradients(model: Transformer, max_norm: float | None) -> float:
    """Clip a sharded model's global gradient norm to `max_norm` (None: measure only), as
    `optim.clip_gradients` does for a whole one; returns the norm before clipping, the same on
    every rank. A sharded gradient's squared norm is summed over the ranks, a replicated one
    (norms, embeddings) counted once."""
    from torch.distributed.tensor import DTensor

    layout = _layout(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sharded = [isinstance(g, DTensor) and any(p.is_shard() for p in g.placements) for g in grads]
    device = locals_[0].device
    squares = torch.zeros(2, dtype=torch.float32, device=device)
    for local, is_sharded in zip(locals_, sharded):
        squares[0 if is_sharded else 1] += local.float().square().sum()
    split = squares[:1].clone()
    dist.all_reduce(split, group=layout.mesh.get_group())
    norm = torch.sqrt(split[0] + squares[1])
    if max_norm is not None:
        # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6), never up.
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for local in locals_:
            local.mul_(scale.to(local.dtype))
    return float(norm)


def unsharded_copy(model: Transformer) -> Transformer:
    """A plain single-process `Transformer` with the sharded model's whole weights (a
    collective), for saving or for comparing against."""
    layout = _layout(model)
    state = full_state_dict(model)
    copy = Transformer(layout.full_config).to(device=model.device, dtype=model.dtype)
    copy.load_state_dict(state)
    return copy


def load_tensor_parallel(
    directory,
    dtype=None,
    device: str | torch.device = "cpu",
    adapter=None,
    context_limit: int | None = None,
):
    """`loading.load_for_inference` for one rank of a sharded decode under torchrun: the
    model loaded whole (adapters merged), put in eval mode and sharded over every process of
    the job by `parallelize_transformer`; not packed for the CPU, whose packed linears would
    not split. Decoding then runs as usual on every rank with the same prompts: each rank's
    KV cache holds its own heads, the logits are whole on every rank, and every rank picks the
    same tokens. Join the process group first (`distributed.init_distributed`)."""
    from ..checkpoint import read_config
    from ..loading import load_for_inference

    if dist.is_available() and dist.is_initialized():  # the degree is checked before the weights load
        check_tensor_parallel(read_config(directory), dist.get_world_size())
    loaded = load_for_inference(
        directory, dtype=dtype, device=device, adapter=adapter, pack=False, context_limit=context_limit
    )
    parallelize_transformer(loaded.model.eval())
    return loaded


def run_tensor_parallel(work, device: str = "cpu"):
    """Run `work(device)` as one rank of a torchrun job (joining and leaving the process group
    around it), with standard output and error kept to rank 0 so the job prints once.
    `device` is the one asked for; each rank gets its own ("cuda:<local rank>" on CUDA)."""
    import contextlib
    import io

    from .distributed import destroy_distributed, init_distributed, launched_by_torchrun

    if not launched_by_torchrun():
        raise TensorParallelError(
            "tensor parallelism runs one process per shard: launch with torchrun, e.g. "
            "torchrun --nproc-per-node 2 -m genforge.cli generate --tensor-parallel ..."
        )
    context, rank_device = init_distributed(device)
    try:
        if context.is_main:
            return work(rank_device)
        # Progress and notes too: an error still surfaces, printed after the context ends.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return work(rank_device)
    finally:
        destroy_distributed()


__all__ = [
    "TensorParallelError",
    "TensorParallelLayout",
    "accepted_degrees",
    "check_tensor_parallel",
    "clip_gradients",
    "full_gradients",
    "full_state_dict",
    "fused_row_order",
    "load_tensor_parallel",
    "local_config",
    "parallelize_transformer",
    "run_tensor_parallel",
    "tensor_parallel_mesh",
    "unsharded_copy",
]
