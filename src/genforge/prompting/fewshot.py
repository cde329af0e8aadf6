"""Few-shot prompting: worked examples before the question, chosen by a selector, under a token budget.

A model imitates the examples it is shown (Brown et al. 2020, "Language Models are Few-Shot
Learners"), so which examples are shown matters: examples close to the question help most (Liu
et al. 2022, "What Makes Good In-Context Examples for GPT-3?"), and near-duplicates of one
another waste the budget. The selectors:

- `FixedSelector`: the same examples every time (the first k, or the indices given);
- `RandomSelector`: k at random, reproducible with a seed;
- `SemanticSelector`: the k nearest the question by cosine similarity of sentence embeddings
  (genforge's `SentenceEncoder`, all-MiniLM-L6-v2 offline, or any embedder);
- `MMRSelector`: maximal marginal relevance (Carbonell & Goldstein 1998): each next example
  maximises `lambda * sim(question, e) - (1 - lambda) * max sim(e, chosen)`, near the question
  but unlike the ones already chosen.

`FewShotPrompt` renders prefix, examples and the question's suffix. With `max_tokens` and a
tokenizer it drops whole examples, least relevant first, until the prompt fits, and says how
many it dropped; it never cuts an example or the question short.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .templates import PromptTemplate, load_template

__all__ = [
    "FewShotError",
    "FewShotPrompt",
    "FewShotResult",
    "FixedSelector",
    "MMRSelector",
    "RandomSelector",
    "SemanticSelector",
    "mmr_order",
    "token_counter",
]


class FewShotError(ValueError):
    """Bad examples, a bad selector setting, or a budget not even the question fits in."""


class ExampleSelector(Protocol):
    def select(self, query: str, examples: Sequence[Mapping[str, Any]], k: int) -> list[int]:
        """Indices of up to `k` examples, most preferred first."""
        ...


@dataclass
class FixedSelector:
    """The examples at `indices` (default: in the order given), the first k of them."""

    indices: Sequence[int] | None = None

    def select(self, query: str, examples: Sequence[Mapping[str, Any]], k: int) -> list[int]:
        indices = list(range(len(examples))) if self.indices is None else list(self.indices)
        bad = [i for i in indices if not 0 <= i < len(examples)]
        if bad:
            raise FewShotError(f"FixedSelector indices {bad} are outside the {len(examples)} examples")
        return indices[:k]


@dataclass
class RandomSelector:
    """k examples drawn without replacement; a `seed` makes every call draw the same ones for
    the same examples (a fresh generator per call, so results do not depend on call order)."""

    seed: int | None = None

    def select(self, query: str, examples: Sequence[Mapping[str, Any]], k: int) -> list[int]:
        return random.Random(self.seed).sample(range(len(examples)), min(k, len(examples)))


Embed = Callable[[Sequence[str]], Any]


def _embedding_function(embedder) -> Embed:
    """`texts -> vectors` from genforge's `SentenceEncoder` (`encode`), a RAG `Embedder`
    (`embed`), a plain function, or None (all-MiniLM-L6-v2, loaded once on first use)."""
    if embedder is None:
        from ..encoder import SentenceEncoder, default_encoder_path

        encoder = SentenceEncoder(default_encoder_path())
        return encoder.encode
    for method in ("embed", "encode"):
        if callable(getattr(embedder, method, None)):
            return getattr(embedder, method)
    if callable(embedder):
        return embedder
    raise FewShotError(
        f"an embedder needs embed(texts) or encode(texts), or is a function; got {type(embedder).__name__}"
    )


def _unit_rows(vectors) -> np.ndarray:
    array = np.asarray(vectors.detach().cpu().numpy() if hasattr(vectors, "detach") else vectors, dtype=np.float64)
    if array.ndim != 2:
        raise FewShotError(f"the embedder returned an array of shape {array.shape}; expected (texts, dimension)")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms == 0, 1.0, norms)


class _EmbeddingSelector:
    """Shared by the semantic selectors: the embedder, the example field compared, a cache of
    example vectors by text (examples are embedded once, the query every call)."""

    def __init__(self, embedder=None, key: str = "input") -> None:
        self._embedder, self.key = embedder, key
        self._embed: Embed | None = None
        self._cache: dict[str, np.ndarray] = {}

    def _vectors(self, query: str, examples: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        if self._embed is None:
            self._embed = _embedding_function(self._embedder)
        missing = [i for i, e in enumerate(examples) if self.key not in e]
        if missing:
            raise FewShotError(f"examples {missing[:5]} have no {self.key!r} field to compare with the question")
        texts = [str(e[self.key]) for e in examples]
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            self._cache.update(zip(new, _unit_rows(self._embed(new))))
        rows = _unit_rows(self._embed([query]))[0]
        return rows, np.stack([self._cache[t] for t in texts])


class SemanticSelector(_EmbeddingSelector):
    """The k examples whose `key` field is most similar (cosine) to the question; ties keep
    the examples' order."""

    def select(self, query: str, examples: Sequence[Mapping[str, Any]], k: int) -> list[int]:
        if not examples:
            return []
        question, vectors = self._vectors(query, examples)
        scores = vectors @ question
        return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


class MMRSelector(_EmbeddingSelector):
    """Maximal marginal relevance (Carbonell & Goldstein 1998) over the examples' `key` field.

    `diversity` is 1 - lambda: 0 is plain nearest neighbours, 1 ignores the question after the
    first pick. `fetch_k` limits the candidates to that many nearest (None: all examples).
    """

    def __init__(self, embedder=None, key: str = "input", diversity: float = 0.5, fetch_k: int | None = None):
        super().__init__(embedder, key)
        if not 0.0 <= diversity <= 1.0:
            raise FewShotError(f"MMR diversity must be in [0, 1] (1 - lambda), got {diversity!r}")
        if fetch_k is not None and fetch_k < 1:
            raise FewShotError(f"MMR fetch_k must be a positive integer or None, got {fetch_k!r}")
        self.diversity, self.fetch_k = diversity, fetch_k

    def select(self, query: str, examples: Sequence[Mapping[str, Any]], k: int) -> list[int]:
        if not examples:
            return []
        question, vectors = self._vectors(query, examples)
        relevance = vectors @ question
        candidates = np.argsort(-relevance, kind="stable")[: self.fetch_k or len(examples)]
        order = mmr_order(relevance[candidates], vectors[candidates] @ vectors[candidates].T, 1.0 - self.diversity, k)
        return [int(candidates[i]) for i in order]


def mmr_order(relevance: np.ndarray, similarity: np.ndarray, lambda_: float, k: int) -> list[int]:
    """Greedy MMR: indices of up to `k` items, each maximising
    `lambda_ * relevance[i] - (1 - lambda_) * max(similarity[i, chosen])` (the first pick is the
    most relevant). Ties go to the lower index."""
    count = len(relevance)
    chosen: list[int] = []
    redundancy = np.full(count, -np.inf)  # max similarity to anything chosen; -inf before the first pick
    available = np.ones(count, dtype=bool)
    for _ in range(min(k, count)):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        score = lambda_ * relevance - (1.0 - lambda_) * penalty
        score = np.where(available, score, -np.inf)
        best = int(np.argmax(score))
        chosen.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, similarity[:, best])
    return chosen


def token_counter(tokenizer) -> Callable[[str], int]:
    """`text -> number of tokens` from a tokenizer with `encode` (genforge's or Hugging Face's)
    or a counting function itself."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):

        def count(text: str) -> int:
            try:
                return len(encode(text, add_special_tokens=False))
            except TypeError:  # an encode without that option (tiktoken's)
                return len(encode(text))

        return count
    if callable(tokenizer):
        return tokenizer
    raise FewShotError(f"count tokens with a tokenizer (with encode) or a function text -> int, got {tokenizer!r}")


@dataclass
class FewShotResult:
    """A built few-shot prompt: its text, the examples shown (in order), how many the budget
    dropped, and its length in tokens (None without a tokenizer)."""

    text: str
    examples: list[Mapping[str, Any]]
    indices: list[int]
    dropped: int = 0
    tokens: int | None = None

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


@dataclass
class FewShotPrompt:
    """prefix, the selected examples (each rendered by `example_template`), then `suffix` (the
    question), joined by `separator`.

    examples: mappings of the fields `example_template` reads.
    suffix: a template over the question's variables (e.g. "Q: {{ input }}\\nA:").
    selector: which examples and in which order (default `FixedSelector`).
    k: how many to select before the budget.
    query_key: the question variable the selector compares examples with.
    max_tokens, tokenizer: the budget, counted with this tokenizer.
    """

    examples: Sequence[Mapping[str, Any]]
    example_template: PromptTemplate | str
    suffix: PromptTemplate | str
    prefix: str = ""
    selector: ExampleSelector = field(default_factory=FixedSelector)
    k: int = 4
    query_key: str = "input"
    separator: str = "\n\n"
    max_tokens: int | None = None
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.example_template, str):
            self.example_template = load_template(self.example_template, name="example")
        if isinstance(self.suffix, str):
            self.suffix = load_template(self.suffix, name="suffix")
        if not isinstance(self.k, int) or self.k < 0:
            raise FewShotError(f"k must be an integer >= 0, got {self.k!r}")
        if isinstance(self.examples, (str, Mapping)) or not all(isinstance(e, Mapping) for e in self.examples):
            raise FewShotError("examples must be a list of mappings (each one example's fields)")
        for number, example in enumerate(self.examples):
            fields = {name: example[name] for name in self.example_template.declared if name in example}
            try:
                self.example_template.values(fields)
            except ValueError as err:
                raise FewShotError(f"example {number} does not fit the example template: {err}") from None
        if self.max_tokens is not None:
            if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
                raise FewShotError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
            if self.tokenizer is None:
                raise FewShotError("a token budget (max_tokens) needs a tokenizer to count with")
        self._count = token_counter(self.tokenizer) if self.tokenizer is not None else None

    def render_example(self, example: Mapping[str, Any]) -> str:
        template = self.example_template
        return template.render(**{name: example[name] for name in template.declared if name in example})

    def build(self, **query: Any) -> FewShotResult:
        """The prompt for one question (the suffix's variables)."""
        question = self.suffix.render(**query)  # a missing or unknown variable fails here, before selecting
        if self.query_key not in query and not isinstance(self.selector, (FixedSelector, RandomSelector)):
            raise FewShotError(f"the selector compares examples with the question's {self.query_key!r}, not given")
        chosen = self.selector.select(str(query.get(self.query_key, "")), self.examples, self.k) if self.k else []
        rendered = [self.render_example(self.examples[i]) for i in chosen]

        def assemble(count: int) -> str:
            return self.separator.join([p for p in (self.prefix,) if p] + rendered[:count] + [question])

        kept = len(rendered)
        text = assemble(kept)
        tokens = self._count(text) if self._count else None
        if self.max_tokens is not None:
            # Drop whole examples from the least preferred end; the prompt without examples
            # must fit on its own, or nothing can be done without cutting the question.
            while tokens > self.max_tokens and kept > 0:
                kept -= 1
                text = assemble(kept)
                tokens = self._count(text)
            if tokens > self.max_tokens:
                raise FewShotError(
                    f"the prompt is {tokens} tokens without any example, over the budget of {self.max_tokens}; "
                    "raise max_tokens or shorten the prefix or the question"
                )
        return FewShotResult(
            text=text,
            examples=[self.examples[i] for i in chosen[:kept]],
            indices=list(chosen[:kept]),
            dropped=len(rendered) - kept,
            tokens=tokens,
        )
