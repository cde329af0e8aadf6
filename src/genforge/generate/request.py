"""The decode request: what every decoding strategy and the serving engine check once.

A request is resolved from what its caller gives (prompt ids, sampling parameters, the
tokenizer, the model's config) into one checked object, and refused with a typed error that
names what was wrong and what is accepted. Callers tell error kinds apart by type, never by
reading the message.

Resolving a request settles, before any work:

- the prompts: token-id lists, none empty, every id inside the model's vocabulary;
- the end-of-sequence ids: the model config's, the tokenizer's and generation_config.json's
  (or the caller's own list instead), plus ``params.stop_token_ids``;
- ``max_new_tokens``: the caller's, or what the context leaves after the longest prompt;
- the context limit: prompt plus new tokens must fit (``ContextLengthError``);
- the vocabulary limit: ids the model can score but the tokenizer has no text for (padded
  embedding rows) are never chosen. ``DecodeRequest.logits_processors`` (and
  ``batch_logits_processors`` for a batch of requests) is the one place that applies it, as a
  ``VocabularyLimit`` processor first in every strategy's list;
- what the serving engine also asks: stop strings need a tokenizer, ``logit_bias`` ids and the
  ``logprobs`` counts are in range;
- what the KV cache stores (``kv_cache_dtype``: ``"auto"``, the model's dtype, or ``"int8"``,
  `cache.Int8ContiguousKVCache`); ``DecodeRequest.kv_cache`` makes every strategy's cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import KV_CACHE_DTYPES, ContiguousKVCache, Int8ContiguousKVCache, make_kv_cache
from ..config import Config
from .processors import LogitsProcessor, VocabularyLimit, build_batch_processors, build_processors
from .sampling import SamplingParams
from .validation import is_int

__all__ = [
    "DecodeRequestError",
    "ContextLengthError",
    "DecodeRequest",
    "as_prompt_lists",
    "batch_logits_processors",
    "decoder_config",
    "end_of_sequence_ids",
]

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class DecodeRequestError(ValueError):
    """A request that cannot be decoded as given; the message says what to change."""


class ContextLengthError(DecodeRequestError):
    """The prompt, or the prompt plus the tokens asked for, does not fit the model's context.

    Carries the numbers, so that a server can phrase the error in its own API's words.
    """

    def __init__(self, message: str, *, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length


@dataclass(frozen=True)
class DecodeRequest:
    """One checked decode request for a batch of prompts; build it with `DecodeRequest.resolve`.

    Every strategy takes one (`generator.generate(model, request)`, `beam.run_beam_search`, ...)
    and checks nothing of it again.
    """

    prompts: list[list[int]]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]  # sorted: every id that ends a sequence, stop_token_ids included
    max_new_tokens: int
    context_length: int  # prompt + new tokens may not exceed it
    vocab_size: int  # the model's: the width of its logits
    vocab_limit: int  # ids at or past it are never chosen (the tokenizer's size where it is narrower)
    tokenizer: Any = None  # needed for stop strings and text
    logprobs: int | None = None  # the chosen token's logprob and the top n (OpenAI `top_logprobs`)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    kv_cache_dtype: str = "auto"  # what the KV cache stores: "auto" (the model's dtype) or "int8"

    @classmethod
    def resolve(
        cls,
        model,
        prompts: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        *,
        tokenizer=None,
        eos_token_ids: Sequence[int] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | str = (),
        context_length: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        kv_cache_dtype: str = "auto",
        role: str = "model",
    ) -> DecodeRequest:
        """Check and settle a request for `model` (a genforge Transformer), or raise
        `DecodeRequestError` (`ContextLengthError` when it does not fit the context).

        params: how to pick tokens. None for the strategies that choose by score alone (beam
            and contrastive search called with bare arguments); they give `max_new_tokens`
            and `stop` strings here instead.
        eos_token_ids: the ids that end a sequence, replacing the model config's, the
            tokenizer's and `generation_config`'s (`[]` for none); `params.stop_token_ids` are
            added either way.
        context_length: the limit on prompt + new tokens (default: the model's context,
            `Config.max_context`: past `max_position_embeddings` only under dynamic RoPE scaling).
        kv_cache_dtype: what the strategies' KV caches store, one of `cache.KV_CACHE_DTYPES`:
            "auto" (keys and values in the model's dtype) or "int8" (int8 codes with an fp32
            scale per token and head; `cache.Int8ContiguousKVCache`).
        role: how messages name the model ("target model", "expert").
        """
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise DecodeRequestError(
                f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}; got {kv_cache_dtype!r}"
            )
        if params is None:
            if max_new_tokens is not None and not (is_int(max_new_tokens) and max_new_tokens >= 1):
                raise DecodeRequestError(
                    f"max_new_tokens must be an integer >= 1 (None: to the end of the context), got {max_new_tokens!r}"
                )
            try:
                params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=stop)
            except ValueError as err:
                raise DecodeRequestError(str(err)) from None
            end_names = "eos_token_ids"
        elif not isinstance(params, SamplingParams):
            raise DecodeRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        elif max_new_tokens is not None or stop:
            raise DecodeRequestError("give max_new_tokens and stop strings in params when there are params")
        else:
            end_names = "eos/stop token ids"
        config = decoder_config(model, role)
        vocab = config.vocab_size
        prompts = as_prompt_lists(prompts)
        for i, prompt in enumerate(prompts):
            bad = [t for t in prompt if not is_int(t) or not 0 <= t < vocab]
            if bad:
                raise DecodeRequestError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        prompts = [[int(t) for t in prompt] for prompt in prompts]
        if params.stop and tokenizer is None:
            raise DecodeRequestError("stop strings need a tokenizer to detect them; pass tokenizer=")
        generation_eos = (generation_config or {}).get("eos_token_id")
        eos = end_of_sequence_ids(config, tokenizer, generation_eos, override=eos_token_ids)
        eos |= set(params.stop_token_ids)
        if not all(is_int(t) for t in eos):
            raise DecodeRequestError(f"{end_names} must be integer token ids, got {sorted(eos, key=repr)}")
        bad_eos = sorted(t for t in eos if not 0 <= t < vocab)
        if bad_eos:
            raise DecodeRequestError(f"{end_names} {bad_eos} are outside the vocabulary [0, {vocab})")
        bad_bias = sorted(t for t in params.logit_bias or {} if t >= vocab)
        if bad_bias:
            raise DecodeRequestError(f"logit_bias has token ids outside the vocabulary [0, {vocab}): {bad_bias[:10]}")
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            most = min(MAX_LOGPROBS, vocab)
            if value is not None and not (is_int(value) and 0 <= value <= most):
                raise DecodeRequestError(f"{name} must be between 0 and {most}, got {value!r}")

        context = config.max_context if context_length is None else context_length
        longest = max(len(p) for p in prompts)
        new_tokens = params.max_new_tokens
        if new_tokens is None:  # until the context is full, as in the OpenAI API
            new_tokens = context - longest
            if new_tokens < 1:
                raise ContextLengthError(
                    f"the prompt of {longest} tokens fills the {role}'s context of {context} tokens; leave room "
                    "for at least one new token",
                    prompt_tokens=longest,
                    max_new_tokens=0,
                    context_length=context,
                )
        request = cls(
            prompts=prompts,
            params=params,
            eos_token_ids=tuple(sorted(eos)),
            max_new_tokens=new_tokens,
            context_length=context,
            vocab_size=vocab,
            vocab_limit=min(tokenizer.vocab_size, vocab) if tokenizer is not None else vocab,
            tokenizer=tokenizer,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            kv_cache_dtype=kv_cache_dtype,
        )
        request._check_fits(context, role)
        return request

    def check_model(self, model, role: str) -> None:
        """Refuse a second model of a strategy (a draft, an amateur) that is no causal genforge
        model or whose context cannot hold this request."""
        self._check_fits(decoder_config(model, role).max_context, role)

    def _check_fits(self, context: int, role: str) -> None:
        if self.capacity > context:
            raise ContextLengthError(
                f"prompt of {self.longest_prompt} tokens + max_new_tokens {self.max_new_tokens} = {self.capacity} "
                f"exceeds the {role}'s context of {context} tokens; shorten the prompt or lower max_new_tokens",
                prompt_tokens=self.longest_prompt,
                max_new_tokens=self.max_new_tokens,
                context_length=context,
            )

    @property
    def longest_prompt(self) -> int:
        return max(len(p) for p in self.prompts)

    @property
    def capacity(self) -> int:
        """Tokens the longest row can reach: the size of its KV cache."""
        return self.longest_prompt + self.max_new_tokens

    def kv_cache(self, model, batch_size: int, capacity: int) -> ContiguousKVCache | Int8ContiguousKVCache:
        """A contiguous KV cache for `model` (the request's, or a strategy's second model) of
        `batch_size` rows and `capacity` positions, storing what `kv_cache_dtype` says. A model
        that makes its own cache (an encoder-decoder model's bound decoder,
        `seq2seq.BoundDecoder.make_kv_cache`) is asked for it."""
        make_own = getattr(model, "make_kv_cache", None)
        if make_own is not None:
            return make_own(batch_size, capacity, self.kv_cache_dtype)
        return make_kv_cache(
            model.config, batch_size, capacity, model.dtype, model.device, kv_cache_dtype=self.kv_cache_dtype
        )

    def logits_processors(
        self, extra: Sequence[LogitsProcessor] = (), *, sampling: bool = True
    ) -> list[LogitsProcessor]:
        """The request's processors: the vocabulary limit (where the tokenizer is narrower than
        the model), then `build_processors(params)` with `extra` (constraints, watermarks)
        before the warpers. `sampling=False` leaves out temperature and the truncation filters,
        for the strategies that choose by score (beam search, contrastive search)."""
        params = self.params if sampling or self.params.greedy else dataclasses.replace(self.params, temperature=0.0)
        processors = build_processors(params, self.eos_token_ids, vocab_size=self.vocab_size, before_sampling=extra)
        if self.vocab_limit < self.vocab_size:
            processors.insert(0, VocabularyLimit(self.vocab_limit))
        return processors


def batch_logits_processors(
    requests: Sequence[DecodeRequest], device: torch.device | str | None = None
) -> list[LogitsProcessor]:
    """One processor list for a batch of requests to one model (the serving engine's batch):
    row i equals `requests[i].logits_processors()` applied to it alone. The vocabulary limit
    comes first, as there; `processors.build_batch_processors` gives the rest, with per-row
    values on `device`."""
    if not requests:
        raise DecodeRequestError("a batch needs at least one request")
    first = requests[0]
    if any((r.vocab_size, r.vocab_limit) != (first.vocab_size, first.vocab_limit) for r in requests):
        raise DecodeRequestError("the requests of one batch must be resolved for one model and tokenizer")
    processors = build_batch_processors(
        [r.params for r in requests], [r.eos_token_ids for r in requests], vocab_size=first.vocab_size, device=device
    )
    if first.vocab_limit < first.vocab_size:
        processors.insert(0, VocabularyLimit(first.vocab_limit))
    return processors


def as_prompt_lists(prompts) -> list[list[int]]:
    """Prompts as a list of token-id lists, from one list, a list of lists or a 1-D/2-D tensor."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise DecodeRequestError(f"prompts must be token-id lists, got {type(prompts).__name__}; encode text first")
    if prompts and is_int(prompts[0]):
        prompts = [prompts]
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    if not prompts:
        raise DecodeRequestError("no prompts given; pass a list of token-id lists")
    for i, p in enumerate(prompts):
        if not p:
            raise DecodeRequestError(
                f"prompt {i} is empty; every prompt needs at least one token (a BOS token will do)"
            )
    return prompts


def end_of_sequence_ids(config, tokenizer=None, *more, override=None) -> set[int]:
    """Every id that ends a sequence: the model config's, the tokenizer's, and any `more` (an
    id or a list of ids, such as generation_config.json's `eos_token_id`). A caller's explicit
    list (`override`, [] for none) replaces them all."""
    if override is not None:
        return set(override)
    ids: set[int] = set()
    for source in (config.eos_token_id, getattr(tokenizer, "eos_token_id", None), *more):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


def decoder_config(model, role: str) -> Config:
    """The config of `model`, refused unless it is a causal genforge model."""
    config = getattr(model, "config", None)
    if not isinstance(config, Config):
        raise DecodeRequestError(f"the {role} must be a genforge Transformer, got {type(model).__name__}")
    if not config.causal:
        raise DecodeRequestError(f"the {role} ({config.family}) is an encoder; decoding needs a causal language model")
    return config
