"""Training objectives as functions of tensors.

The causal language-model objective (next-token cross-entropy; Radford et al. 2018) with
optional label smoothing (Szegedy et al. 2016), and the mixture-of-experts load-balancing
auxiliary term (Fedus et al. 2021) from `genforge.model.load_balancing_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import ModelOutput, load_balancing_loss

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of position t's logits against label t+1.

    `logits` (batch, seq, vocab) and `labels` (batch, seq) are aligned as the model sees
    them (labels are usually the input ids); the shift happens here, as in transformers'
    `labels=` convention. Labels equal to `ignore_index` (padding, prompt tokens) do not
    count. reduction "mean" averages over counted tokens; "sum" lets a caller weight
    micro-batches by their token counts.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be (batch, seq, vocab) and labels (batch, seq) with the same batch and seq; "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(
        shifted_logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many positions `causal_lm_loss` counts for `labels` (after the shift)."""
    return int((labels[:, 1:] != ignore_index).sum())


def moe_auxiliary_loss(output: ModelOutput, config) -> torch.Tensor | None:
    """The load-balancing loss of a mixture-of-experts model's routers, or None without experts."""
    if not config.num_experts or not output.router_logits:
        return None
    return load_balancing_loss(output.router_logits, config.num_experts, config.num_experts_per_token)


__all__ = ["IGNORE_INDEX", "causal_lm_loss", "count_target_tokens", "moe_auxiliary_loss"]
