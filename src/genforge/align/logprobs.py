"""Completion log-probabilities of a causal language model.

Every preference and policy-gradient objective in `align` is a function of how likely the
model finds a completion given its prompt: log pi(y | x) = sum over the completion's tokens y_t
of log pi(y_t | x, y_<t) (Rafailov et al. 2023, eq. 7 of "Direct Preference Optimization").
Prompt and padding tokens are not scored: a completion mask marks the tokens that are.

The vocabulary projection is the largest tensor of the computation (tokens x vocab). It is
made only for the completion's tokens, a slice at a time: each slice's log-probability of
the target is its logit minus the log-sum-exp of its row, so no full log_softmax copy exists.
When gradients are needed each slice is recomputed in the backward pass (activation
checkpointing), so training holds one slice of logits at a time too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# About 4M logits per slice: 16 MiB in float32, whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class CompletionLogProbs:
    """Log-probabilities of the completions of a batch.

    per_token: (batch, seq) float32; column t holds log p(input_ids[:, t] | input_ids[:, :t]) where
        the completion mask is 1 and 0 elsewhere (column 0 is always 0: nothing predicts it).
    sum: (batch,) the summed log-probability of each completion (DPO, IPO, KTO).
    count: (batch,) how many completion tokens were scored.
    """

    per_token: torch.Tensor
    sum: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """(batch,) the average log-probability per completion token (ORPO, SimPO); 0 for a row
        with no completion tokens."""
        return self.sum / self.count.clamp(min=1)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature) at `targets`, row by row.

    hidden (tokens, hidden_size), weight (vocab, hidden_size), targets (tokens,) -> (tokens,)
    float32. `chunk_tokens` rows at a time (default: `CHUNK_ELEMENTS` logits per slice); with
    gradients enabled each slice is recomputed in backward instead of kept.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (tokens, hidden_size) and weight (vocab, hidden_size) with the same hidden_size, "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), one per hidden row; got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer or None, got {chunk_tokens}")
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows, wanted = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if track:
            pieces.append(checkpoint(_slice_logprobs, rows, weight, bias, wanted, temperature, use_reentrant=False))
        else:
            pieces.append(_slice_logprobs(rows, weight, bias, wanted, temperature))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def _slice_logprobs(hidden, weight, bias, targets, temperature: float) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    lm_head: torch.nn.Module | None = None,
) -> CompletionLogProbs:
    """Run the causal `model` (a genforge `Transformer`) on `input_ids` (batch, seq) and score
    the completion tokens.

    attention_mask (batch, seq): 1 for real tokens, 0 for padding (left or right).
    completion_mask (batch, seq): 1 for the tokens to score (the completion), 0 for the prompt
        and padding; a completion token must be a real token, and the first column cannot be
        one (no earlier token predicts it).
    temperature: divides the logits first, as sampling did (GRPO scores samples drawn at one).
    lm_head: the head to score with when `model` is a wrapper that does not expose it (DDP);
        default `model.lm_head`.
    """
    check_masks(input_ids, attention_mask, completion_mask)
    head = lm_head if lm_head is not None else getattr(model, "lm_head", None)
    if head is None:
        raise ValueError("completion_logprobs needs a causal language model with an LM head (model.lm_head)")
    if not isinstance(head, torch.nn.Linear):
        # The head is applied through its weight, slice by slice: a wrapped head (LoRA on
        # lm_head) would silently lose its update.
        raise ValueError(
            f"the LM head must be a plain linear layer, got {type(head).__name__}; leave lm_head out of "
            "the adapter's target modules"
        )
    output = model(input_ids, attention_mask=attention_mask, compute_logits=False)
    scored = completion_mask[:, 1:].bool()
    # Position t's hidden state predicts token t + 1: only the predictors of completion tokens
    # go through the head.
    predictors = output.hidden_states[:, :-1][scored]
    targets = input_ids[:, 1:][scored]
    values = token_logprobs(predictors, head.weight, targets, head.bias, temperature, chunk_tokens)
    shifted = torch.zeros(scored.shape, dtype=torch.float32, device=values.device).masked_scatter(scored, values)
    per_token = F.pad(shifted, (1, 0))
    return CompletionLogProbs(per_token=per_token, sum=per_token.sum(-1), count=scored.sum(-1))


def check_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> None:
    """Clear errors for masks that do not fit `input_ids` or each other."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    for name, mask in (("attention_mask", attention_mask), ("completion_mask", completion_mask)):
        if mask.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected input_ids' {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError("a sequence needs at least two tokens (a prompt token and a completion token) to be scored")
    completion, real = completion_mask.bool(), attention_mask.bool()
    if bool((completion & ~real).any()):
        row = int((completion & ~real).any(-1).nonzero()[0])
        raise ValueError(f"row {row} marks padding (attention_mask 0) as completion; completion tokens must be real")
    if bool(completion[:, 0].any()):
        row = int(completion[:, 0].nonzero()[0])
        raise ValueError(
            f"row {row} marks its first token as completion; nothing precedes it to predict it "
            "(a completion needs at least one prompt token, e.g. BOS, before it)"
        )
