"""Data-parallel training under `torchrun`: DDP by default, FSDP as an option.

Data parallelism (Li et al. 2020, "PyTorch Distributed") runs one process per device; every
process holds the model, takes its own slice of each global batch, and the gradients are
averaged across processes before each optimizer step, so all replicas stay identical.
Fully sharded data parallelism (ZeRO stage 3, Rajbhandari et al. 2020; PyTorch FSDP, Zhao et
al. 2023) also splits parameters, gradients and optimizer state across the processes and
gathers each layer's weights only while it runs.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process;
`init_distributed` reads them and joins the process group (gloo on CPU, NCCL on CUDA). A
single process without those variables gets a context of world size 1 and no process group,
so the same trainer code runs both ways.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(ValueError):
    """A distributed setting that cannot work as given."""


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is in the job: rank r of world_size, on local device local_rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files (checkpoints, metrics, plots, exports) and prints."""
        return self.rank == 0

    @classmethod
    def current(cls) -> DistributedContext:
        """The context of the process group this process has joined, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(
                rank=dist.get_rank(),
                world_size=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                backend=dist.get_backend(),
            )
        return cls()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "cpu") -> tuple[DistributedContext, str]:
    """Join the process group `torchrun` describes in the environment; returns the context
    and the device this rank should use ("cuda:<local_rank>" for a CUDA device, else as given).

    Without WORLD_SIZE > 1 nothing is initialised and the context is a single process.
    """
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise DistributedError(f"device {device!r} is not supported for training; accepted: cpu, cuda, cuda:N")
    if not launched_by_torchrun():
        return DistributedContext.current(), device
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; launch with torchrun "
            "(torchrun --nproc_per_node N -m genforge.cli pretrain ...), which sets them"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"rank with LOCAL_RANK={local_rank} needs CUDA device {local_rank}, but "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are visible; use at most that many "
                "processes per node, or --device cpu"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        # NCCL moves CUDA tensors between GPUs directly; gloo is the CPU backend.
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    return DistributedContext.current(), device


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(
    model: nn.Module, context: DistributedContext, fsdp: bool = False, cpu_offload: bool = False
) -> nn.Module:
    """The module the training step calls: `model` itself for one process, a
    DistributedDataParallel wrapper around it, or (fsdp=True) `model` sharded in place with
    FSDP2's `fully_shard`, one unit per transformer block plus the root.

    cpu_offload (FSDP only; ZeRO-Offload, Ren et al. 2021): each rank's shard of the
    parameters, their gradients and so the optimizer state live in host memory; a unit's
    parameters are copied to the device for its forward and backward only, the gradients
    copied back, and the optimizer step runs on the CPU. Device memory then holds little more
    than the activations and one unit's gathered weights, paid for with host-device copies
    and a CPU optimizer step."""
    if cpu_offload and not fsdp:
        raise DistributedError("cpu_offload moves FSDP's parameter shards to host memory; it needs fsdp=True")
    if not context.enabled:
        return model
    device = next(model.parameters()).device
    if fsdp:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        # pin_memory speeds up host-device copies; there are none to speed up on a CPU device.
        policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()

        # fully_shard shards whatever each rank holds; make every rank hold rank 0's weights
        # first, as DDP's constructor does.
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, src=0)
        for block in model.blocks:
            fully_shard(block, offload_policy=policy)
        fully_shard(model, offload_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers=False: the only buffers are RoPE frequency tables, identical on
    # every rank; broadcasting them each forward would be a wasted collective.
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )


def no_gradient_sync(engine: nn.Module, context: DistributedContext, fsdp: bool):
    """Skip the gradient all-reduce for a micro-batch that is not the last of its step
    (gradient accumulation): the gradients add up locally and are averaged once."""
    if not context.enabled:
        return contextlib.nullcontext()
    if fsdp:

        @contextlib.contextmanager
        def paused():
            engine.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                engine.set_requires_gradient_sync(True)

        return paused()
    return engine.no_sync()


def rank_slice(rows: int, context: DistributedContext) -> slice:
    """This rank's contiguous share of a global batch of `rows` sequences."""
    if rows % context.world_size:
        raise DistributedError(f"a batch of {rows} sequences does not split evenly over {context.world_size} processes")
    share = rows // context.world_size
    return slice(context.rank * share, (context.rank + 1) * share)


def all_reduce_sum(values: list[float], context: DistributedContext, device: torch.device) -> list[float]:
    """Sum each number over all ranks (float64, so the sum of per-rank losses is exact enough)."""
    if not context.enabled:
        return list(values)
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    tensor = torch.tensor(values, dtype=torch.float64, device=device if context.backend == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_object(value, context: DistributedContext):
    """Rank 0's `value` on every rank (e.g. whether a check on rank 0's files failed)."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = [
    "DistributedContext",
    "DistributedError",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "init_distributed",
    "launched_by_torchrun",
    "no_gradient_sync",
    "rank_slice",
    "wrap_model",
]
