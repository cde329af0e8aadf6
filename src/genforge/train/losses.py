"""Training objectives as functions of tensors.

The causal language-model objective (next-token cross-entropy; Radford et al. 2018) with
optional label smoothing (Szegedy et al. 2016); the masked language-model objective of BERT
(Devlin et al. 2019): `mask_tokens` corrupts a batch with the 80/10/10 rule and
`masked_lm_loss` scores the model's guesses at the chosen positions; and the
mixture-of-experts load-balancing auxiliary term (Fedus et al. 2021) from
`genforge.model.load_balancing_loss`.

`fused_linear_cross_entropy` applies the LM head and the cross-entropy together, a slice of
tokens at a time, so the (tokens x vocab) logits never exist whole (Wijmans et al. 2024, "Cut
Your Losses in Large-Vocabulary Language Models"; the fused linear cross-entropy of Liger-Kernel,
Hsu et al. 2024).

`distillation_loss` is knowledge distillation on soft targets (Hinton, Vinyals & Dean 2015,
"Distilling the Knowledge in a Neural Network"): a divergence between the teacher's and the
student's next-token distributions at a temperature, with the alternatives DistillSpec (Zhou et
al. 2024) compares for speculative-decoding drafts (reverse KL, total variation distance) and
the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..model import ModelOutput, load_balancing_loss, router_z_loss, switch_load_balancing_loss
from ..onednn import available as onednn_available
from ..onednn import matmul_nt

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
        labels = shift_labels(labels, ignore_index)
    return masked_lm_loss(logits, labels, ignore_index, label_smoothing, reduction)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(batch, seq) labels moved one place left, `ignore_index` in the last column: position t's
    target is label t+1, so the causal objective becomes a per-position (masked-LM-like) one."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, seq), got shape {tuple(labels.shape)}")
    return torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)), dim=1)


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
        raise ValueError(
            f"input_ids must be a (batch, seq) tensor of int64 ids, got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
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
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def count_masked_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many positions `masked_lm_loss` counts for `labels`."""
    return int((labels != ignore_index).sum())


# Logits per slice of the fused loss (tokens x vocab): 4M fp32 values, 16 MiB, so a slice is 512
# tokens at a vocabulary of 8192, 32 at 128k: the large end of the slice sizes that time alike
# (docs/training.md, "Slice size of the fused loss").
FUSED_CHUNK_ELEMENTS = 1 << 22


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight, bias), labels, ...)` without the logits.

    The LM head and the softmax cross-entropy run together over `chunk_tokens` tokens at a
    time (default: `FUSED_CHUNK_ELEMENTS` logits per slice) (Wijmans et al. 2024, "Cut Your Losses"; Liger-Kernel's fused linear cross-entropy):
    each slice's logits are made, turned into the loss and into the gradient of the logits
    (softmax minus the smoothed one-hot target), and that gradient is pushed through the head
    at once, into d(hidden), d(weight) and d(bias). So the forward already holds every
    gradient; the loss is a leaf of the graph whose backward only scales them by its incoming
    gradient. Peak memory is one slice of logits instead of (tokens x vocab) of them, three
    times over (logits, log-probabilities, their gradient).

    `hidden` (..., hidden_size) and `labels` (...) are aligned position by position (no shift:
    for the causal objective pass `shift_labels(labels)` and the hidden states as they are).
    Positions whose label is `ignore_index` cost nothing: they are dropped before the head.
    `label_smoothing` follows `F.cross_entropy`: loss = (1 - e) * NLL + e * mean over the
    vocabulary of -log p. reduction "mean" divides by the counted tokens (NaN when there are
    none, as `F.cross_entropy` gives), "sum" does not. Under autocast the head runs in the
    autocast dtype and the softmax in fp32, as the unfused `causal_lm_loss` path does.
    A tied head (the same tensor as the input embedding) gets this gradient added to the
    embedding's by autograd, as with any shared parameter.
    """
    _check_fused_inputs(hidden, weight, labels, bias, label_smoothing, reduction, chunk_tokens)
    if chunk_tokens is None:
        chunk_tokens = max(1, FUSED_CHUNK_ELEMENTS // weight.shape[0])
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
            raise ValueError(
                f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share one dtype outside autocast"
            )
        compute_dtype = weight.dtype
    wanted = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    return _FusedLinearCrossEntropy.apply(
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        float(label_smoothing),
        reduction,
        chunk_tokens,
        compute_dtype,
        tuple(wanted),
    )


def _check_fused_inputs(hidden, weight, labels, bias, label_smoothing, reduction, chunk_tokens) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be (vocab, hidden_size), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (..., hidden_size) with hidden_size {weight.shape[1]} (weight is "
            f"{tuple(weight.shape)}), got shape {tuple(hidden.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])} (one label per position, "
            f"no shift), got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32) token ids, got {labels.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (vocab,) = ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(
            f"chunk_tokens must be a positive integer or None (from FUSED_CHUNK_ELEMENTS), got {chunk_tokens!r}"
        )


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and every gradient; backward scales them (see
    `fused_linear_cross_entropy`)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, chunk_tokens, compute_dtype, wanted
    ):
        want_hidden, want_weight, want_bias = wanted
        vocab, width = weight.shape
        flat_hidden = hidden.reshape(-1, width)
        flat_labels = labels.reshape(-1)
        counted = flat_labels != ignore_index
        rows = counted.nonzero().squeeze(1)
        count = rows.numel()
        targets = flat_labels.index_select(0, rows).long()
        if count and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            bad = targets[(targets < 0) | (targets >= vocab)][0]
            raise ValueError(
                f"label {int(bad)} is outside the vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})"
            )
        dense = count == flat_hidden.shape[0]
        # Only counted positions reach the head: the causal shift's last column and (masked
        # LM) the ~85% unmasked positions would only be multiplied by zero.
        chosen = flat_hidden if dense else flat_hidden.index_select(0, rows)
        # Autocast is off in here; the casts it would make are made by hand, once.
        with torch.autocast(hidden.device.type, enabled=False):
            # Row-major operands: oneDNN falls back to a reference kernel, ~100x slower, on some
            # strided layouts (no copy when they already are).
            head_in = chosen.to(compute_dtype).contiguous()
            products = _HeadProducts(
                weight.to(compute_dtype).contiguous(),
                bias.to(compute_dtype) if bias is not None else None,
                min(chunk_tokens, count),
                want_hidden,
            )
            grad_chosen = torch.empty_like(head_in) if want_hidden else None
            grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_bias else None
            smooth, target_weight = label_smoothing / vocab, 1.0 - label_smoothing
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            need_grad = want_hidden or want_weight or want_bias
            for start in range(0, count, chunk_tokens):
                stop = min(start + chunk_tokens, count)
                part, part_targets = head_in[start:stop], targets[start:stop]
                logits = products.logits(part).float()  # the softmax in fp32, as the unfused path upcasts
                picked = logits.gather(1, part_targets[:, None]).squeeze(1)
                # log-sum-exp by hand, keeping exp(logits - max) in place: it becomes the softmax.
                peak = logits.amax(dim=1, keepdim=True)
                row_loss = -target_weight * picked
                if label_smoothing:
                    row_loss = row_loss - smooth * logits.sum(dim=1)
                logits.sub_(peak).exp_()
                norm = logits.sum(dim=1, keepdim=True)
                row_loss = row_loss + (peak + norm.log()).squeeze(1)
                total += row_loss.sum()
                if not need_grad:
                    continue
                # d loss / d logits = softmax - (1 - e) one_hot(target) - e / vocab.
                grad_logits = logits.div_(norm)
                if label_smoothing:
                    grad_logits.sub_(smooth)
                grad_logits.scatter_add_(
                    1, part_targets[:, None], grad_logits.new_full((stop - start, 1), -target_weight)
                )
                grad_logits = grad_logits.to(compute_dtype)
                if want_hidden:
                    products.hidden_grad(grad_logits, out=grad_chosen[start:stop])
                if want_weight:
                    products.add_weight_grad(grad_logits, part)
                if want_bias:
                    grad_bias += grad_logits.sum(dim=0, dtype=torch.float32)
            grad_weight = products.weight_grad() if want_weight else None
        scale = 1.0 / count if reduction == "mean" and count else 1.0
        if reduction == "mean" and not count:
            total = total.new_tensor(float("nan"))
        else:
            total = total * scale
        grads = [None, None, None]
        if want_hidden:
            if dense:
                grads[0] = grad_chosen.to(hidden.dtype).view(hidden.shape)
            else:
                full = torch.zeros(flat_hidden.shape, dtype=hidden.dtype, device=hidden.device)
                full.index_copy_(0, rows, grad_chosen.to(hidden.dtype))
                grads[0] = full.view(hidden.shape)
        if want_weight:
            grads[1] = grad_weight
        if want_bias:
            grads[2] = grad_bias
        ctx.scale = scale
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.present = tuple(g is not None for g in grads)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        factor = grad_output * ctx.scale
        out = []
        for tensor, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes):
            if not present:
                out.append(None)
            elif tensor.dtype == dtype:
                # Into a fresh row-major tensor: the weight gradient may be a transposed view.
                out.append(torch.mul(tensor, factor, out=torch.empty(tensor.shape, dtype=dtype, device=tensor.device)))
            else:
                out.append((tensor * factor).to(dtype))
        return (*out, None, None, None, None, None, None, None)


class _HeadProducts:
    """The three products of the LM head for one slice of tokens: logits = x W^T (+ b),
    d(x) = d(logits) W and d(W) += d(logits)^T x, summed over slices in fp32.

    On CPU in fp32 they go through oneDNN (`genforge.onednn.matmul_nt`, as the model's linear
    layers do): torch's fp32 matmul calls MKL, which on AMD CPUs runs its AVX2 code even where
    AVX-512 is there, and is slower for these shapes (docs/training.md, "Slice size of the fused
    loss"). Same fp32 arithmetic, another summation order. Elsewhere (GPU, half precision)
    torch's own matmul is used.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, want_hidden: bool) -> None:
        self.weight, self.bias = weight, bias
        self.onednn = weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available()
        self.grad_weight: torch.Tensor | None = None
        if self.onednn:
            self.linear = matmul_nt
            # d(x) = d(logits) W is a linear layer whose weight is W^T, given as the plain
            # transpose of the row-major W: no (vocab x hidden) copy, and as fast a layout.
            self.weight_t = weight.t() if want_hidden else None
        else:
            # One slice's logits, reused: a fresh multi-MB tensor per slice costs page faults.
            self.buffer = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return self.linear(x, self.weight, self.bias)
        out = self.buffer[: x.shape[0]]
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)

    def hidden_grad(self, grad_logits: torch.Tensor, out: torch.Tensor) -> None:
        if self.onednn:
            out.copy_(self.linear(grad_logits, self.weight_t, None))
        else:
            torch.mm(grad_logits, self.weight, out=out)

    def add_weight_grad(self, grad_logits: torch.Tensor, x: torch.Tensor) -> None:
        if self.onednn:
            # d(W)^T = x^T d(logits) as a linear layer over the views (no transposed copies);
            # held as (hidden, vocab) and handed out transposed.
            product = self.linear(x.t(), grad_logits.t(), None)
        else:
            product = grad_logits.t() @ x
        if self.grad_weight is None:
            self.grad_weight = product.float()
        else:
            self.grad_weight += product

    def weight_grad(self) -> torch.Tensor:
        if self.grad_weight is None:  # no position counted
            return torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        return self.grad_weight.t() if self.onednn else self.grad_weight


DISTILLATION_KINDS = ("forward_kl", "reverse_kl", "tvd", "jsd")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Knowledge distillation on soft targets: a divergence between the teacher's and the
    student's distributions at each position, times `temperature ** 2`.

    With p = softmax(teacher_logits / T) and q = softmax(student_logits / T), per position:

    - "forward_kl": KL(p || q) = sum p (log p - log q), Hinton, Vinyals & Dean 2015. At T = 1
      it is the cross-entropy against the teacher's distribution minus the teacher's entropy,
      so it pulls the student to cover everything the teacher puts mass on.
    - "reverse_kl": KL(q || p), mode seeking: the student may drop the teacher's small modes.
    - "tvd": total variation distance 1/2 sum |p - q|. For greedy speculative decoding
      (and for sampling at T = 1) a draft token is accepted with probability 1 - TVD at that
      position (Leviathan et al. 2023), so this targets the acceptance rate directly
      (DistillSpec, Zhou et al. 2024).
    - "jsd": the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024),
      beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q; beta = 0.5 is
      the ordinary JSD. `beta` is used by this kind only and must be in (0, 1).

    The T^2 factor (Hinton et al. 2015, section 2) keeps the soft-target gradients at the same
    scale whatever the temperature (they shrink as 1/T^2), so a mix with the hard-target
    cross-entropy keeps its balance when T changes; it is applied to every kind.

    `student_logits` and `teacher_logits` are (..., vocab) with the same shape, aligned position
    by position (no shift: both score the same next token). Positions whose `labels` entry
    equals `ignore_index` do not count (padding, prompt tokens, the causal shift's last
    column); without `labels` every position counts. reduction "mean" averages over counted
    positions (NaN when none are), "sum" adds them, "none" returns the per-position values
    (0 at ignored positions). Computed in fp32 whatever the logits' dtype. Gradients reach
    whichever inputs require them; a frozen teacher's logits are usually detached.
    """
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise ValueError(
            f"logits must be floating point, got student {student_logits.dtype} and teacher {teacher_logits.dtype}"
        )
    if student_logits.dim() < 1 or teacher_logits.dim() != student_logits.dim():
        raise ValueError(
            f"student and teacher logits must both be (..., vocab) with the same number of dimensions, "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher must share the vocabulary: the student has {student_logits.shape[-1]} "
            f"logits per position, the teacher {teacher_logits.shape[-1]}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape (one distribution each per position), "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(student_logits.shape[:-1])} (one per "
            f"position, no shift), got {tuple(labels.shape)}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
        or not math.isfinite(temperature)
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if kind not in DISTILLATION_KINDS:
        raise ValueError(f"unknown distillation kind {kind!r}; accepted: {', '.join(DISTILLATION_KINDS)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for the generalized JSD, got {beta!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    counted = None
    if labels is not None:
        counted = labels.reshape(-1) != ignore_index
        # Ignored positions never reach the softmax: the causal shift's last column alone is
        # 1/seq of the work, a masked-LM batch's unchosen positions most of it.
        if not bool(counted.all()):
            student, teacher = student[counted], teacher[counted]
        else:
            counted = None
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per_position = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif kind == "reverse_kl":
        per_position = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    elif kind == "tvd":
        per_position = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    else:
        # log m by log-sum-exp, so a token one side gives ~0 probability stays finite.
        log_m = torch.logsumexp(torch.stack((log_p + math.log(beta), log_q + math.log(1.0 - beta))), dim=0)
        per_position = beta * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1) + (
            1.0 - beta
        ) * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    per_position = per_position * (temperature * temperature)
    if reduction == "sum":
        return per_position.sum()
    if reduction == "mean":
        return per_position.mean() if per_position.numel() else per_position.new_tensor(float("nan"))
    if counted is None:
        return per_position.view(student_logits.shape[:-1])
    full = per_position.new_zeros(counted.shape)
    full[counted] = per_position
    return full.view(student_logits.shape[:-1])


def moe_auxiliary_loss(output: ModelOutput, config) -> torch.Tensor | None:
    """The load-balancing loss of a mixture-of-experts model's routers, or None without experts.
    Switch routing counts it per batch row (`switch_load_balancing_loss`)."""
    if not config.num_experts or not output.router_logits:
        return None
    if config.router == "switch":
        return switch_load_balancing_loss(output.router_logits, config.num_experts, output.hidden_states.shape[0])
    return load_balancing_loss(output.router_logits, config.num_experts, config.num_experts_per_token)


def moe_router_z_loss(output: ModelOutput, config) -> torch.Tensor | None:
    """`router_z_loss_coef` x the router z-loss (ST-MoE, Zoph et al. 2022), or None where the
    coefficient is 0 or the model has no experts."""
    if not config.num_experts or not output.router_logits or not config.router_z_loss_coef:
        return None
    return config.router_z_loss_coef * router_z_loss(output.router_logits)


__all__ = [
    "DISTILLATION_KINDS",
    "FUSED_CHUNK_ELEMENTS",
    "IGNORE_INDEX",
    "causal_lm_loss",
    "count_masked_targets",
    "count_target_tokens",
    "distillation_loss",
    "fused_linear_cross_entropy",
    "mask_tokens",
    "masked_lm_loss",
    "moe_auxiliary_loss",
    "moe_router_z_loss",
    "shift_labels",
]
