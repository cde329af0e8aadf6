"""One entry point to every decoding strategy: `decode(strategy, model, tokenizer, prompts, ...)`.

The command line, retrieval-augmented answers and evaluation all decode through it. It takes
the prompts (texts or token ids), the `SamplingParams` and the strategy's options, refuses a
combination the strategy would silently ignore (`DecodeRequestError`) before any work,
resolves one `DecodeRequest`, runs the strategy on it and returns one `Decoded` per output:
text, token ids, finish reason, and the beam score or the speculative statistics where the
strategy has them. `decode_stream` streams the tokens of the "sample" strategy.

Strategies and their options (each checked when built):

    sample                SampleOptions              token by token; temperature 0 is greedy
    beam, diverse-beam    beam.BeamOptions           beam search; diverse-beam needs num_beam_groups > 1
    contrastive           ContrastiveSearchOptions   contrastive search (Su et al. 2022)
    contrastive-decoding  ContrastiveDecodingOptions an expert against an amateur (Li et al. 2023)
    speculative           SpeculativeOptions         a draft model proposes, the model verifies
    prompt-lookup         PromptLookupOptions        drafts copied from the prompt

An encoder-decoder model (`seq2seq.EncoderDecoderTransformer`: T5, BART, Marian) takes the
prompts as its encoder's inputs and decodes with sample, beam and diverse-beam
(`seq2seq.prepare_encoder_decoder`); the other strategies refuse it, saying why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..model import Transformer
from ..seq2seq import EncoderDecoderTransformer
from .beam import BeamOptions, run_beam_search
from .constrained import ChoiceConstraint, JsonSchemaConstraint, RegexConstraint
from .contrastive import (
    ContrastiveDecodingOptions,
    ContrastiveSearchOptions,
    run_contrastive_decoding,
    run_contrastive_search,
)
from .ensemble import ModelEnsemble
from .generator import StreamEvent, continuation_text, generate, stream
from .processors import LogitsProcessor
from .request import DecodeRequest, DecodeRequestError, as_prompt_lists
from .sampling import SamplingParams, make_generator
from .seq2seq import prepare_encoder_decoder
from .speculative import (
    PromptLookupOptions,
    SpeculativeOptions,
    SpeculativeStats,
    run_prompt_lookup,
    run_speculative,
)
from .watermark import Watermark

__all__ = [
    "STRATEGIES",
    "Decoded",
    "SampleOptions",
    "check_strategy",
    "decode",
    "decode_stream",
    "encode_prompts",
]


@dataclass(frozen=True)
class SampleOptions:
    """What may shape the output of token-by-token sampling: at most one grammar constraint
    (`json_schema`, `regex` or `choices`; see `constrained.py`), a `Watermark`, and a
    `ModelEnsemble` of other models choosing each token with the decoding one (`ensemble.py`)."""

    json_schema: Mapping[str, Any] | str | bool | None = None
    regex: str | None = None
    choices: Sequence[str] | None = None
    watermark: Watermark | None = None
    ensemble: ModelEnsemble | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json_schema", "regex", "choices") if getattr(self, name) is not None]
        if len(given) > 1:
            raise DecodeRequestError(f"use one output constraint at a time, got {' and '.join(given)}")
        if self.watermark is not None and not isinstance(self.watermark, Watermark):
            raise DecodeRequestError(f"watermark must be a Watermark, got {type(self.watermark).__name__}")
        if self.ensemble is not None and not isinstance(self.ensemble, ModelEnsemble):
            raise DecodeRequestError(f"ensemble must be a ModelEnsemble, got {type(self.ensemble).__name__}")

    @property
    def constrained(self) -> bool:
        return any(value is not None for value in (self.json_schema, self.regex, self.choices))


# Each strategy's options type, and how messages name its model.
_OPTIONS = {
    "sample": SampleOptions,
    "beam": BeamOptions,
    "diverse-beam": BeamOptions,
    "contrastive": ContrastiveSearchOptions,
    "contrastive-decoding": ContrastiveDecodingOptions,
    "speculative": SpeculativeOptions,
    "prompt-lookup": PromptLookupOptions,
}
STRATEGIES = tuple(_OPTIONS)
_ROLES = {"contrastive-decoding": "expert", "speculative": "target model", "prompt-lookup": "target model"}
# These choose each token from the model's own scores, never from decoded text.
_NO_STOP_STRINGS = ("contrastive", "contrastive-decoding")
_ONE_PROMPT = ("speculative", "prompt-lookup")


@dataclass
class Decoded:
    """One output of `decode`: a completion, or one beam hypothesis."""

    prompt_index: int  # which prompt it continues
    token_ids: list[int]  # generated tokens, the stop token included
    text: str | None  # the continuation's text, cut before any stop string; None without a tokenizer
    finish_reason: str | None  # "stop" (eos, stop token or stop string) or "length"
    score: float | None = None  # beam search: sum of log-probabilities / length ** length_penalty
    stats: SpeculativeStats | None = None  # speculative and prompt lookup: how well the drafts did


def check_strategy(strategy: str, params: SamplingParams, options=None, num_prompts: int = 1):
    """Refuse what `strategy` would silently ignore or cannot do, before any model is loaded;
    return its options (the defaults where `options` is None). `decode` calls it first."""
    if strategy not in _OPTIONS:
        raise DecodeRequestError(f"unknown strategy {strategy!r}; accepted: {', '.join(STRATEGIES)}")
    if not isinstance(params, SamplingParams):
        raise DecodeRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
    kind = _OPTIONS[strategy]
    if options is None:
        options = kind()
    if not isinstance(options, kind):
        raise DecodeRequestError(f"strategy {strategy!r} takes {kind.__name__}, got {type(options).__name__}")
    if strategy == "beam" and options.num_beam_groups > 1:
        raise DecodeRequestError("num_beam_groups > 1 is diverse beam search: use strategy 'diverse-beam'")
    if strategy == "diverse-beam" and options.num_beam_groups == 1:
        raise DecodeRequestError(
            "strategy 'diverse-beam' needs BeamOptions(num_beam_groups > 1, diversity_penalty > 0)"
        )
    if params.stop and strategy in _NO_STOP_STRINGS:
        raise DecodeRequestError(f"stop strings are not supported by strategy {strategy!r}; use stop_token_ids")
    if strategy in _ONE_PROMPT and num_prompts != 1:
        raise DecodeRequestError(f"strategy {strategy!r} decodes one prompt at a time, got {num_prompts}")
    return options


def encode_prompts(tokenizer, texts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
    """Token ids of prompt texts, encoded with the tokenizer's special tokens; with `chat`,
    each text becomes a user turn of the tokenizer's chat template instead."""
    if tokenizer is None:
        raise DecodeRequestError("prompts given as text need a tokenizer; pass it, or give token ids")
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DecodeRequestError("the tokenizer has no chat template; encode the prompts without chat")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts
        ]
    return [tokenizer.encode(t, add_special_tokens=not chat) for t in texts]


def decode(
    strategy: str,
    model: Transformer,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    options=None,
    *,
    eos_token_ids: Sequence[int] | None = None,
    generation_config: Mapping[str, Any] | None = None,
    kv_cache_dtype: str = "auto",
) -> list[Decoded]:
    """Decode `prompts` (texts, or token ids) with `strategy` (one of `STRATEGIES`).

    params: how to pick tokens (default `SamplingParams()`: plain sampling). Penalties and
        bans apply to every strategy; temperature and the truncation filters to those that
        sample (sample, speculative, prompt lookup, beam with `do_sample`, contrastive decoding
        at a temperature > 0); `top_k` is contrastive search's candidate count unless its
        options give one.
    options: the strategy's options object (module docstring); None takes its defaults.
    tokenizer: needed for text prompts, stop strings, constraints and the outputs' text; None
        decodes token ids only.
    eos_token_ids, generation_config: as `DecodeRequest.resolve` takes them.
    kv_cache_dtype: what the KV caches store: "auto" (the model's dtype) or "int8" (int8 codes
        with an fp32 scale per token and head, about a quarter of the memory;
        `cache.Int8ContiguousKVCache`). Every strategy takes it, for each model it decodes with.

    Returns the outputs in prompt order (beam search: `num_return_sequences` per prompt, best
    first).
    """
    model, request, options, extra = _prepare(
        strategy, model, tokenizer, prompts, params, options, eos_token_ids, generation_config, kv_cache_dtype
    )
    if strategy == "sample":
        done = [
            (i, c.token_ids, c.text, c.finish_reason, {})
            for i, c in enumerate(generate(model, request, extra_processors=extra))
        ]
    elif strategy in ("beam", "diverse-beam"):
        # Beam search ranks whole sequences; temperature and the truncation filters shape it
        # only when beam sampling draws the candidates (as in transformers).
        sampled = options.do_sample and not request.params.greedy
        generator = make_generator(request.params.seed, model.device) if sampled else None
        beams = run_beam_search(
            model, request, dataclasses.replace(options, do_sample=sampled), processors=extra, generator=generator
        )
        done = [
            (i, h.token_ids, h.text, h.finish_reason, {"score": h.score})
            for i, hypotheses in enumerate(beams)
            for h in hypotheses
        ]
    elif strategy in ("contrastive", "contrastive-decoding"):
        run = run_contrastive_search if strategy == "contrastive" else run_contrastive_decoding
        done = [(i, c.token_ids, c.text, c.finish_reason, {}) for i, c in enumerate(run(model, request, options))]
    else:
        run = run_speculative if strategy == "speculative" else run_prompt_lookup
        out = run(model, request, options)
        done = [(0, out.token_ids, out.text, out.finish_reason, {"stats": out.stats})]
    results = []
    for index, token_ids, text, reason, more in done:
        if text is None and request.tokenizer is not None:
            text = continuation_text(request.tokenizer, request.prompts[index], token_ids)
        results.append(Decoded(index, token_ids, text, reason, **more))
    return results


def decode_stream(
    strategy: str,
    model: Transformer,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    options=None,
    *,
    eos_token_ids: Sequence[int] | None = None,
    generation_config: Mapping[str, Any] | None = None,
    kv_cache_dtype: str = "auto",
) -> Iterator[StreamEvent]:
    """`decode`, streamed: a `StreamEvent` per generated token. Only "sample" decodes token by
    token; the request is checked here, before the first event is asked for."""
    if strategy != "sample":
        raise DecodeRequestError(f"only strategy 'sample' streams tokens; decode() returns {strategy!r}'s outputs")
    model, request, _, extra = _prepare(
        strategy, model, tokenizer, prompts, params, options, eos_token_ids, generation_config, kv_cache_dtype
    )
    return stream(model, request, extra_processors=extra)


def _prepare(strategy, model, tokenizer, prompts, params, options, eos_token_ids, generation_config, kv_cache_dtype):
    """The model to decode with (an encoder-decoder model's bound decoder), the checked request,
    the strategy's options and the extra processors (the sample strategy's constraints and
    watermark; an encoder-decoder model's forced tokens)."""
    params = SamplingParams() if params is None else params
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, str) for p in prompts):
        prompts = encode_prompts(tokenizer, prompts)
    prompts = as_prompt_lists(prompts)
    options = check_strategy(strategy, params, options, len(prompts))
    extra: list[LogitsProcessor] = []
    if isinstance(model, EncoderDecoderTransformer):
        model, request, extra = prepare_encoder_decoder(
            strategy,
            model,
            tokenizer,
            prompts,
            params,
            options,
            eos_token_ids=eos_token_ids,
            generation_config=generation_config,
            kv_cache_dtype=kv_cache_dtype,
        )
    else:
        request = DecodeRequest.resolve(
            model,
            prompts,
            params,
            tokenizer=tokenizer,
            eos_token_ids=eos_token_ids,
            generation_config=generation_config,
            kv_cache_dtype=kv_cache_dtype,
            role=_ROLES.get(strategy, "model"),
        )
    if strategy == "sample":
        if options.constrained and tokenizer is None:
            raise DecodeRequestError("output constraints need the tokenizer, to know each token's text")
        eos = list(request.eos_token_ids)
        if options.ensemble is not None:
            extra.append(options.ensemble)
        if options.json_schema is not None:
            extra.append(JsonSchemaConstraint(options.json_schema, tokenizer, eos_token_ids=eos))
        elif options.regex is not None:
            extra.append(RegexConstraint(options.regex, tokenizer, eos_token_ids=eos))
        elif options.choices is not None:
            extra.append(ChoiceConstraint(options.choices, tokenizer, eos_token_ids=eos))
        if options.watermark is not None:
            extra.append(options.watermark)
    return model, request, options, extra
