"""Autoregressive generation with a KV cache: batched, streamed, stoppable.

One loop serves every sampling setting. Each step runs the model on the newest token of
every unfinished row (the whole prompt on the first step), turns the last logits into the
next token through the logits processors (`processors.py`), and checks the stop
conditions: an end-of-sequence or stop token id, a stop string, or `max_new_tokens`.
Rows of a batch are left-padded so that every row's newest token sits in the same column;
a row that finishes leaves the batch at once, so it costs no further compute.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model import Transformer
from .processors import DecodeContext, LogitsProcessor, apply_processors
from .request import DecodeRequest, DecodeRequestError
from .sampling import SamplingParams, make_generator, sample_next_token


@dataclass
class Completion:
    """What generation produced for one prompt."""

    token_ids: list[int] = field(default_factory=list)  # generated tokens, stop token included
    # decode(prompt + generated) minus decode(prompt), cut before any stop string (needs a tokenizer)
    text: str | None = None
    finish_reason: str | None = None  # "stop" (eos, stop token or stop string) or "length"


@dataclass
class StreamEvent:
    """One generated token of one row, and the text it completed (may be empty while a
    multi-byte character is still incomplete)."""

    row: int
    token_id: int
    text: str
    finish_reason: str | None


def stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor | DecodeRequest,
    params: SamplingParams | None = None,
    tokenizer=None,
    eos_token_ids: Sequence[int] | None = None,
    extra_processors: Sequence[LogitsProcessor] = (),
) -> Iterator[StreamEvent]:
    """Yield a `StreamEvent` per generated token, for a batch of prompts given as token ids.

    Stop strings need `tokenizer`; eos ids default to the tokenizer's and the model config's.
    `prompts` may also be a resolved `DecodeRequest`, which holds the params, tokenizer and
    eos ids (give none of them then). `extra_processors` (a `watermark.Watermark`, a
    `constrained` grammar) run after the penalties `params` builds and before its temperature
    and truncation filters.
    """
    request = _request(model, prompts, params, tokenizer, eos_token_ids)
    params, tokenizer, prompts = request.params, request.tokenizer, request.prompts
    eos = set(request.eos_token_ids)
    longest, max_new_tokens, capacity = request.longest_prompt, request.max_new_tokens, request.capacity
    processors = request.logits_processors(extra_processors)
    # Greedy decoding draws no random numbers, and seeding from the OS has a cost (docs/decoding.md).
    generator = None if params.greedy else make_generator(params.seed, model.device)

    device, batch = model.device, len(prompts)
    # Without left padding the model needs no attention mask: positions count from the first
    # column and every key may be seen, which is what it assumes when given none (the same
    # positions and attention, without rebuilding them from the mask at every step). The mask
    # is still kept for the logits processors, which read it.
    padded = any(len(p) != longest for p in prompts)
    # Token history and attention mask, preallocated: each step writes one column.
    tokens = torch.zeros(batch, capacity, dtype=torch.long, device=device)
    mask = torch.zeros(batch, capacity, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) : longest] = torch.tensor(p)
        mask[i, longest - len(p) : longest] = 1
    cache = request.kv_cache(model, batch, capacity)
    detokenizers = [stop_watcher(tokenizer, params, prompt) for prompt in prompts]
    rows = list(range(batch))  # original row index of each active batch position
    length = longest

    with torch.inference_mode():
        step_input = tokens[:, :longest]
        for step in range(max_new_tokens):
            out = model(step_input, attention_mask=mask[:, :length] if padded else None, cache=cache, logits_to_keep=1)
            logits = out.logits[:, -1].float()
            if processors:
                context = DecodeContext(
                    input_ids=tokens[:, :length], prompt_length=longest, attention_mask=mask[:, :length]
                )
                logits = apply_processors(logits, context, processors)
            next_tokens = sample_next_token(logits, params, generator)
            tokens[:, length] = next_tokens
            mask[:, length] = 1
            length += 1

            finished = []
            for pos, token in enumerate(next_tokens.tolist()):
                text, hit_stop = detokenizers[pos].push(token)
                reason = None
                if token in eos or hit_stop:
                    reason = "stop"
                elif step == max_new_tokens - 1:
                    reason = "length"
                if reason and not hit_stop:
                    text += detokenizers[pos].flush()
                yield StreamEvent(rows[pos], token, text, reason)
                if reason:
                    finished.append(pos)
            if len(finished) == len(rows):
                return
            if finished:
                keep = torch.tensor([p for p in range(len(rows)) if p not in finished], device=device)
                cache.select(keep)
                tokens, mask = tokens.index_select(0, keep), mask.index_select(0, keep)
                rows = [rows[p] for p in keep.tolist()]
                detokenizers = [detokenizers[p] for p in keep.tolist()]
            step_input = tokens[:, length - 1 : length]


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor | DecodeRequest,
    params: SamplingParams | None = None,
    tokenizer=None,
    eos_token_ids: Sequence[int] | None = None,
    extra_processors: Sequence[LogitsProcessor] = (),
) -> list[Completion]:
    """Generate for a batch of prompts (token-id lists, or a resolved `DecodeRequest`); one
    `Completion` per prompt. `extra_processors`: as in `stream`."""
    request = _request(model, prompts, params, tokenizer, eos_token_ids)
    texts = request.tokenizer is not None
    completions = [Completion(text="" if texts else None) for _ in request.prompts]
    for event in stream(model, request, extra_processors=extra_processors):
        done = completions[event.row]
        done.token_ids.append(event.token_id)
        if texts:
            done.text += event.text
        done.finish_reason = event.finish_reason
    return completions


def _request(model, prompts, params, tokenizer, eos_token_ids) -> DecodeRequest:
    """`prompts` when it is already a request; else the request the arguments make."""
    if not isinstance(prompts, DecodeRequest):
        return DecodeRequest.resolve(
            model, prompts, params or SamplingParams(), tokenizer=tokenizer, eos_token_ids=eos_token_ids
        )
    given = [
        name
        for name, value in (("params", params), ("tokenizer", tokenizer), ("eos_token_ids", eos_token_ids))
        if value is not None
    ]
    if given:
        raise DecodeRequestError(
            f"{' and '.join(given)} given with a resolved DecodeRequest, which holds them "
            "already; give them to DecodeRequest.resolve"
        )
    return prompts


def continuation_text(tokenizer, prompt: Sequence[int], token_ids: Sequence[int]) -> str:
    """decode(prompt + token_ids) minus decode(prompt): the text of a completion, spaced as it
    is after the prompt (special tokens skipped)."""
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    decoder.prime(prompt)
    return "".join(decoder.step(t) for t in token_ids) + decoder.finish()


class StopStringWatcher:
    """Detokenizes one sequence incrementally and cuts its text at the first stop string.

    Text that could be the start of a stop string is held back until it is clearly not one,
    so a streamed client never sees part of a stop string.
    """

    def __init__(self, tokenizer, params: SamplingParams, prompt: list[int]) -> None:
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.decoder.prime(prompt)
        self.stops = [s for s in (params.stop or []) if s]
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += self.decoder.step(token)
        hits = [at for at in (self.pending.find(stop) for stop in self.stops) if at >= 0]
        if hits:
            self.stopped = True
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        hold = max((_overlap(self.pending, stop) for stop in self.stops), default=0)
        text, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending + self.decoder.finish(), ""
        return text


class _NoText:
    def push(self, token: int) -> tuple[str, bool]:
        return "", False

    def flush(self) -> str:
        return ""


def stop_watcher(tokenizer, params, prompt):
    """A `StopStringWatcher`, or a watcher that yields no text when there is no tokenizer."""
    return StopStringWatcher(tokenizer, params, prompt) if tokenizer is not None else _NoText()


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
