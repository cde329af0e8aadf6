"""Alignment objectives as functions of log-probabilities.

Each function takes per-sequence (or, for GRPO, per-token) log-probabilities of the policy and,
where the method has one, of a frozen reference model, and returns tensors: no model, no data
loading, no optimiser. The trainers compute the log-probabilities (`align.logprobs`) and call
these. Papers:

- DPO, direct preference optimisation (Rafailov et al. 2023): the policy's implicit reward
  beta * log(pi / pi_ref) is fitted to preferences with a Bradley-Terry likelihood. Its
  conservative variant (cDPO, Mitchell 2023) assumes a fraction of the labels is flipped.
- IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences"): a squared loss that drives the log-ratio margin to a fixed target.
- Hinge (SLiC, Zhao et al. 2023), robust DPO (Chowdhury et al. 2024, an unbiased loss under
  label noise).
- KTO (Ethayarajh et al. 2024): unpaired desirable / undesirable completions, scored against
  a reference point, the batch's estimate of KL(policy || reference).
- ORPO (Hong et al. 2024): no reference model; an odds-ratio penalty added to the SFT loss.
- SimPO (Meng et al. 2024): no reference model; the length-normalised log-probability is the
  reward and a target margin gamma separates chosen from rejected.
- GRPO (Shao et al. 2024, DeepSeekMath): PPO's clipped surrogate (Schulman et al. 2017) with
  group-normalised advantages, a k3 estimate of KL to the reference (Schulman 2020), and the
  loss aggregations of DAPO (Yu et al. 2025) and Dr. GRPO (Liu et al. 2025).
- The reward-model loss: Bradley-Terry (1952) on scalar rewards (Ouyang et al. 2022), with
  the margin of Llama 2 (Touvron et al. 2023) and reward centring (Eisenstein et al. 2023).

Every function is checked against TRL's implementation on the same tensors
(tests/test_align_losses.py); docs/alignment.md gives each formula and when to use it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


class PreferenceLoss(NamedTuple):
    """losses: (batch,) one loss per example (the training loss is their mean);
    chosen_rewards, rejected_rewards: the implicit rewards, detached, for logging (margins and
    accuracies). KTO's are those of its desirable and undesirable examples."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class GRPOLoss(NamedTuple):
    """loss: the scalar to minimise; per_token_loss (batch, completion): before aggregation,
    zero where the mask is 0; per_token_kl: the k3 KL estimate per token (None when beta is 0);
    clipped_fraction: the share of completion tokens whose ratio the clip held back."""

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    per_token_kl: torch.Tensor | None
    clipped_fraction: torch.Tensor


# ----------------------------------------------------------------------------- DPO family
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """DPO and its pairwise relatives, from summed completion log-probabilities (batch,).

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), the margin of
    log-ratios between the chosen y_w and the rejected y_l:

    - "sigmoid" (DPO): -log sigmoid(beta h); with label_smoothing e > 0 it is conservative
      DPO: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
    - "hinge": max(0, 1 - beta h).
    - "ipo": (h' - 1 / (2 beta))^2 where h' uses per-token averages of each log-ratio, so
      `chosen_lengths` and `rejected_lengths` (completion token counts) are required.
    - "robust": (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e), with e the
      assumed flip rate (label_smoothing).

    Rewards are beta times each completion's log-ratio.
    """
    _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    _check_beta(beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; accepted: {', '.join(DPO_LOSS_TYPES)}")
    _check_label_smoothing(label_smoothing, loss_type, uses_it=loss_type in ("sigmoid", "robust"))
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    scaled_margin = beta * (chosen_logratios - rejected_logratios)
    smoothing = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - smoothing) * F.logsigmoid(scaled_margin)
        if smoothing:
            losses = losses - smoothing * F.logsigmoid(-scaled_margin)
    elif loss_type == "hinge":
        losses = torch.relu(1 - scaled_margin)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                "the ipo loss averages each log-ratio over its completion's tokens: pass chosen_lengths and "
                "rejected_lengths (completion token counts, e.g. CompletionLogProbs.count)"
            )
        _check_pairs(policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths)
        _check_pairs(policy_chosen_logps=policy_chosen_logps, rejected_lengths=rejected_lengths)
        per_token_margin = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(
            min=1
        )
        losses = (per_token_margin - 1 / (2 * beta)) ** 2
    else:  # robust
        losses = (-(1 - smoothing) * F.logsigmoid(scaled_margin) + smoothing * F.logsigmoid(-scaled_margin)) / (
            1 - 2 * smoothing
        )
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def kto_reference_point(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch mean of log pi(y'|x) - log pi_ref(y'|x) over
    completions y' paired with prompts x they do not answer (a cheap estimate of
    KL(pi || pi_ref)), clamped at 0 and detached, so no gradient flows through it."""
    _check_pairs(policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor | None,
    reference_kl_logps: torch.Tensor | None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO on unpaired examples (batch,): `desirable` (bool) marks the good completions.

    With r = log pi(y|x) - log pi_ref(y|x) and z0 = `kto_reference_point` of the mismatched
    pairs' log-probabilities (None for both: z0 = 0):
    desirable: w_d (1 - sigmoid(beta (r - z0))); undesirable: w_u (1 - sigmoid(beta (z0 - r))).
    Losses come back in the input order; chosen_rewards / rejected_rewards are beta r of the
    desirable / undesirable examples.
    """
    _check_pairs(policy_logps=policy_logps, reference_logps=reference_logps)
    _check_beta(beta)
    if desirable.shape != policy_logps.shape or desirable.dtype != torch.bool:
        raise ValueError(
            f"desirable must be a bool tensor of shape {tuple(policy_logps.shape)} (one label per example), "
            f"got {desirable.dtype} {tuple(desirable.shape)}"
        )
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not weight > 0:
            raise ValueError(f"{name} must be > 0, got {weight}")
    if (policy_kl_logps is None) != (reference_kl_logps is None):
        raise ValueError("pass both policy_kl_logps and reference_kl_logps (or neither, for a reference point of 0)")
    if policy_kl_logps is None:
        reference_point = policy_logps.new_zeros(())
    else:
        reference_point = kto_reference_point(policy_kl_logps, reference_kl_logps)
    logratios = policy_logps - reference_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - reference_point)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * logratios.detach()
    return PreferenceLoss(losses, rewards[desirable], rewards[~desirable])


def orpo_loss(
    policy_chosen_mean_logps: torch.Tensor,
    policy_rejected_mean_logps: torch.Tensor,
    beta: float = 0.1,
    chosen_nll: torch.Tensor | float | None = None,
) -> PreferenceLoss:
    """ORPO from per-token average log-probabilities (batch,), no reference model.

    odds(y) = p / (1 - p) with p = exp(mean log-prob); the loss per example is
    chosen_nll - beta log sigmoid(log odds(y_w) - log odds(y_l)). `chosen_nll` is the SFT
    term (the chosen completions' negative log-likelihood, a scalar or (batch,)); None leaves
    the odds-ratio term alone. Rewards are beta times the mean log-probabilities.
    """
    _check_pairs(
        policy_chosen_mean_logps=policy_chosen_mean_logps, policy_rejected_mean_logps=policy_rejected_mean_logps
    )
    _check_beta(beta)
    for name, logps in (
        ("policy_chosen_mean_logps", policy_chosen_mean_logps),
        ("policy_rejected_mean_logps", policy_rejected_mean_logps),
    ):
        if bool((logps >= 0).any()):
            raise ValueError(
                f"{name} must be < 0 (an average log-probability); the odds p / (1 - p) are infinite at p = 1"
            )
    chosen, rejected = policy_chosen_mean_logps.float(), policy_rejected_mean_logps.float()
    log_odds_ratio = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds_ratio)
    if chosen_nll is not None:
        losses = losses + chosen_nll
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log1p(-exp(x)) where
    exp(x) is small, log(-expm1(x)) where x is near 0."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def simpo_loss(
    policy_chosen_mean_logps: torch.Tensor,
    policy_rejected_mean_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO from per-token average log-probabilities (batch,), no reference model:
    -log sigmoid(beta (mean log pi(y_w) - mean log pi(y_l)) - gamma), label-smoothed as
    conservative DPO is when label_smoothing > 0. Rewards are beta times the averages."""
    _check_pairs(
        policy_chosen_mean_logps=policy_chosen_mean_logps, policy_rejected_mean_logps=policy_rejected_mean_logps
    )
    _check_beta(beta)
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma (the target reward margin) must be >= 0, got {gamma}")
    _check_label_smoothing(label_smoothing, "simpo", uses_it=True)
    logits = beta * (policy_chosen_mean_logps - policy_rejected_mean_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLoss(losses, beta * policy_chosen_mean_logps.detach(), beta * policy_rejected_mean_logps.detach())


# ----------------------------------------------------------------------------------- GRPO
def grpo_loss(
    per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    reference_per_token_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items: int | torch.Tensor | None = None,
    delta: float | None = None,
) -> GRPOLoss:
    """The GRPO policy loss over completion tokens (batch, completion).

    ratio = exp(log pi - log pi_old) per token (`old_per_token_logps` None: the samples came
    from this very policy, so the ratio is 1 but its gradient is not); A the advantage
    (batch,) or (batch, completion). Per token:
    -min(ratio A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) A) + beta KL, where
    KL = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator: unbiased, always >= 0) and
    `delta`, when set, also caps the unclipped ratio from above (two-sided clipping).
    Aggregation, `loss_type`:

    - "grpo": the mean over each sequence's tokens, then over sequences (short sequences
      weigh more per token);
    - "bnpo": the mean over all completion tokens of the batch;
    - "dapo": the token sum divided by `num_items`, the completion tokens of the whole
      generation batch (default: this batch's), so micro-batches of one step weigh by tokens;
    - "dr_grpo": the token sum divided by batch x `max_completion_length` (default: the
      completion width), free of any length normalisation.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; accepted: {', '.join(GRPO_LOSS_TYPES)}")
    if per_token_logps.dim() != 2:
        raise ValueError(f"per_token_logps must be (batch, completion), got shape {tuple(per_token_logps.shape)}")
    shape = tuple(per_token_logps.shape)
    for name, tensor in (
        ("completion_mask", completion_mask),
        ("old_per_token_logps", old_per_token_logps),
        ("reference_per_token_logps", reference_per_token_logps),
    ):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected per_token_logps' {shape}")
    if advantages.shape not in ((shape[0],), shape):
        raise ValueError(f"advantages must be ({shape[0]},) or {shape}, got shape {tuple(advantages.shape)}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta (the KL coefficient) must be >= 0, got {beta}")
    if beta > 0 and reference_per_token_logps is None:
        raise ValueError("beta > 0 adds a KL penalty to the reference: pass reference_per_token_logps")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if not 0 <= epsilon_low < 1 or not epsilon_high >= 0:
        raise ValueError(f"epsilon_low must be in [0, 1) and epsilon_high >= 0, got {epsilon_low} and {epsilon_high}")
    if delta is not None and not delta > 1 + epsilon_high:
        raise ValueError(f"delta caps the ratio above 1 + epsilon_high = {1 + epsilon_high}; got {delta}")

    mask = completion_mask.to(per_token_logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    ratio = torch.exp(per_token_logps - old_per_token_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    per_token_kl = None
    if beta > 0:
        log_ref_ratio = reference_per_token_logps - per_token_logps
        per_token_kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = per_token_loss * mask

    tokens = mask.sum()
    if loss_type == "grpo":
        loss = (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = per_token_loss.sum() / tokens.clamp(min=1)
    elif loss_type == "dapo":
        normaliser = tokens if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype)
        loss = per_token_loss.sum() / normaliser.clamp(min=1)
    else:  # dr_grpo
        width = shape[1] if max_completion_length is None else max_completion_length
        if width < shape[1]:
            raise ValueError(f"max_completion_length {width} is shorter than the completions' width {shape[1]}")
        loss = per_token_loss.sum() / (shape[0] * width)
    clipped_fraction = (clipped.to(mask.dtype) * mask).sum() / tokens.clamp(min=1)
    return GRPOLoss(loss, per_token_loss, per_token_kl, clipped_fraction.detach())


# ---------------------------------------------------------------------------- reward model
def reward_model_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> PreferenceLoss:
    """Bradley-Terry loss of a scalar reward model (batch,):
    -log sigmoid(r_w - r_l - margin) + c (r_w + r_l)^2. The margin (a number or (batch,))
    asks for a wider gap where raters were surer; the centring term c keeps rewards near 0,
    since the Bradley-Terry likelihood does not see a constant shift."""
    _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.dim() and margin.shape != chosen_rewards.shape:
            raise ValueError(
                f"margin must be a number or one per pair {tuple(chosen_rewards.shape)}, got {tuple(margin.shape)}"
            )
        difference = difference - margin
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient is not None:
        if not center_rewards_coefficient >= 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return PreferenceLoss(losses, chosen_rewards.detach(), rejected_rewards.detach())


# -------------------------------------------------------------------------------- checks
def _check_pairs(**tensors: torch.Tensor) -> None:
    """All the named tensors are floating-point (or count) vectors of one shape (batch,)."""
    shapes = {name: tuple(t.shape) if isinstance(t, torch.Tensor) else None for name, t in tensors.items()}
    for name, shape in shapes.items():
        if shape is None:
            raise ValueError(f"{name} must be a tensor of shape (batch,), got {type(tensors[name]).__name__}")
        if len(shape) != 1:
            raise ValueError(f"{name} must have shape (batch,), one value per example; got {shape}")
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shapes differ: {listed}; each holds one value per example of the same batch")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_label_smoothing(label_smoothing: float, loss_type: str, uses_it: bool) -> None:
    if not uses_it and label_smoothing:
        raise ValueError(f"label_smoothing applies to the sigmoid, robust and simpo losses, not to {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing (the assumed share of flipped labels) must be in [0, 0.5), got {label_smoothing}"
        )
