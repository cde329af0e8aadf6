"""Optimiser, learning-rate schedule and parameter groups for training.

AdamW (Loshchilov & Hutter 2019, decoupled weight decay) over two parameter groups, and a
linear-warmup-then-cosine-decay schedule (Goyal et al. 2017 for warmup; Loshchilov & Hutter
2017, SGDR, for the cosine). Gradient clipping by global norm (Pascanu et al. 2013) and
gradient accumulation live in the trainer's step; `clip_gradients` is the shared helper.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn


def split_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases and embeddings do not.

    Decay on a norm gain or a bias pulls it towards zero, which is not a simpler model but
    a different one, and decaying embedding rows punishes rare tokens that get few updates.
    A tied LM head shares the embedding's tensor and is counted once (as the embedding).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for _, param in model.named_parameters():  # named_parameters de-duplicates tied tensors
        if not param.requires_grad:
            continue
        if param.dim() < 2 or id(param) in no_decay_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `split_parameter_groups(model, weight_decay)`.

    The update runs as one fused kernel over all parameters where torch has one (CPU and
    CUDA tensors): a per-tensor Python loop costs more than the arithmetic on models with many
    small tensors. The fused kernel is deterministic, so resume stays bit-exact. Sharded
    (FSDP) parameters take the multi-tensor `foreach` path instead.
    """
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    groups = split_parameter_groups(model, weight_decay)
    params = [p for group in groups for p in group["params"]]
    fusable = bool(params) and all(
        p.device.type in ("cpu", "cuda") and not _is_sharded(p) and p.is_floating_point() for p in params
    )
    if fusable:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def warmup_cosine_lr(
    step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup from 0 to `peak_lr` over
    `warmup_steps`, then cosine decay to `min_lr_ratio * peak_lr` at `total_steps`, flat after.

    With `min_lr_ratio=0` this is the same curve as transformers'
    `get_cosine_schedule_with_warmup` (half a cosine period).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def _lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    return warmup_cosine_lr(step, 1.0, warmup_steps, total_steps, min_lr_ratio)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is `warmup_cosine_lr(step, 1.0, ...)`; its state dict is resumable."""
    warmup_cosine_lr(0, 1.0, warmup_steps, total_steps, min_lr_ratio)  # validate before building
    factor = partial(_lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm to `max_norm` (None: measure only); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if any(_is_sharded(p) for p in params):
        # FSDP shards (DTensors): torch's clip reduces the shards' norms across ranks; an
        # infinite max_norm leaves the gradients as they are (a factor of exactly 1).
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm.full_tensor() if _is_sharded(norm) else norm)
    if max_norm is None:
        return float(torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=True))
    # foreach: one multi-tensor norm and one multi-tensor scale, not a Python loop per tensor.
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))


def _is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")  # a DTensor, as FSDP2 makes parameters and their norms


__all__ = ["split_parameter_groups", "build_optimizer", "warmup_cosine_lr", "build_scheduler", "clip_gradients"]
