"""Constrained decoding: logits processors that keep generation inside a formal language.

Grammar-constrained decoding masks, at every step, each token whose text cannot extend the
output towards a string of the language (Willard & Louf 2023, "Efficient Guided Generation
for Large Language Models"; Geng et al. 2023, "Grammar-Constrained Decoding for Structured
NLP Tasks without Finetuning"). Three languages are offered:

- :class:`JsonSchemaConstraint` -- JSON documents valid against a JSON Schema;
- :class:`RegexConstraint` -- strings that fully match a regular expression;
- :class:`ChoiceConstraint` -- exactly one of a list of strings.

The end-of-sequence token is allowed only when the text so far is a complete string of the
language, so a sequence that ends on EOS is always valid. One that stops at
``max_new_tokens`` may still be an unfinished prefix: give the model room.

Library: llguidance (guidance-ai, MIT). Chosen over xgrammar and outlines-core because

- its PyPI wheel has no dependencies at all, so installing it cannot move the pinned torch,
  while xgrammar requires transformers and triton at install time;
- it builds its token trie straight from a ``tokenizer.json`` string, which is exactly
  ``tokenizers.Tokenizer.to_str()``: no transformers import at run time;
- it compiles JSON Schema, regexes and Lark grammars itself, computes a token mask lazily
  per step (no ahead-of-time index over the whole vocabulary, as outlines-core builds), and
  reports invalid or unsatisfiable schemas as errors we can raise at construction.

Tokenizers: llguidance needs to know the bytes of every token, which it derives for
byte-level BPE (GPT-2, Llama 3, Qwen) and byte-fallback SentencePiece-style (Llama 2,
Mistral) tokenizers. WordPiece (BERT) tokens do not concatenate to the text, so such a
tokenizer is refused at construction with a ValueError.

Purity: the house rule is that processors are pure functions of ``(logits, ctx)``. These
are too, in their results: the grammar state of each row is a function of that row's
generated tokens (``ctx`` columns from ``prompt_length`` on). Re-running the grammar over
all of them at every step would cost O(n^2), so each constraint memoises the matcher state
reached by each token sequence it saw on the previous call, and advances it by the one new
token. The memo is keyed by the token sequence, not by row position, because generators
drop finished rows from the batch; when a sequence is not in the memo (a new generation, a
processor shared by two), the state is rebuilt from scratch, with the same result. The memo
makes an instance unsafe to call from two threads at once; build one per thread.
"""

from __future__ import annotations

import copy
import json
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import llguidance
import numpy as np
import torch

from .processors import DecodeContext

__all__ = ["GrammarConstraint", "JsonSchemaConstraint", "RegexConstraint", "ChoiceConstraint"]

_NEG_INF = float("-inf")

# Compact JSON (no whitespace between tokens). llguidance's own default allows any run of
# whitespace between tokens, which lets a weak or random model pad forever; a schema can
# opt back in with {"x-guidance": {"whitespace_flexible": true}}.
_JSON_DEFAULTS = {"whitespace_flexible": False}

# Building the token trie is slow for a large vocabulary (docs/decoding.md); constraints over
# the same tokenizer share it. Weak keys: the cache never keeps a tokenizer alive.
_LLTOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary()
)


def _backend_of(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind a genforge ``Tokenizer`` (or the object itself)."""
    import tokenizers

    backend = getattr(tokenizer, "backend", tokenizer)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise TypeError(
            "tokenizer must be a genforge.tokenizer.Tokenizer or a tokenizers.Tokenizer, "
            f"got {type(tokenizer).__name__}"
        )
    return backend


def _eos_ids(tokenizer: Any, eos_token_ids: int | Iterable[int] | None) -> tuple[int, ...]:
    if eos_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(
                "the tokenizer names no eos_token, so the constraint cannot tell which token ends a "
                "finished output; pass eos_token_ids= (the ids that end generation, e.g. "
                "model.config.eos_token_id)"
            )
        eos_token_ids = [eos]
    elif isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    ids = tuple(dict.fromkeys(eos_token_ids))
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_ids must be one or more non-negative token ids, got {eos_token_ids!r}")
    return ids


def _lltokenizer(tokenizer: Any, eos: tuple[int, ...]) -> llguidance.LLTokenizer:
    backend = _backend_of(tokenizer)
    try:
        per_tokenizer = _LLTOKENIZERS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build without caching
        per_tokenizer = {}
    if eos not in per_tokenizer:
        try:
            per_tokenizer[eos] = llguidance.LLTokenizer(backend.to_str(), eos_token=list(eos))
        except ValueError as err:
            raise ValueError(
                f"llguidance cannot read this tokenizer ({type(backend.model).__name__} model): {err}. "
                "Constrained decoding needs token byte strings that concatenate to the text: byte-level "
                "BPE (GPT-2, Llama 3, Qwen) or byte-fallback (Llama 2, Mistral) tokenizers; WordPiece "
                "(BERT) is not supported"
            ) from err
    return per_tokenizer[eos]


class GrammarConstraint:
    """A logits processor that masks every token the grammar does not allow next.

    ``grammar`` is an llguidance grammar string (what ``llguidance.LLMatcher.grammar_from_*``
    returns); most callers want one of the subclasses instead. ``what`` names the grammar
    in error messages. ``eos_token_ids`` defaults to the tokenizer's EOS; pass the model's
    when they differ. Per step and row the processor

    - keeps the logits of tokens the grammar allows next and sets all others to -inf,
      including embedding rows past the tokenizer's vocabulary;
    - allows the EOS ids only when the text so far is complete, and nothing but EOS once the
      grammar can go no further.

    Put it in ``generate(..., extra_processors=[constraint])``; `generate` runs it before the
    temperature and truncation filters of its `SamplingParams` (a top-k that ran first could
    keep only tokens the grammar forbids, leaving nothing to sample). When composing a list by
    hand, keep that order: ``[constraint, TopK(k)]``.
    """

    def __init__(
        self, grammar: str, tokenizer: Any, *, what: str, eos_token_ids: int | Iterable[int] | None = None
    ) -> None:
        self.eos_token_ids = _eos_ids(tokenizer, eos_token_ids)
        n_tokens = _backend_of(tokenizer).get_vocab_size(with_added_tokens=True)
        bad_eos = [i for i in self.eos_token_ids if i >= n_tokens]
        if bad_eos:
            raise ValueError(f"eos_token_ids {bad_eos} are outside the tokenizer's {n_tokens} tokens")
        self._lltok = _lltokenizer(tokenizer, self.eos_token_ids)
        self.vocab_size = self._lltok.vocab_size
        self.what = what
        # log_level=0: problems surface through is_error()/get_error(), raised below as ValueError.
        self._initial = llguidance.LLMatcher(self._lltok, grammar, log_level=0)
        if self._initial.is_error():
            raise ValueError(f"{what} is not usable: {self._initial.get_error().strip()}")
        start = self._allowed(self._initial)
        start[list(self.eos_token_ids)] = False
        # A grammar whose language is empty (e.g. the regex "a[^\s\S]") compiles, but allows
        # neither a first token nor an empty output: refuse it now rather than fail mid-generation.
        if not start.any() and not self._initial.is_accepting():
            raise ValueError(f"{what} matches no text at all (its language is empty); nothing can be generated")
        self._memo: dict[tuple[int, ...], llguidance.LLMatcher] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.what})"

    def fresh(self) -> GrammarConstraint:
        """A constraint over the same grammar that has seen no generation: for another sequence,
        without compiling the grammar again (a copy of the start state, some microseconds)."""
        other = copy.copy(self)
        other._initial = self._initial.deep_copy()
        other._memo = {}
        return other

    # ----------------------------------------------------------------------------- per step

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        rows = self._generated_rows(ctx)
        if len(rows) != logits.shape[0]:
            raise ValueError(f"the context has {len(rows)} rows but the logits have {logits.shape[0]}")
        matchers = self._advance(rows)
        width = logits.shape[-1]
        masks = {}
        allowed = torch.zeros(logits.shape, dtype=torch.bool)
        for i, row in enumerate(rows):
            if row not in masks:
                masks[row] = self._mask_row(matchers[row], width)
            allowed[i] = masks[row]
        return logits.masked_fill(~allowed.to(logits.device), _NEG_INF)

    @staticmethod
    def _generated_rows(ctx: DecodeContext) -> list[tuple[int, ...]]:
        ids, valid = ctx.generated_ids()
        ids = ids.tolist()
        if valid is None:
            return [tuple(row) for row in ids]
        valid = valid.tolist()
        return [tuple(t for t, ok in zip(row, keep) if ok) for row, keep in zip(ids, valid)]

    def _advance(self, rows: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], llguidance.LLMatcher]:
        """The matcher state of every distinct row, from the memo of the previous call."""
        wanted = list(dict.fromkeys(rows))
        # A parent state with several children (rows that shared a prefix, e.g. at step one of
        # a batch of equal prompts) is copied for each; the last child may take it over.
        # A parent that is itself still wanted is never taken over (one extra count).
        wanted_set = set(wanted)
        children: dict[tuple[int, ...], int] = {}
        for row in wanted:
            if row and row[:-1] in self._memo and row not in self._memo:
                parent = row[:-1]
                children[parent] = children.get(parent, 1 if parent in wanted_set else 0) + 1
        states: dict[tuple[int, ...], llguidance.LLMatcher] = {}
        for row in wanted:
            if row in self._memo:
                states[row] = self._memo[row]
                continue
            parent = row[:-1] if row else None
            if parent is not None and parent in self._memo:
                children[parent] -= 1
                matcher = self._memo[parent] if children[parent] == 0 else self._memo[parent].deep_copy()
                ok = matcher.consume_token(row[-1])
            else:  # not seen before: replay the whole row
                matcher = self._initial.deep_copy()
                ok = matcher.consume_tokens(list(row)) if row else True
            if not ok or matcher.is_error():
                self._memo = {}  # a taken-over state may be half advanced: forget everything
                raise ValueError(
                    f"the generated tokens {list(row)[-8:]} (last 8 shown) do not fit {self.what}: "
                    f"{matcher.get_error().strip()}. The constraint must see every generated token from "
                    "the first one on; do not add it to a generation already under way"
                )
            states[row] = matcher
        self._memo = dict(states)
        return states

    def _allowed(self, matcher: llguidance.LLMatcher) -> torch.Tensor:
        """``(vocab_size,)`` bool: the tokens the grammar allows next, as llguidance reports them."""
        packed = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(packed, bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def _mask_row(self, matcher: llguidance.LLMatcher, width: int) -> torch.Tensor:
        allowed = torch.zeros(width, dtype=torch.bool)
        n = min(width, self.vocab_size)  # columns past the tokenizer (padded embeddings) stay False
        allowed[:n] = self._allowed(matcher)[:n]
        eos = [i for i in self.eos_token_ids if i < width]
        allowed[eos] = matcher.is_accepting()
        return allowed


class JsonSchemaConstraint(GrammarConstraint):
    """Constrain the output to a JSON document valid against ``schema`` (a dict or its JSON text).

    Output is compact JSON (no whitespace between tokens) unless the schema says otherwise in
    llguidance's ``"x-guidance"`` key. Keywords llguidance cannot enforce, and invalid or
    unsatisfiable schemas (``minLength > maxLength``, ``allOf`` of disjoint types), raise
    ValueError here rather than generate unchecked output.
    """

    def __init__(
        self,
        schema: Mapping[str, Any] | str | bool,
        tokenizer: Any,
        *,
        eos_token_ids: int | Iterable[int] | None = None,
    ) -> None:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise ValueError(f"schema is a string but not JSON text: {err}") from err
        if not isinstance(schema, (Mapping, bool)):
            raise ValueError(
                f"schema must be a JSON Schema object (dict), its JSON text, or a bool; got {type(schema).__name__}"
            )
        self.schema = schema
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema if isinstance(schema, bool) else dict(schema)), defaults=_JSON_DEFAULTS
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"schema cannot be compiled: {err}") from err
        super().__init__(
            grammar, tokenizer, what=f"JSON schema {_short(json.dumps(schema))}", eos_token_ids=eos_token_ids
        )


class RegexConstraint(GrammarConstraint):
    """Constrain the output to a string that fully matches ``pattern``.

    The syntax is Rust's ``regex`` crate (what llguidance compiles): Python's ``re`` syntax
    minus look-around and backreferences, which cannot be decided token by token. The match
    is anchored at both ends, as ``re.fullmatch``.
    """

    def __init__(self, pattern: str, tokenizer: Any, *, eos_token_ids: int | Iterable[int] | None = None) -> None:
        if not isinstance(pattern, str):
            raise ValueError(f"pattern must be a regular expression string, got {type(pattern).__name__}")
        self.pattern = pattern
        super().__init__(
            llguidance.LLMatcher.grammar_from_regex(pattern),
            tokenizer,
            what=f"regex {_short(pattern)}",
            eos_token_ids=eos_token_ids,
        )


class ChoiceConstraint(GrammarConstraint):
    """Constrain the output to exactly one of ``choices`` (non-empty strings; duplicates ignored)."""

    def __init__(
        self, choices: Sequence[str], tokenizer: Any, *, eos_token_ids: int | Iterable[int] | None = None
    ) -> None:
        if isinstance(choices, str) or not isinstance(choices, Iterable):
            raise ValueError(f"choices must be a list of strings, got {type(choices).__name__}")
        choices = list(dict.fromkeys(choices))
        bad = [c for c in choices if not isinstance(c, str) or not c]
        if not choices or bad:
            raise ValueError(
                f"choices must be a non-empty list of non-empty strings; got {choices!r}"
                + (f" (bad: {bad[:5]!r})" if bad else "")
            )
        self.choices = tuple(choices)
        # A Lark alternation of string literals; JSON string syntax is Lark's literal syntax.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        super().__init__(
            llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}"),
            tokenizer,
            what=f"choice of {len(choices)} strings",
            eos_token_ids=eos_token_ids,
        )


def _short(text: str, limit: int = 80) -> str:
    text = re.sub(r"\s+", " ", text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
