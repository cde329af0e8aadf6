"""Logits processors: pure functions ``(logits, ctx) -> logits`` that compose as a list.

Every processor here is a small frozen dataclass whose ``__call__(logits, ctx)`` takes the
next-token logits ``(batch, vocab)`` plus a :class:`DecodeContext` (the tokens so far) and
returns new logits. Processors never modify their inputs in place; one that has nothing to
do may return ``logits`` itself, so callers that want to write into the result must clone.

The simple generator builds one list per request with :func:`build_processors`; the
continuous-batching engine builds one list per batch with :func:`build_batch_processors`,
where every numeric knob may be a 1-D tensor holding one value per row. Per-row values use
a neutral setting to mean "off for this row" (temperature 1, top_k 0, top_p 1, min_p 0,
typical_p 1, repetition_penalty 1, penalties 0, ngram size 0, min_new_tokens 0). Both
builders read one table, ``_STAGES``: which ``SamplingParams`` fields build which processor,
in which order, and what value turns it off. The sampler and ``SamplingParams`` live in
``sampling.py``.

Semantics follow ``transformers.generation.logits_process`` (5.23) operation for operation,
so the results are bitwise equal on the same float32 inputs (the tests check this); the
differences are deliberate and listed on each class:

- padding: positions where ``ctx.attention_mask == 0`` are ignored by the penalties and by
  the n-gram ban. transformers' ``generate`` does the same for the repetition penalty (it
  passes the left-padding length as ``prompt_ignore_length``) but its n-gram processor
  counts n-grams that run through pad tokens;
- "off" values (``TopK(0)``, ``TopP(1)``, ``TypicalP(1)``) are accepted as no-ops instead of
  raising, so that a per-row tensor can switch a filter off for some rows;
- presence/frequency penalties (OpenAI) do not exist in transformers;
- ``build_processors`` also keeps ``stop_token_ids`` out until ``min_new_tokens`` are
  generated (vLLM's ``min_tokens``), where transformers only keeps out EOS.

Hot path: everything is vectorised over batch and vocab; the only Python loops are over
distinct n-gram sizes and, in the sampler, over per-request generators. Data-dependent
checks (``.any()``, ``.max()``) run once at construction, never per token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .sampling import SamplingParams
from .validation import check_knob, finite, is_int, normalise_bias, normalise_token_ids

__all__ = [
    "DecodeContext",
    "LogitsProcessor",
    "Temperature",
    "TopK",
    "TopP",
    "MinP",
    "TypicalP",
    "RepetitionPenalty",
    "PresenceFrequencyPenalty",
    "NoRepeatNGram",
    "LogitBias",
    "MinNewTokens",
    "VocabularyLimit",
    "build_processors",
    "build_batch_processors",
    "apply_processors",
]

# A knob given once for the whole batch (Python number) or once per row (1-D tensor).
PerRow = float | torch.Tensor
PerRowInt = int | torch.Tensor

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------
# Helpers: all checks run at construction time so bad input fails before generation.
# --------------------------------------------------------------------------------------


def _check_min_tokens_to_keep(value: Any) -> int:
    return check_knob("min_tokens_to_keep", value, lambda v: v >= 1, ">= 1", integer=True)


def _rows(value: Any, logits: torch.Tensor, name: str) -> Any:
    """A scalar as is, or a per-row tensor as ``(batch, 1)`` in the logits' dtype and device."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.shape[0] != logits.shape[0]:
        raise ValueError(f"{name} has {value.shape[0]} per-row values but the logits have {logits.shape[0]} rows")
    dtype = logits.dtype if value.is_floating_point() else value.dtype
    return value.to(device=logits.device, dtype=dtype).unsqueeze(1)


def _no_positive_overflow(logits: torch.Tensor) -> torch.Tensor:
    """Clamp +inf (a tiny temperature or penalty divided a logit past the float range) to the
    largest finite value: softmax of +inf is NaN, while -inf stays a ban."""
    return logits.clamp(max=torch.finfo(logits.dtype).max)


def _ids_or_spare(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Map ids outside ``[0, vocab)`` to the spare column ``vocab`` of a ``vocab + 1`` wide mask.

    The embedding vocab can be larger than the LM head's (transformers clamps the same way);
    such ids can never be generated, so they must not penalise anything.
    """
    return torch.where((ids < 0) | (ids >= vocab_size), vocab_size, ids)


# --------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DecodeContext:
    """What a processor may look at besides the logits.

    Attributes:
        input_ids: ``(batch, seq)`` int64, every token so far: prompt then generated.
        prompt_length: how many leading columns are prompt (left padding included). An
            ``int`` for the usual left-padded batch; a ``(batch,)`` tensor when rows started
            generating at different columns (engine batches). Generated tokens of row ``i``
            are the columns ``>= prompt_length[i]``.
        attention_mask: optional ``(batch, seq)``, 0 at padding. Penalties and n-gram bans
            skip masked positions. The n-gram ban assumes the last column is each row's
            newest real token (left padding), which is how both generators lay out batches.
    """

    input_ids: torch.Tensor
    prompt_length: PerRowInt
    attention_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a (batch, seq) tensor, got "
                f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}"
            )
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got {ids.dtype}")
        batch, seq = ids.shape
        plen = self.prompt_length
        if isinstance(plen, torch.Tensor):
            if plen.shape != (batch,) or plen.is_floating_point():
                raise ValueError(
                    f"prompt_length per row must be an integer tensor of shape ({batch},), "
                    f"got {plen.dtype} {tuple(plen.shape)}"
                )
        elif not is_int(plen) or not 0 <= plen <= seq:
            raise ValueError(f"prompt_length must be an int in [0, {seq}] (the sequence length), got {plen!r}")
        mask = self.attention_mask
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got {got}")

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def num_generated(self) -> PerRowInt:
        """Generated tokens so far: an ``int``, or ``(batch,)`` if ``prompt_length`` is per row."""
        if isinstance(self.prompt_length, torch.Tensor):
            return self.seq_len - self.prompt_length.to(self.input_ids.device)
        return self.seq_len - self.prompt_length

    def valid_mask(self) -> torch.Tensor | None:
        """``(batch, seq)`` bool, False at padding; None when there is no padding."""
        return None if self.attention_mask is None else self.attention_mask != 0

    def generated_ids(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The generated part of ``input_ids`` and a validity mask for it (None = all valid).

        With an ``int`` prompt length this is a cheap column slice; per-row prompt lengths
        keep all columns and mask the prompt ones out.
        """
        ids, valid = self.input_ids, self.valid_mask()
        if isinstance(self.prompt_length, torch.Tensor):
            cols = torch.arange(self.seq_len, device=ids.device)
            gen = cols[None, :] >= self.prompt_length.to(ids.device)[:, None]
            return ids, gen if valid is None else gen & valid
        p = self.prompt_length
        return ids[:, p:], None if valid is None else valid[:, p:]


class LogitsProcessor(Protocol):
    """Anything callable as ``(logits (batch, vocab), ctx) -> logits`` without side effects."""

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor: ...


def _cache_field() -> Any:
    # Device copies of constant index/bias tensors, memoised so the hot path does not
    # re-upload them every token. Memoisation does not change results, so "pure" still holds.
    return field(default_factory=dict, init=False, repr=False, compare=False)


# --------------------------------------------------------------------------------------
# Warpers (applied only when sampling)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Temperature:
    """Softmax temperature: ``logits / T`` (the Boltzmann temperature, Ackley, Hinton &
    Sejnowski 1985). T < 1 sharpens the distribution, T > 1 flattens it.

    T must be > 0. Greedy decoding is ``SamplingParams(temperature=0)``: the sampler takes the
    argmax and :func:`build_processors` leaves this processor out. Matches transformers'
    ``TemperatureLogitsWarper``.
    """

    temperature: PerRow

    def __post_init__(self) -> None:
        t = check_knob(
            "temperature",
            self.temperature,
            lambda v: (v > 0) & finite(v),
            "a finite number > 0",
            hint="For greedy decoding use temperature=0 in SamplingParams; the sampler then takes "
            "the argmax and no Temperature processor is built.",
        )
        object.__setattr__(self, "temperature", t)

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        return _no_positive_overflow(logits / _rows(self.temperature, logits, "temperature"))


@dataclass(frozen=True)
class TopK:
    """Top-k filtering (Fan, Lewis & Dauphin 2018): keep the k highest logits, -inf the rest.

    As in transformers' ``TopKLogitsWarper``, a token tied with the k-th value is kept, so more
    than k tokens can survive; ``k = max(top_k, min_tokens_to_keep)``. Uses ``torch.topk``
    (no full sort). ``top_k = 0`` keeps everything (transformers raises instead).
    """

    top_k: PerRowInt
    min_tokens_to_keep: int = 1
    _kmax: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        m = _check_min_tokens_to_keep(self.min_tokens_to_keep)
        k = check_knob("top_k", self.top_k, lambda v: v >= 0, ">= 0 (0 disables top-k)", integer=True)
        object.__setattr__(self, "min_tokens_to_keep", m)
        object.__setattr__(self, "top_k", k)
        # The largest k that topk() must return; fixed here so the hot path never syncs.
        kmax = int(k.max()) if isinstance(k, torch.Tensor) else k
        object.__setattr__(self, "_kmax", max(kmax, m) if kmax > 0 else 0)

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if self._kmax == 0:
            return logits
        vocab = logits.shape[-1]
        kmax = min(self._kmax, vocab)
        values = torch.topk(logits, kmax, dim=-1).values  # sorted, descending
        if not isinstance(self.top_k, torch.Tensor):
            threshold = values[..., -1:]
            return logits.masked_fill(logits < threshold, _NEG_INF)
        k = _rows(self.top_k, logits, "top_k")
        enabled = k > 0
        k = k.clamp(min=self.min_tokens_to_keep, max=kmax)
        threshold = values.gather(-1, k - 1)
        return logits.masked_fill((logits < threshold) & enabled, _NEG_INF)


@dataclass(frozen=True)
class TopP:
    """Nucleus (top-p) sampling (Holtzman et al. 2019, "The Curious Case of Neural Text
    Degeneration"): keep the smallest set of most likely tokens whose probability reaches p.

    Same operations as transformers' ``TopPLogitsWarper`` (ascending sort, remove tokens whose
    cumulative probability is <= 1 - p, always keep the ``min_tokens_to_keep`` most likely), so
    ties at the boundary resolve identically. Needs one full sort per call. ``top_p = 1`` is a
    no-op for that row.
    """

    top_p: PerRow
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        m = _check_min_tokens_to_keep(self.min_tokens_to_keep)
        p = check_knob("top_p", self.top_p, lambda v: (v > 0) & (v <= 1), "in (0, 1] (1 disables top-p)")
        object.__setattr__(self, "min_tokens_to_keep", m)
        object.__setattr__(self, "top_p", p)

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if not isinstance(self.top_p, torch.Tensor) and self.top_p >= 1:
            return logits
        sorted_logits, sorted_indices = torch.sort(logits, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # 1 - p computed before the cast to the logits dtype, as transformers does with a
        # Python float, so the threshold rounds identically.
        sorted_remove = cumulative_probs <= _rows(1 - self.top_p, logits, "top_p")
        sorted_remove[..., -self.min_tokens_to_keep :] = False  # our own fresh tensor
        if isinstance(self.top_p, torch.Tensor):
            sorted_remove &= _rows(self.top_p, logits, "top_p") < 1
        remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
        return logits.masked_fill(remove, _NEG_INF)


@dataclass(frozen=True)
class MinP:
    """Min-p sampling (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative
    and Coherent LLM Outputs"): drop tokens whose probability is below ``min_p`` times the
    top token's probability, so the cut tightens when the model is confident.

    Matches transformers' ``MinPLogitsWarper``; ``min_p = 0`` is a no-op.
    """

    min_p: PerRow
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        m = _check_min_tokens_to_keep(self.min_tokens_to_keep)
        p = check_knob("min_p", self.min_p, lambda v: (v >= 0) & (v <= 1), "in [0, 1] (0 disables min-p)")
        object.__setattr__(self, "min_tokens_to_keep", m)
        object.__setattr__(self, "min_p", p)

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        top_probs = probs.amax(dim=-1, keepdim=True)
        remove = probs < _rows(self.min_p, logits, "min_p") * top_probs
        k = min(self.min_tokens_to_keep, probs.shape[-1])
        remove = remove.scatter(-1, torch.topk(probs, k, dim=-1).indices, False)
        return logits.masked_fill(remove, _NEG_INF)


@dataclass(frozen=True)
class TypicalP:
    """Locally typical sampling (Meister et al. 2022, "Locally Typical Sampling"): keep the
    tokens whose surprisal ``-log p`` is closest to the distribution's entropy, until their
    probability mass reaches ``typical_p``. The most likely token can be dropped.

    Matches transformers' ``TypicalLogitsWarper``; ``typical_p = 1`` is a no-op (transformers
    raises for 1). Needs one full sort per call.
    """

    typical_p: PerRow
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        m = _check_min_tokens_to_keep(self.min_tokens_to_keep)
        p = check_knob("typical_p", self.typical_p, lambda v: (v > 0) & (v <= 1), "in (0, 1] (1 disables typical-p)")
        object.__setattr__(self, "min_tokens_to_keep", m)
        object.__setattr__(self, "typical_p", p)

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if not isinstance(self.typical_p, torch.Tensor) and self.typical_p >= 1:
            return logits
        mass = _rows(self.typical_p, logits, "typical_p")
        log_probs = torch.log_softmax(logits, dim=-1)
        p = log_probs.exp()
        entropy = -(log_probs * p).nansum(-1, keepdim=True)  # nansum: -inf * 0 at masked tokens
        shifted = torch.abs(-log_probs - entropy)
        sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
        cumulative_probs = logits.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
        last_ind = (cumulative_probs < mass).sum(dim=1).clamp(max=sorted_scores.shape[-1] - 1)
        sorted_remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
        sorted_remove[..., : self.min_tokens_to_keep] = False  # our own fresh tensor
        if isinstance(mass, torch.Tensor):
            sorted_remove &= mass < 1
        remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
        return logits.masked_fill(remove, _NEG_INF)


# --------------------------------------------------------------------------------------
# Penalties and bans (applied for greedy and sampling alike)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepetitionPenalty:
    """Repetition penalty from CTRL (Keskar et al. 2019): every token already present in the
    prompt or the generated text has its logit divided by ``penalty`` if positive and
    multiplied by it if negative, once however often it occurred. > 1 discourages repeats.

    Matches transformers' ``RepetitionPenaltyLogitsProcessor``. Positions with
    ``attention_mask == 0`` are ignored, which is what transformers' ``generate`` does for left
    padding (``prompt_ignore_length``) but a bare transformers processor does not.
    """

    penalty: PerRow

    def __post_init__(self) -> None:
        p = check_knob(
            "repetition_penalty",
            self.penalty,
            lambda v: (v > 0) & finite(v),
            "a finite number > 0 (1 disables it; > 1 discourages repeats)",
        )
        object.__setattr__(self, "penalty", p)

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        vocab = logits.shape[-1]
        ids = _ids_or_spare(ctx.input_ids, vocab)
        valid = ctx.valid_mask()
        if valid is not None:
            ids = ids.masked_fill(~valid, vocab)
        seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
        seen = seen.scatter_(1, ids, True)[:, :vocab]  # scatter_ into our own fresh tensor
        penalty = _rows(self.penalty, logits, "repetition_penalty")
        penalised = _no_positive_overflow(torch.where(logits < 0, logits * penalty, logits / penalty))
        return torch.where(seen, penalised, logits)


@dataclass(frozen=True)
class PresenceFrequencyPenalty:
    """OpenAI presence and frequency penalties (OpenAI API reference, "frequency_penalty" and
    "presence_penalty"; also vLLM):

        logits[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty

    where ``count[j]`` is how often token j occurs in the *generated* tokens (not the prompt),
    ignoring padded positions. Positive values discourage repetition. Not in transformers.
    """

    presence_penalty: PerRow = 0.0
    frequency_penalty: PerRow = 0.0

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            v = check_knob(name, getattr(self, name), finite, "finite")
            object.__setattr__(self, name, v)

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        vocab = logits.shape[-1]
        ids, valid = ctx.generated_ids()
        if ids.shape[1] == 0:
            return logits
        ids = _ids_or_spare(ids, vocab)
        if valid is not None:
            ids = ids.masked_fill(~valid, vocab)
        counts = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
        counts = counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))[:, :vocab]
        frequency = _rows(self.frequency_penalty, logits, "frequency_penalty")
        presence = _rows(self.presence_penalty, logits, "presence_penalty")
        return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


@dataclass(frozen=True)
class NoRepeatNGram:
    """No-repeat n-gram blocking (Paulus, Xiong & Socher 2017 used trigram blocking at test
    time; fairseq and transformers generalise it): a token that would complete an n-gram
    already present in the sequence (prompt included) gets -inf.

    Vectorised like transformers' ``NoRepeatNGramLogitsProcessor``: the last n-1 tokens are
    compared against every window at once. Difference: windows that touch a padded position
    (``attention_mask == 0``) are ignored, where transformers matches n-grams made of pad
    tokens. ``ngram_size`` may be per row (0 = off); each distinct size costs one pass.
    """

    ngram_size: PerRowInt
    _sizes: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        n = check_knob("no_repeat_ngram_size", self.ngram_size, lambda v: v >= 0, ">= 0 (0 disables it)", integer=True)
        object.__setattr__(self, "ngram_size", n)
        sizes = sorted(set(n.tolist())) if isinstance(n, torch.Tensor) else [n]
        object.__setattr__(self, "_sizes", tuple(s for s in sizes if s > 0))

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        vocab = logits.shape[-1]
        ids, seq = ctx.input_ids, ctx.seq_len
        valid = ctx.valid_mask()
        per_row = _rows(self.ngram_size, logits, "no_repeat_ngram_size")
        banned = None
        for n in self._sizes:
            if seq < n:  # no complete n-gram yet
                continue
            # Only an n-gram whose first n-1 tokens equal the current suffix can be completed
            # by the next token, so match that suffix against every window. The window that
            # starts at the suffix itself needs one more token, so it never bans its successor.
            prefix = ids[:, seq + 1 - n :]
            windows = ids.unfold(dimension=1, size=n, step=1)
            matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
            if valid is not None:
                matches &= valid.unfold(dimension=1, size=n, step=1).all(dim=-1)
            if isinstance(per_row, torch.Tensor):
                matches &= per_row == n
            if banned is None:
                banned = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
            # Non-matching windows write into the spare column, so they cannot unban anything.
            banned.scatter_(1, torch.where(matches, _ids_or_spare(windows[..., -1], vocab), vocab), True)
        if banned is None:
            return logits
        return logits.masked_fill(banned[:, :vocab], _NEG_INF)


@dataclass(frozen=True)
class LogitBias:
    """Additive per-token bias, OpenAI ``logit_bias`` style: ``logits[:, id] += bias[id]``.

    A bias of ``-inf`` bans a token outright (see :meth:`ban`); OpenAI's API clamps values to
    [-100, 100], which is the server's job, not this processor's. ``bias`` is one mapping for
    every row, or a sequence with one mapping (or None) per row. Give ``vocab_size`` to reject
    out-of-vocabulary ids at construction; otherwise they are rejected at the first call.
    Matches transformers' ``SequenceBiasLogitsProcessor`` for single-token sequences.
    """

    bias: Mapping[int, float] | Sequence[Mapping[int, float] | None]
    vocab_size: int | None = None
    _max_id: int = field(init=False, repr=False, compare=False, default=-1)
    _cache: dict = _cache_field()

    def __post_init__(self) -> None:
        if self.vocab_size is not None:
            check_knob("vocab_size", self.vocab_size, lambda v: v > 0, "> 0", integer=True)
        if isinstance(self.bias, Mapping):
            bias: Any = normalise_bias(self.bias, "logit_bias")
            ids = list(bias)
        elif isinstance(self.bias, Sequence) and not isinstance(self.bias, str):
            bias = tuple(
                normalise_bias(row if row is not None else {}, f"logit_bias for row {i}")
                for i, row in enumerate(self.bias)
            )
            ids = [i for row in bias for i in row]
        else:
            raise ValueError(
                f"logit_bias must be a mapping token_id -> bias or a sequence of them (one per row), "
                f"got {type(self.bias).__name__}"
            )
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "_max_id", max(ids, default=-1))
        if self.vocab_size is not None:
            self._check_vocab(self.vocab_size)

    @classmethod
    def ban(cls, token_ids: Sequence[int], vocab_size: int | None = None) -> LogitBias:
        """A bias that makes ``token_ids`` impossible (-inf) in every row."""
        return cls({int(t): _NEG_INF for t in token_ids}, vocab_size)

    def _check_vocab(self, vocab_size: int) -> None:
        if self._max_id >= vocab_size:
            rows = [self.bias] if isinstance(self.bias, dict) else self.bias
            bad = sorted({t for row in rows for t in row if t >= vocab_size})
            raise ValueError(f"logit_bias has token ids outside the vocabulary of size {vocab_size}: {bad[:10]}")

    def _dense(self, logits: torch.Tensor) -> torch.Tensor:
        batch, vocab = logits.shape
        per_row = not isinstance(self.bias, dict)
        if per_row and len(self.bias) != batch:
            raise ValueError(f"logit_bias has {len(self.bias)} per-row entries but the logits have {batch} rows")
        key = (logits.device, logits.dtype, vocab)
        dense = self._cache.get(key)
        if dense is None:
            self._check_vocab(vocab)
            rows = self.bias if per_row else [self.bias]
            dense = torch.zeros(len(rows), vocab, dtype=torch.float32)
            for r, row in enumerate(rows):
                if row:
                    dense[r, list(row)] = torch.tensor(list(row.values()), dtype=torch.float32)
            dense = dense.to(device=logits.device, dtype=logits.dtype)
            self._cache[key] = dense
        return dense

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if self._max_id < 0:
            return logits
        # A dense add like transformers: x + 0.0 leaves other tokens unchanged.
        return logits + self._dense(logits)


@dataclass(frozen=True)
class MinNewTokens:
    """Minimum generation length: while fewer than ``min_new_tokens`` tokens have been
    generated (prompt excluded), the end tokens in ``eos_token_ids`` get -inf.

    Matches transformers' ``MinNewTokensLengthLogitsProcessor`` (its
    ``prompt_length_to_skip`` is ``ctx.prompt_length``). ``eos_token_ids`` is one set for every
    row, or a sequence of sets (one per row) when requests stop on different ids.
    """

    min_new_tokens: PerRowInt
    eos_token_ids: Sequence[int] | Sequence[Sequence[int]] | int
    _cache: dict = _cache_field()

    def __post_init__(self) -> None:
        n = check_knob("min_new_tokens", self.min_new_tokens, lambda v: v >= 0, ">= 0", integer=True)
        object.__setattr__(self, "min_new_tokens", n)
        ids = self.eos_token_ids
        nested = (
            isinstance(ids, Sequence)
            and not isinstance(ids, str)
            and len(ids) > 0
            and all(isinstance(x, (Sequence, torch.Tensor)) and not isinstance(x, str) for x in ids)
        )
        if nested:
            ids = tuple(normalise_token_ids(row, f"eos_token_ids[{i}]") for i, row in enumerate(ids))
        else:
            ids = normalise_token_ids(ids, "eos_token_ids")
        object.__setattr__(self, "eos_token_ids", ids)

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``(vocab,)`` or ``(batch, vocab)`` bool: True at the suppressed ids."""
        batch, vocab = logits.shape
        per_row = len(self.eos_token_ids) > 0 and isinstance(self.eos_token_ids[0], tuple)
        if per_row and len(self.eos_token_ids) != batch:
            raise ValueError(
                f"eos_token_ids has {len(self.eos_token_ids)} per-row entries but the logits have {batch} rows"
            )
        key = (logits.device, vocab)
        mask = self._cache.get(key)
        if mask is None:
            rows = self.eos_token_ids if per_row else [self.eos_token_ids]
            mask = torch.zeros(len(rows), vocab, dtype=torch.bool)
            for r, row in enumerate(rows):
                in_vocab = [t for t in row if t < vocab]  # like torch.isin: others never match
                mask[r, in_vocab] = True
            mask = mask.to(logits.device)
            self._cache[key] = mask if per_row else mask[0]
            mask = self._cache[key]
        return mask

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        generated = ctx.num_generated()
        minimum = self.min_new_tokens
        if not isinstance(generated, torch.Tensor) and not isinstance(minimum, torch.Tensor):
            if generated >= minimum:
                return logits
            return logits.masked_fill(self._mask(logits), _NEG_INF)
        if isinstance(minimum, torch.Tensor):
            minimum = minimum.to(logits.device)
        active = torch.as_tensor(generated < minimum, device=logits.device).reshape(-1, 1)
        return logits.masked_fill(active & self._mask(logits), _NEG_INF)


@dataclass(frozen=True)
class VocabularyLimit:
    """Never choose an id at or past ``size``: -inf for every column from ``size`` on.

    Embedding tables are often padded past the tokenizer (to a multiple of 64 or 128); those
    rows were never trained and have no text. The decode request (``request.py``) puts this
    first in every strategy's processor list when the tokenizer is narrower than the model.
    """

    size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", check_knob("size", self.size, lambda v: v >= 1, ">= 1", integer=True))

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if self.size >= logits.shape[-1]:
            return logits
        limited = logits.clone()
        limited[:, self.size :] = _NEG_INF
        return limited


# --------------------------------------------------------------------------------------
# The processor table and the list builders
# --------------------------------------------------------------------------------------


def _floats(values: list, device: Any) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)


def _ints(values: list, device: Any) -> torch.Tensor:
    return torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)


def _listed(values: list, device: Any) -> list:
    return list(values)


def _min_new_tokens(params: SamplingParams, eos: tuple[int, ...]) -> tuple:
    # Off when there is nothing to keep out, as well as at 0.
    enders = tuple(dict.fromkeys(eos + tuple(params.stop_token_ids)))
    return (params.min_new_tokens, enders) if params.min_new_tokens and enders else (0, ())


@dataclass(frozen=True)
class _Stage:
    """One row of the processor table: which ``SamplingParams`` fields build which processor."""

    processor: Callable[..., LogitsProcessor]  # called with the values, in `fields` order
    fields: tuple[str, ...]
    neutral: tuple  # the values that switch it off
    per_row: tuple[Callable[[list, Any], Any], ...]  # per field: a batch's values -> the per-row argument
    sampling_only: bool = False  # a warper: greedy requests leave it out; greedy rows of a batch read `neutral`
    vocab_sized: bool = False  # takes vocab_size=, to refuse out-of-vocabulary ids when built
    read: Callable[[SamplingParams, tuple[int, ...]], tuple] | None = None  # instead of the plain fields

    def values(self, params: SamplingParams, eos: tuple[int, ...]) -> tuple:
        if self.sampling_only and params.greedy:
            return self.neutral
        if self.read is not None:
            return self.read(params, eos)
        return tuple(getattr(params, name) for name in self.fields)

    def build(self, values: Sequence, vocab_size: int | None) -> LogitsProcessor:
        return self.processor(*values, **({"vocab_size": vocab_size} if self.vocab_sized else {}))


# The order of transformers 5.23's `_get_logits_processor`, with the OpenAI penalties next to
# the repetition penalty. `before_sampling` processors go in before the first warper.
_STAGES = (
    _Stage(
        LogitBias,
        ("logit_bias",),
        ({},),
        (_listed,),
        vocab_sized=True,
        read=lambda params, eos: (params.logit_bias or {},),
    ),
    _Stage(RepetitionPenalty, ("repetition_penalty",), (1.0,), (_floats,)),
    _Stage(PresenceFrequencyPenalty, ("presence_penalty", "frequency_penalty"), (0.0, 0.0), (_floats, _floats)),
    _Stage(NoRepeatNGram, ("no_repeat_ngram_size",), (0,), (_ints,)),
    _Stage(MinNewTokens, ("min_new_tokens", "stop_token_ids"), (0, ()), (_ints, _listed), read=_min_new_tokens),
    _Stage(Temperature, ("temperature",), (1.0,), (_floats,), sampling_only=True),
    _Stage(TopK, ("top_k",), (0,), (_ints,), sampling_only=True),
    _Stage(TopP, ("top_p",), (1.0,), (_floats,), sampling_only=True),
    _Stage(MinP, ("min_p",), (0.0,), (_floats,), sampling_only=True),
    _Stage(TypicalP, ("typical_p",), (1.0,), (_floats,), sampling_only=True),
)
_FIRST_WARPER = next(i for i, stage in enumerate(_STAGES) if stage.sampling_only)


def build_processors(
    params: SamplingParams,
    eos_token_ids: int | Sequence[int] | None = None,
    *,
    vocab_size: int | None = None,
    before_sampling: Sequence[LogitsProcessor] = (),
) -> list[LogitsProcessor]:
    """The processors for one request, in the order transformers' ``generate`` applies them.

    Order (``_STAGES``: transformers 5.23 ``_get_logits_processor``, with the OpenAI penalties
    placed next to the repetition penalty):

        LogitBias -> RepetitionPenalty -> PresenceFrequencyPenalty -> NoRepeatNGram ->
        MinNewTokens -> [sampling only] Temperature -> TopK -> TopP -> MinP -> TypicalP

    Knobs at their neutral value are left out. Greedy requests (``temperature == 0``) get no
    warpers, as with transformers' ``do_sample=False``: typical-p could otherwise remove the
    argmax. ``MinNewTokens`` keeps out ``eos_token_ids`` and ``params.stop_token_ids``. Pass
    ``vocab_size`` to reject out-of-vocabulary ``logit_bias`` ids here rather than at the
    first decode step.

    ``before_sampling`` processors (grammar constraints, watermarks) go after the penalties and
    before temperature and the truncation filters, where transformers puts its watermark: a
    truncation filter that ran first could keep only tokens a constraint then forbids.
    """
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    eos = normalise_token_ids(eos_token_ids if eos_token_ids is not None else [], "eos_token_ids")
    processors: list[LogitsProcessor] = []
    for index, stage in enumerate(_STAGES):
        if index == _FIRST_WARPER:
            processors.extend(before_sampling)
        values = stage.values(params, eos)
        if values != stage.neutral:
            processors.append(stage.build(values, vocab_size))
    return processors


def build_batch_processors(
    params: Sequence[SamplingParams],
    eos_token_ids: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> list[LogitsProcessor]:
    """One processor list for a batch whose rows carry different :class:`SamplingParams`.

    Row ``i`` of the result equals ``apply_processors(row_i, ctx_i, build_processors(params[i]))``
    (the same table, per-row tensors instead of scalars; rows that do not use a knob get its
    neutral value). Greedy rows get neutral warper values; the sampler argmaxes them when given
    per-row temperatures (``[p.temperature for p in params]``). ``eos_token_ids`` is one list
    for every row or one list per row. ``device`` is where the per-row tensors live (the
    logits' device, to avoid a copy per token).
    """
    params = list(params)
    if not params or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError("params must be a non-empty sequence of SamplingParams, one per batch row")
    if isinstance(eos_token_ids, Sequence) and eos_token_ids and not is_int(eos_token_ids[0]):
        if len(eos_token_ids) != len(params):
            raise ValueError(f"eos_token_ids has {len(eos_token_ids)} per-row lists for {len(params)} rows")
        eos = [normalise_token_ids(ids, f"eos_token_ids[{i}]") for i, ids in enumerate(eos_token_ids)]
    else:
        eos = [normalise_token_ids(eos_token_ids if eos_token_ids is not None else [], "eos_token_ids")] * len(params)
    processors: list[LogitsProcessor] = []
    for stage in _STAGES:
        rows = [stage.values(p, row_eos) for p, row_eos in zip(params, eos)]
        if all(values == stage.neutral for values in rows):
            continue
        columns = [pack([values[i] for values in rows], device) for i, pack in enumerate(stage.per_row)]
        processors.append(stage.build(columns, vocab_size))
    return processors


def apply_processors(logits: torch.Tensor, ctx: DecodeContext, processors: Sequence[LogitsProcessor]) -> torch.Tensor:
    """Run ``processors`` left to right; the input ``logits`` are never modified."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating (batch, vocab) tensor, got {got}")
    if logits.shape[0] != ctx.batch_size:
        raise ValueError(f"logits have {logits.shape[0]} rows but the context has {ctx.batch_size}")
    for processor in processors:
        logits = processor(logits, ctx)
    return logits
