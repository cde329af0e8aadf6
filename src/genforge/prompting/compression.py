"""Prompt compression: drop the words a small language model finds predictable, under a token budget.

LLMLingua (Jiang et al. 2023, "LLMLingua: Compressing Prompts for Accelerated Inference of Large
Language Models") observes that a token a small causal LM predicts well carries little
information for a large one: its surprisal `-log p(token | text before it)` is low. Dropping the
least surprising tokens first shortens a long context (retrieved passages, demonstrations)
while keeping what a reader could not have guessed: names, numbers, rare words. The
instruction and the question must reach the model intact, so they are never dropped.

How genforge does it:
- The prompt is split into regions: text between `<keep>` and `</keep>` (the markers are
  removed) is never dropped; the rest is compressible. `compress_prompt` also takes the
  regions as `Segment`s.
- The whole prompt is scored once by the small LM (strided windows when it is longer than the
  model's context, as `genforge.evaluate.perplexity` reads long texts), so each token's
  surprisal is conditioned on everything before it, kept regions included.
- The unit dropped is a word (a run of non-space characters with the space before it), not a
  sub-word piece, so what survives still reads as words. A word's score is its tokens' mean
  surprisal: keeping the most information per token spent, the greedy answer to "which words
  fit in the budget". Words are dropped lowest score first until the prompt, counted again with
  the tokenizer, fits `budget` tokens. A line break inside a dropped word's leading space is
  kept, so the layout of the prompt survives.
- A budget that the kept regions alone exceed is refused (never a truncated question).

LLMLingua adds a coarse, demonstration-level pass and re-scores each segment conditioned on
the compressed text before it (iterative compression); this is the single-pass, token-level
core, on which those refinements build. `RandomScorer` drops words at random at the same
budget: the baseline `benchmarks/prompt_compression.py` compares against.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

__all__ = [
    "KEEP_CLOSE",
    "KEEP_OPEN",
    "CausalLMScorer",
    "CompressionError",
    "CompressionResult",
    "RandomScorer",
    "Segment",
    "TokenScorer",
    "compress_prompt",
    "split_marked",
]

KEEP_OPEN, KEEP_CLOSE = "<keep>", "</keep>"
_WORD = re.compile(r"\s*\S+|\s+$")


class CompressionError(ValueError):
    """A prompt or budget that cannot be compressed as asked."""


@dataclass(frozen=True)
class Segment:
    """A region of the prompt; `keep=True` regions are never dropped from."""

    text: str
    keep: bool = False


def split_marked(text: str) -> list[Segment]:
    """Regions of `text`: `<keep>...</keep>` spans (markers removed) are kept, the rest compressible."""
    segments: list[Segment] = []
    position = 0
    while True:
        start = text.find(KEEP_OPEN, position)
        stray = text.find(KEEP_CLOSE, position)
        if stray != -1 and (start == -1 or stray < start):
            raise CompressionError(f"a {KEEP_CLOSE} at character {stray} closes no {KEEP_OPEN}")
        if start == -1:
            break
        end = text.find(KEEP_CLOSE, start + len(KEEP_OPEN))
        if end == -1:
            raise CompressionError(f"the {KEEP_OPEN} at character {start} is never closed by {KEEP_CLOSE}")
        nested = text.find(KEEP_OPEN, start + len(KEEP_OPEN), end)
        if nested != -1:
            raise CompressionError(f"{KEEP_OPEN} regions do not nest (another opens at character {nested})")
        if start > position:
            segments.append(Segment(text[position:start]))
        segments.append(Segment(text[start + len(KEEP_OPEN) : end], keep=True))
        position = end + len(KEEP_CLOSE)
    if position < len(text):
        segments.append(Segment(text[position:]))
    return [s for s in segments if s.text]


class TokenScorer(Protocol):
    """Surprisal per token of a text: `(start, end, nats)` character spans in order."""

    def token_surprisals(self, text: str) -> list[tuple[int, int, float]]: ...

    def count_tokens(self, text: str) -> int: ...


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    backend = getattr(tokenizer, "backend", tokenizer)
    if not callable(getattr(backend, "encode", None)):
        raise CompressionError(f"the scorer needs a genforge or `tokenizers` tokenizer, got {type(tokenizer).__name__}")
    encoding = backend.encode(text, add_special_tokens=False)
    if not hasattr(encoding, "offsets"):
        raise CompressionError("the tokenizer gives no character offsets; use a genforge or `tokenizers` tokenizer")
    return list(encoding.ids), [tuple(o) for o in encoding.offsets]


class CausalLMScorer:
    """Per-token surprisal under a genforge causal LM (`-log p(token | text before)`, nats).

    Texts longer than the model's context are read in strided windows (`stride` tokens apart,
    default half the context), so every token is scored with at least `context - stride` tokens
    before it. The first token has nothing before it: with a BOS token it is scored after BOS,
    otherwise it gets the highest surprisal of the text (it is kept as long as anything is).
    """

    def __init__(self, model, tokenizer, *, stride: int | None = None, batch_size: int = 8) -> None:
        if not model.config.causal or model.lm_head is None:
            raise CompressionError(f"surprisal needs a causal LM with an LM head, got a {model.config.family} encoder")
        self.model, self.tokenizer = model, tokenizer
        self.context = model.config.max_position_embeddings
        self.stride = stride or max(1, self.context // 2)
        if not 1 <= self.stride <= self.context - 1:
            raise CompressionError(
                f"stride must be from 1 to {self.context - 1} (the context less one), got {stride!r}"
            )
        self.batch_size = batch_size

    def count_tokens(self, text: str) -> int:
        return len(_offsets(self.tokenizer, text)[0])

    @torch.inference_mode()
    def token_surprisals(self, text: str) -> list[tuple[int, int, float]]:
        from ..evaluate.perplexity import strided_windows

        ids, offsets = _offsets(self.tokenizer, text)
        if not ids:
            return []
        bos = getattr(self.tokenizer, "bos_token_id", None)
        sequence = ([bos] if bos is not None else []) + ids
        shift = len(sequence) - len(ids)
        surprisal = [math.nan] * len(sequence)
        tensor = torch.tensor(sequence, device=self.model.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for begin, end, first in strided_windows(len(sequence), self.context, self.stride):
                logits = self.model(tensor[None, begin:end]).logits[0].float()
                log_probs = torch.log_softmax(logits[first - begin - 1 : end - begin - 1], dim=-1)
                targets = tensor[first:end]
                nll = -log_probs.gather(1, targets[:, None])[:, 0]
                surprisal[first:end] = nll.tolist()
        finally:
            self.model.train(was_training)
        scores = surprisal[shift:]
        if math.isnan(scores[0]):
            known = [s for s in scores if not math.isnan(s)]
            scores[0] = max(known) if known else 0.0
        return [(start, end, score) for (start, end), score in zip(offsets, scores)]


class RandomScorer:
    """Random surprisals (seeded): compression by this scorer drops words at random, the
    baseline a surprisal scorer must beat. Counts tokens with `tokenizer`."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tokenizer, self.seed = tokenizer, seed

    def count_tokens(self, text: str) -> int:
        return len(_offsets(self.tokenizer, text)[0])

    def token_surprisals(self, text: str) -> list[tuple[int, int, float]]:
        rng = random.Random(self.seed)
        return [(start, end, rng.random()) for start, end in _offsets(self.tokenizer, text)[1]]


@dataclass
class CompressionResult:
    """The compressed prompt, its length before and after (in the budget's tokens), and which
    words were dropped: as text, and as (start, end) character spans of the original prompt
    (its regions joined, markers removed), for showing or measuring what was lost."""

    text: str
    original_tokens: int
    compressed_tokens: int
    budget: int
    dropped_words: list[str] = field(default_factory=list)
    dropped_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """original / compressed tokens (LLMLingua's "2x", "5x")."""
        return self.original_tokens / max(1, self.compressed_tokens)


@dataclass
class _Word:
    start: int
    end: int
    keep: bool
    score: float = math.inf
    tokens: int = 0


def compress_prompt(
    prompt: str | Sequence[Segment],
    scorer: TokenScorer,
    budget: int,
    *,
    count_tokens: Callable[[str], int] | None = None,
) -> CompressionResult:
    """Compress `prompt` (text with `<keep>` regions, or `Segment`s) to at most `budget` tokens.

    count_tokens: the budget's tokenizer (default the scorer's); the result is counted with it.
    A prompt already within the budget comes back unchanged (markers removed).
    """
    segments = split_marked(prompt) if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(s, Segment) for s in segments):
        raise CompressionError("a prompt is text with <keep> regions, or a list of Segment")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise CompressionError(f"the budget is a positive number of tokens, got {budget!r}")
    count = count_tokens or scorer.count_tokens
    text = "".join(s.text for s in segments)
    original = count(text)
    if original <= budget:
        return CompressionResult(text, original, original, budget)

    words: list[_Word] = []
    position = 0
    for segment in segments:
        for match in _WORD.finditer(segment.text):
            words.append(_Word(position + match.start(), position + match.end(), segment.keep))
        position += len(segment.text)
    # White space alone (a segment's trailing blank lines) is layout, never dropped.
    droppable = [i for i, w in enumerate(words) if not w.keep and text[w.start : w.end].strip()]
    # The shortest prompt compression can make: checked before the scorer's model runs.
    floor = count(_assemble(text, words, set(droppable)))
    if floor > budget:
        raise CompressionError(
            f"the kept regions alone are {floor} tokens, over the budget of {budget}: raise the budget "
            "or mark less as <keep>"
        )

    # Each token's surprisal goes to the word its first character falls in.
    starts = [w.start for w in words]
    totals = [0.0] * len(words)
    for start, _, surprisal in scorer.token_surprisals(text):
        index = _word_at(starts, start)
        if index is not None:
            totals[index] += surprisal
            words[index].tokens += 1
    for index, word in enumerate(words):
        if word.tokens:
            word.score = totals[index] / word.tokens
        elif index > 0:
            # No token starts in this word (a piece of the word before runs into it): it goes
            # with its neighbour's score rather than staying for free.
            word.score = words[index - 1].score

    candidates = sorted(droppable, key=lambda i: (words[i].score, -i))
    # Drop by estimate first (each word's own tokens), then recount exactly: joining words can
    # merge or split tokens, so the estimate is only a guide. The floor above fits, so this ends.
    taken, estimate = 0, original
    while taken < len(candidates) and estimate > budget:
        estimate -= words[candidates[taken]].tokens
        taken += 1
    compressed = _assemble(text, words, set(candidates[:taken]))
    tokens = count(compressed)
    while tokens > budget and taken < len(candidates):
        taken += 1
        compressed = _assemble(text, words, set(candidates[:taken]))
        tokens = count(compressed)
    dropped = sorted(candidates[:taken])
    return CompressionResult(
        compressed,
        original,
        tokens,
        budget,
        dropped_words=[text[words[i].start : words[i].end].strip() for i in dropped],
        dropped_spans=[(words[i].start, words[i].end) for i in dropped],
    )


def _word_at(starts: list[int], position: int) -> int | None:
    index = bisect.bisect_right(starts, position) - 1
    return index if index >= 0 else None


def _assemble(text: str, words: list[_Word], dropped: set[int]) -> str:
    """The kept words in order; a dropped word's line break moves to the next kept word."""
    pieces: list[str] = []
    pending_break = False
    for index, word in enumerate(words):
        piece = text[word.start : word.end]
        if index in dropped:
            pending_break = pending_break or "\n" in piece[: len(piece) - len(piece.lstrip())]
            continue
        if pending_break:
            body = piece.lstrip()
            space = piece[: len(piece) - len(body)]
            piece = ("\n" if "\n" not in space else space) + body if pieces else body
            pending_break = False
        elif not pieces:
            piece = piece if word.keep or index == 0 else piece.lstrip()
        pieces.append(piece)
    return "".join(pieces)
