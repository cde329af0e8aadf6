"""Training objectives as functions of tensors.

The causal language-model objective (next-token cross-entropy; Radford et al. 2018) with
optional label smoothing (Szegedy et al. 2016); the masked language-model objective of BERT
(Devlin et al. 2019): `mask_tokens` corrupts a batch with the 80/10/10 rule and
`masked_lm_loss` scores the model's guesses at the chosen positions; and the
mixture-of-experts load-balancing auxiliary term (Fedus et al. 2021) from
`genforge.model.load_balancing_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    # Shift the labels, not the logits: position t is scored against label t+1 and the last
    # position against nothing (ignore_index), so the (batch x seq x vocab) logits are used as
    # they are instead of being copied into a shifted contiguous tensor (and back in backward).
    if labels.dim() == 2:
        labels = torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)), dim=1)
    return masked_lm_loss(logits, labels, ignore_index, label_smoothing, reduction)


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many positions `causal_lm_loss` counts for `labels` (after the shift)."""
    return int((labels[:, 1:] != ignore_index).sum())


def mask_tokens(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    special_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption (Devlin et al. 2019, section 3.1): `(inputs, labels)`.

    Each position that is not a special token is chosen with probability `mlm_probability`.
    A chosen position is replaced by `mask_token_id` with probability `mask_replace_prob`
    (80%), by a uniformly random id below `vocab_size` with probability `random_replace_prob`
    (10%), and left as it is otherwise (10%), so the model cannot tell which tokens to
    trust. `labels` hold the original id at chosen positions and IGNORE_INDEX elsewhere.
    The input is not modified. With the same `generator` state, the draws are made in the
    same order as transformers' `DataCollatorForLanguageModeling`, so the two agree exactly.
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (batch, seq) tensor of int64 ids, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if not (0.0 <= mask_replace_prob and 0.0 <= random_replace_prob and mask_replace_prob + random_replace_prob <= 1.0):
        raise ValueError(
            f"mask_replace_prob ({mask_replace_prob}) and random_replace_prob ({random_replace_prob}) must be >= 0 "
            "and sum to at most 1"
        )
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} must be a valid id below vocab_size {vocab_size}")
    labels = input_ids.clone()
    inputs = input_ids.clone()
    choose = torch.full(input_ids.shape, mlm_probability)
    if len(special_token_ids):
        choose.masked_fill_(torch.isin(input_ids, torch.as_tensor(list(special_token_ids), dtype=torch.long)), 0.0)
    chosen = torch.bernoulli(choose, generator=generator).bool()
    labels[~chosen] = IGNORE_INDEX
    to_mask = torch.bernoulli(torch.full(input_ids.shape, mask_replace_prob), generator=generator).bool() & chosen
    inputs[to_mask] = mask_token_id
    if mask_replace_prob == 1.0 or random_replace_prob == 0.0:
        return inputs, labels
    # Of the positions not turned into [MASK], this share becomes a random token.
    share = random_replace_prob / (1.0 - mask_replace_prob)
    to_random = torch.bernoulli(torch.full(input_ids.shape, share), generator=generator).bool() & chosen & ~to_mask
    random_ids = torch.randint(vocab_size, input_ids.shape, dtype=torch.long, generator=generator)
    inputs[to_random] = random_ids[to_random]
    return inputs, labels


def masked_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of each position's logits against its own label (no shift): the
    masked-LM loss, counted only where `labels != ignore_index` (the chosen positions)."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be (batch, seq, vocab) and labels (batch, seq) with the same batch and seq; "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction,
    )


def count_masked_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many positions `masked_lm_loss` counts for `labels`."""
    return int((labels != ignore_index).sum())


def moe_auxiliary_loss(output: ModelOutput, config) -> torch.Tensor | None:
    """The load-balancing loss of a mixture-of-experts model's routers, or None without experts."""
    if not config.num_experts or not output.router_logits:
        return None
    return load_balancing_loss(output.router_logits, config.num_experts, config.num_experts_per_token)


__all__ = [
    "IGNORE_INDEX", "causal_lm_loss", "count_masked_targets", "count_target_tokens", "mask_tokens", "masked_lm_loss",
    "moe_auxiliary_loss",
]
