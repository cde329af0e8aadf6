"""Perplexity of a causal language model over a long token sequence, by strided windows.

Perplexity is exp of the mean negative log-likelihood per token (Jelinek et al. 1977), each
token t scored as -log p(x_t | x_<t). A model sees at most `max_length` tokens, so a long
text is read in windows. Cutting it into disjoint chunks would give the first tokens of each
chunk almost no context; the standard strided evaluation (the one in transformers' guide
"Perplexity of fixed-length models") instead moves a window of `max_length` tokens forward
by `stride` and, in each window, scores only the tokens the previous window did not. Every
token but the first is then scored exactly once, with at least `max_length - stride` tokens
of context (fewer only at the start). `stride == max_length` is the disjoint chunking; a
smaller stride costs about max_length / stride times more forward passes and scores
closer to the model's true perplexity.

In the last window the number of scored tokens is the count of new tokens, which can be
fewer than `stride`; the corpus mean weights each token equally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..model import Transformer
from ..tokenizer import Tokenizer
from ._progress import progress
from .base import MetricError


@dataclass(frozen=True)
class PerplexityResult:
    """exp(mean_nll) over `num_scored_tokens` tokens read in `num_windows` windows."""

    perplexity: float
    mean_nll: float  # nats per scored token
    num_scored_tokens: int
    num_windows: int
    settings: dict[str, Any] = field(default_factory=dict)


def strided_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: the window holds tokens [begin, end) and scores
    [first_scored, end), the tokens not scored before. The first token of a window cannot be
    scored inside it (it has no context there), which only matters for the very first token,
    or for every window's first token when `stride == max_length`."""
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == num_tokens:
            break
    return windows


@torch.inference_mode()
def perplexity(
    model: Transformer,
    input_ids: Sequence[int] | torch.Tensor,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    show_progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on one token sequence, by strided windows (see the module doc).

    input_ids: a list of token ids, a 1-D tensor or a (1, n) tensor, at least 2 tokens.
    max_length: tokens per window; default the model's `max_position_embeddings`, and never
        more (beyond it a model meets positions it was not trained on).
    stride: how far each window moves; default max_length // 2; 1 <= stride <= max_length.
    show_progress: a progress bar (rich, or tqdm) over windows; None shows one for 16 or more.
    """
    config = model.config
    if not config.causal or model.lm_head is None:
        raise MetricError(
            f"perplexity needs a causal language model with an LM head; this is a {config.family} "
            "encoder, which does not predict the next token"
        )
    ids = _check_ids(input_ids, config.vocab_size)
    context = config.max_position_embeddings
    max_length = context if max_length is None else max_length
    if not isinstance(max_length, int) or not 2 <= max_length <= context:
        raise MetricError(
            f"max_length must be an integer from 2 to the model's context of {context} tokens, got {max_length!r}"
        )
    stride = max(1, max_length // 2) if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise MetricError(
            f"stride must be an integer from 1 to max_length ({max_length}), got {stride!r}; a stride "
            "above max_length would skip the tokens between windows"
        )

    windows = strided_windows(len(ids), max_length, stride)
    ids = ids.to(model.device)
    was_training = model.training
    model.eval()  # dropout off, whatever the caller left on
    total_nll, total_tokens = 0.0, 0
    try:
        for begin, end, first_scored in progress(windows, len(windows), "perplexity", show_progress):
            scored = end - first_scored
            # Logits only where they predict a scored token: the vocabulary projection is the
            # largest matmul, and most of the window is context.
            logits = model(ids[None, begin:end], logits_to_keep=scored + 1).logits[0, :-1]
            nll = F.cross_entropy(logits.float(), ids[first_scored:end], reduction="sum")
            total_nll += float(nll)
            total_tokens += scored
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    settings = {"max_length": max_length, "stride": stride, "num_tokens": len(ids)}
    return PerplexityResult(math.exp(mean_nll), mean_nll, total_tokens, len(windows), settings)


def perplexity_of_text(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    *,
    add_special_tokens: bool = True,
    max_length: int | None = None,
    stride: int | None = None,
    show_progress: bool | None = None,
) -> PerplexityResult:
    """`perplexity` of `text` tokenized with `tokenizer` (with its BOS etc. unless
    `add_special_tokens=False`). Perplexities from different tokenizers are not comparable:
    they average over different units."""
    if not isinstance(text, str):
        raise MetricError(f"text must be a string, got {type(text).__name__}; join documents first (e.g. with \\n\\n)")
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return perplexity(model, ids, max_length=max_length, stride=stride, show_progress=show_progress)


def _check_ids(input_ids: Sequence[int] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    if isinstance(input_ids, str):
        raise MetricError("perplexity takes token ids; for text use perplexity_of_text(model, tokenizer, text)")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise MetricError(
            f"input_ids must be one sequence (a list, a 1-D tensor or shape (1, n)), got shape "
            f"{tuple(ids.shape)}; score several texts one by one or join them"
        )
    if ids.numel() < 2:
        raise MetricError(f"perplexity needs at least 2 tokens (the first is only context), got {ids.numel()}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise MetricError(f"input_ids must be integer token ids, got {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise MetricError(f"token id {bad} is outside the model's vocabulary (0..{vocab_size - 1})")
    return ids.long()


__all__ = ["PerplexityResult", "perplexity", "perplexity_of_text", "strided_windows"]
