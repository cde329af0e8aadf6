"""Decode-time ensembling: several models that share a tokenizer choose each token together.

`ModelEnsemble` is a logits processor (`processors.py`'s protocol, `(logits, context) ->
logits`). The first model is the one decoding: its next-token logits come in. The processor
runs the others on the same prefix and returns the log of the weighted mixture, one of

    "probability":      log sum_i w_i p_i(x)                 (a mixture of the distributions)
    "log_probability":  log_softmax(sum_i w_i log p_i(x))    (a weighted product of experts,
                                                              Hinton 2002, renormalised)

with the weights positive and normalised to sum to 1. The output is normalised
log-probabilities, so temperature and the truncation filters that follow in a processor list
apply to the ensemble's distribution.

Cost: each other model keeps its own KV cache (`cache.ContiguousKVCache`), so a decode step
runs one new token through each model, not the whole prefix. The processor stays a function of
its inputs: what its caches hold is matched against the context's tokens at every call (rows
that finished and left the batch, beams reordered or repeated, a speculative rollback), the
common prefix is kept and the rest recomputed; a context that shares nothing starts over.

Tokens and ids ruled out before it (`-inf` from the vocabulary limit, a logit-bias ban, a
grammar) stay ruled out; penalties that ran before it changed only the decoding model's share.
Sampling through `generator.generate(..., extra_processors=[ensemble])` puts it after the
penalties and before temperature; `ensemble_generate` does that for a list of models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..cache import ContiguousKVCache
from ..model import Transformer
from .generator import Completion, generate
from .processors import DecodeContext

__all__ = ["AVERAGES", "EnsembleError", "ModelEnsemble", "ensemble_generate"]

AVERAGES = ("probability", "log_probability")


class EnsembleError(ValueError):
    """Models or weights that cannot form an ensemble; the message says what was wrong."""


class _Member:
    """One model the processor runs, with its cache and the tokens the cache holds."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.cache: ContiguousKVCache | None = None
        self.tokens: torch.Tensor | None = None  # (rows, cached length): what the cache holds
        self.mask: torch.Tensor | None = None  # the attention mask of those positions, or None

    def reset(self) -> None:
        self.cache = self.tokens = self.mask = None

    def next_logits(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The model's next-token logits (rows, vocab) after `ids` (rows, length), reusing what
        its cache holds of those rows."""
        rows, length = ids.shape
        kept = self._reusable(ids, mask)
        if kept == 0 or self.cache is None:
            self._start(rows, length)
            kept = 0
        self._fit(length)
        self.cache.crop(kept)
        padded = mask is not None and not bool(mask.all())
        out = self.model(
            ids[:, kept:],
            attention_mask=mask if padded else None,
            cache=self.cache,
            logits_to_keep=1,
        )
        self.tokens, self.mask = ids, mask
        return out.logits[:, -1].float()

    def _reusable(self, ids: torch.Tensor, mask: torch.Tensor | None) -> int:
        """How many leading positions of every row of `ids` the cache already holds, after
        selecting (reordering, repeating) its rows to match; 0 when some row has no match.
        At least the newest token is always recomputed: its logits are what is asked."""
        if self.tokens is None:
            return 0
        kept = min(self.tokens.shape[1], ids.shape[1] - 1)
        if kept <= 0:
            return 0
        same = (ids[:, None, :kept] == self.tokens[None, :, :kept]).all(-1)  # (rows, cached rows)
        if (mask is None) != (self.mask is None):
            return 0
        if mask is not None:
            same &= (mask[:, None, :kept] == self.mask[None, :, :kept]).all(-1)
        if not bool(same.any(-1).all()):
            return 0
        source = same.int().argmax(-1)  # identical prefixes have identical caches: any match will do
        if source.shape[0] != self.tokens.shape[0] or not torch.equal(
            source, torch.arange(len(source), device=source.device)
        ):
            self.cache.select(source.to(self.cache.keys[0].device))
        return kept

    def _start(self, rows: int, length: int) -> None:
        model = self.model
        self.cache = ContiguousKVCache(model.config, rows, max(2 * length, 16), dtype=model.dtype, device=model.device)

    def _fit(self, length: int) -> None:
        """Grow the cache (doubling, keeping what it holds) to hold `length` positions."""
        cache = self.cache
        if length <= cache.capacity:
            return
        model = self.model
        grown = ContiguousKVCache(
            model.config, cache.batch_size, max(length, 2 * cache.capacity), dtype=model.dtype, device=model.device
        )
        for layer in range(len(cache.keys)):
            grown.keys[layer][:, :, : cache.length] = cache.keys[layer][:, :, : cache.length]
            grown.values[layer][:, :, : cache.length] = cache.values[layer][:, :, : cache.length]
        grown.length = cache.length
        self.cache = grown


class ModelEnsemble:
    """A logits processor mixing the next-token distributions of `models` (module docstring).

    models: the decoding model first (its logits are the processor's input), then the models
        the processor runs; all with one vocabulary (and, for the outputs to mean anything, one
        tokenizer).
    weights: one positive weight per model, normalised to sum to 1; equal when None.
    average: "probability" (mix the probabilities) or "log_probability" (mix the
        log-probabilities, renormalised).
    """

    def __init__(
        self, models: Sequence[Transformer], weights: Sequence[float] | None = None, average: str = "probability"
    ) -> None:
        models = list(models)
        if len(models) < 2:
            raise EnsembleError(f"an ensemble needs at least two models (the decoding model first); got {len(models)}")
        if average not in AVERAGES:
            raise EnsembleError(f"unknown average {average!r}; accepted: {', '.join(AVERAGES)}")
        vocab = models[0].config.vocab_size
        for index, model in enumerate(models[1:], start=1):
            if model.config.vocab_size != vocab:
                raise EnsembleError(
                    f"model {index + 1} has a vocabulary of {model.config.vocab_size} tokens but the decoding model "
                    f"has {vocab}; ensembled models must share one vocabulary (one tokenizer)"
                )
        if weights is None:
            weights = [1.0] * len(models)
        weights = list(weights)
        if len(weights) != len(models):
            raise EnsembleError(f"{len(weights)} weight(s) for {len(models)} models; give one weight per model")
        if not all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in weights
        ):
            raise EnsembleError(f"ensemble weights must be positive numbers (they are normalised); got {weights}")
        total = float(sum(weights))
        self.weights = tuple(float(w) / total for w in weights)
        self.average = average
        self.vocab_size = vocab
        self._members = [_Member(model) for model in models[1:]]

    def reset(self) -> None:
        """Free the other models' caches (the next call starts over)."""
        for member in self._members:
            member.reset()

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if logits.shape[-1] != self.vocab_size:
            raise EnsembleError(
                f"the logits have {logits.shape[-1]} columns but the ensemble's models have a vocabulary of "
                f"{self.vocab_size}; the first model of the ensemble must be the one decoding"
            )
        ids = ctx.input_ids
        mask = ctx.attention_mask[:, : ids.shape[1]] if ctx.attention_mask is not None else None
        with torch.inference_mode():
            log_probs = [torch.log_softmax(logits.float(), dim=-1)]
            log_probs += [torch.log_softmax(m.next_logits(ids, mask), dim=-1) for m in self._members]
            stacked = torch.stack(log_probs)
            weights = torch.tensor(self.weights, dtype=stacked.dtype, device=stacked.device).view(-1, 1, 1)
            if self.average == "probability":
                mixed = torch.logsumexp(stacked + weights.log(), dim=0)
            else:
                mixed = torch.log_softmax((stacked * weights).sum(dim=0), dim=-1)
            # What an earlier processor ruled out stays out.
            return mixed.masked_fill(logits == float("-inf"), float("-inf")).to(logits.dtype)


def ensemble_generate(
    models: Sequence[Transformer],
    prompts,
    params=None,
    weights: Sequence[float] | None = None,
    average: str = "probability",
    tokenizer=None,
    eos_token_ids: Sequence[int] | None = None,
) -> list[Completion]:
    """`generator.generate` with `models[0]` decoding and the ensemble of `models` choosing
    each token; returns its `Completion`s."""
    ensemble = ModelEnsemble(models, weights, average)
    try:
        return generate(
            models[0], prompts, params, tokenizer=tokenizer, eos_token_ids=eos_token_ids, extra_processors=[ensemble]
        )
    finally:
        ensemble.reset()
