"""Decoding an encoder-decoder model (T5, BART, Marian) with the decoder-only strategies.

The prompts are the encoder's inputs. They are encoded once, right-padded, and every decoder
layer's cross-attention keys and values computed from them (`seq2seq.CrossAttentionCache`);
the decoder then starts from `decoder_start_token_id` alone. `seq2seq.BoundDecoder` is that
decoder called as a decoder-only model is, and it makes its own `EncoderDecoderCache`, so
sampling, greedy decoding and beam search (`generator.py`, `beam.py`) run it unchanged, with
the same processors and the same decode request. The result is token for token transformers'
`generate` for encoder-decoder models, whose `max_length` counts the start token.

Two processors of transformers' generation config that these families set by default are
applied as it does: `forced_bos_token_id` (the first generated token) and
`forced_eos_token_id` (the token at the last allowed step). Strategies that need a
decoder-only model (a draft or amateur over the same token sequence, drafts copied from the
prompt, contrastive search's rescoring, an ensemble) are refused with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..seq2seq import BoundDecoder, EncoderDecoderTransformer, EncoderDecoderUnsupported
from .processors import DecodeContext, LogitsProcessor
from .request import DecodeRequest, DecodeRequestError
from .sampling import SamplingParams

__all__ = [
    "ENCODER_DECODER_STRATEGIES",
    "ForcedToken",
    "check_encoder_decoder_strategy",
    "encode_sources",
    "forced_token_processors",
    "prepare_encoder_decoder",
]

ENCODER_DECODER_STRATEGIES = ("sample", "beam", "diverse-beam")
# Why each other strategy needs a decoder-only model.
_DECODER_ONLY_STRATEGIES = {
    "speculative": "a draft model proposes continuations of the one token sequence the target reads, and an "
    "encoder-decoder model's output is conditioned on a separate encoded input",
    "prompt-lookup": "its drafts are copied from the prompt, which an encoder-decoder model encodes rather "
    "than continues",
    "contrastive": "its degeneration penalty compares a candidate with the hidden states of the whole "
    "sequence, the prompt included, and here the prompt is in another stack",
    "contrastive-decoding": "the amateur model scores the same token sequence as the expert",
}


@dataclass(frozen=True)
class ForcedToken:
    """transformers' ForcedBOSTokenLogitsProcessor / ForcedEOSTokenLogitsProcessor: at generated
    step `step` (0 = the first new token), every token but `token_ids` gets -inf and those get 0."""

    token_ids: tuple[int, ...]
    step: int

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if ctx.input_ids.shape[1] - ctx.prompt_length != self.step:
            return logits
        forced = torch.full_like(logits, -math.inf)
        forced[:, list(self.token_ids)] = 0.0
        return forced


def forced_token_processors(
    config, generation_config: Mapping[str, Any] | None, max_new_tokens: int
) -> list[LogitsProcessor]:
    """The forced-BOS and forced-EOS processors `generation_config` (else the model's
    config.json) asks for, at the first and the last of `max_new_tokens` steps."""
    processors: list[LogitsProcessor] = []
    generation_config = generation_config or {}
    for key, step in (("forced_bos_token_id", 0), ("forced_eos_token_id", max_new_tokens - 1)):
        token = generation_config.get(key, config.hf_extra.get(key))
        if token is None:
            continue
        ids = (token,) if isinstance(token, int) else tuple(token)
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < config.vocab_size)]
        if bad:
            raise DecodeRequestError(f"{key} {bad} is not a token id of the vocabulary [0, {config.vocab_size})")
        processors.append(ForcedToken(ids, step))
    return processors


def check_encoder_decoder_strategy(config, strategy: str, options=None, *, ensemble: bool = False) -> None:
    """Refuse, before any weights load, a strategy or option an encoder-decoder model (config)
    cannot decode with, naming it and why; nothing for a decoder-only config."""
    if not config.encoder_decoder:
        return
    if strategy in _DECODER_ONLY_STRATEGIES:
        raise EncoderDecoderUnsupported(
            f"strategy {strategy!r} needs a decoder-only model, and {config.family} is an encoder-decoder model: "
            f"{_DECODER_ONLY_STRATEGIES[strategy]}. Use one of {', '.join(ENCODER_DECODER_STRATEGIES)}"
        )
    if ensemble or getattr(options, "ensemble", None) is not None:
        raise EncoderDecoderUnsupported(
            f"an ensemble needs decoder-only models, and {config.family} is an encoder-decoder model: the "
            "ensembled models continue one shared token sequence"
        )


def encode_sources(
    model: EncoderDecoderTransformer, sources: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder inputs as a right-padded (batch, longest) id tensor and its attention mask,
    checked against the vocabulary and the encoder's positions."""
    config = model.config
    longest = max(len(s) for s in sources)
    if config.position in ("learned", "sinusoidal") and longest > config.max_position_embeddings:
        raise DecodeRequestError(
            f"an input of {longest} tokens is longer than the {config.max_position_embeddings} positions "
            f"{config.family}'s encoder has; shorten it"
        )
    for i, source in enumerate(sources):
        bad = [t for t in source if not 0 <= t < config.vocab_size]
        if bad:
            raise DecodeRequestError(
                f"prompt {i} has token ids outside the vocabulary [0, {config.vocab_size}): {bad[:5]}"
            )
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.full((len(sources), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(sources), longest, dtype=torch.long)
    for i, source in enumerate(sources):
        ids[i, : len(source)] = torch.tensor(source, dtype=torch.long)
        mask[i, : len(source)] = 1
    return ids.to(model.device), mask.to(model.device)


def prepare_encoder_decoder(
    strategy: str,
    model: EncoderDecoderTransformer,
    tokenizer,
    sources: list[list[int]],
    params: SamplingParams,
    options,
    *,
    eos_token_ids: Sequence[int] | None = None,
    generation_config: Mapping[str, Any] | None = None,
    kv_cache_dtype: str = "auto",
) -> tuple[BoundDecoder, DecodeRequest, list[LogitsProcessor]]:
    """Encode `sources` (the prompts, token ids) once and return what a decoder-only strategy
    runs on: the bound decoder, the request of its start tokens (one per source, so its outputs
    are in prompt order) and the forced-token processors. `decode.decode` calls it."""
    config = model.config
    check_encoder_decoder_strategy(config, strategy, options)
    start = config.decoder_start_token_id
    if start is None:
        raise DecodeRequestError(
            f"the {config.family} model's config.json has no decoder_start_token_id (the decoder's first input)"
        )
    ids, mask = encode_sources(model, sources)
    with torch.inference_mode():
        decoder = model.bind(ids, mask)
    request = DecodeRequest.resolve(
        decoder,
        [[start] for _ in sources],
        params,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        generation_config=generation_config,
        kv_cache_dtype=kv_cache_dtype,
        role="decoder",
    )
    return decoder, request, forced_token_processors(config, generation_config, request.max_new_tokens)
