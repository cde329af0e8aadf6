"""Query expansion and question rewriting, and the generators that some of them use.

- Pseudo-relevance feedback: the top documents of a first pass are taken as relevant and the
  query is moved toward them. For BM25, RM3 (Abdul-Jaleel et al. 2004, "UMass at TREC 2004"):
  a relevance model P(t|R) = sum over feedback docs of P(t|D) * weight(D), mixed with the query
  model, lambda * P(t|Q) + (1 - lambda) * P(t|R), over the top terms; BM25 is additive over
  query terms, so the expanded score is that mixture's weighted sum of per-term BM25 scores.
  For the dense vector, Rocchio (1971): q' = alpha * q + beta * centroid(feedback docs).
- HyDE (Gao et al. 2022, "Precise Zero-Shot Dense Retrieval without Relevance Labels"): a
  generator writes a passage that would answer the question; its embedding, averaged with the
  question's, is the dense query.
- Multi-query: a generator writes several phrasings of the question; each is retrieved and the
  lists are fused by reciprocal rank fusion.
- Rewrites for multi-hop retrieval: the generator proposes the next search query from the
  passages found, or, without one, an extractive rewrite appends the telling terms of the
  passages that the question lacks.

A `Generator` is anything with `complete(prompt, max_tokens) -> str`: `GenforgeGenerator`
(a genforge model in process) and `OpenAIGenerator` (any OpenAI-compatible endpoint) are
`genforge.chat_models`' two backends.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..chat_models import EndpointChatModel, LocalChatModel
from .embedders import Embedder
from .index import bm25_tokens


class Generator(Protocol):
    """Text in, text out: the one thing RAG needs from a language model."""

    def complete(self, prompt: str, max_tokens: int = 256) -> str: ...


# The two backends every text-generating subsystem shares (`genforge.chat_models`).
GenforgeGenerator = LocalChatModel
OpenAIGenerator = EndpointChatModel


# -- pseudo-relevance feedback ---------------------------------------------------------------


def relevance_model(
    query: str, feedback: Sequence[str], weights: Sequence[float], fb_terms: int = 10, original_weight: float = 0.5
) -> dict[str, float]:
    """RM3's expanded query model {term: weight}, weights summing to 1.

    P(t|R) = sum_D weight(D) * tf(t, D) / |D| over the feedback documents (weights normalised),
    cut to its `fb_terms` best terms and renormalised; then mixed with the query's own model
    (uniform over its terms) as original_weight * P(t|Q) + (1 - original_weight) * P(t|R).
    """
    if not 0.0 <= original_weight <= 1.0:
        raise ValueError(f"original_weight must be in [0, 1], got {original_weight}")
    # BM25's own tokenisation, so feedback terms are index terms.
    query_terms = bm25_tokens([query])[0]
    weights = np.asarray(weights, np.float64)
    weights = (
        weights / weights.sum()
        if len(weights) and weights.sum() > 0
        else np.full(len(feedback), 1.0 / max(len(feedback), 1))
    )
    rel: Counter = Counter()
    for tokens, w in zip(bm25_tokens(feedback) if feedback else [], weights):
        if tokens:
            for term, count in Counter(tokens).items():
                rel[term] += w * count / len(tokens)
    top = dict(rel.most_common(fb_terms))
    total = sum(top.values())
    model: dict[str, float] = {}
    for term in query_terms:
        model[term] = model.get(term, 0.0) + original_weight / len(query_terms)
    for term, p in top.items():
        model[term] = model.get(term, 0.0) + (1 - original_weight) * p / total
    return model


def rm3_scores(bm25, model: dict[str, float], depth: int) -> list[tuple[int, float]]:
    """(chunk position, score) for the weighted query `model` over a bm25s index: sum_t w_t * BM25(t, d)."""
    vocab = getattr(bm25, "vocab_dict", None) or {}
    total = None
    for term, weight in model.items():
        if vocab and term not in vocab:
            continue  # a term the index never saw scores 0 everywhere
        scores = np.asarray(bm25.get_scores([term]), np.float64)
        total = weight * scores if total is None else total + weight * scores
    if total is None:
        return []
    order = np.argsort(-total, kind="stable")[:depth]
    return [(int(i), float(total[i])) for i in order if total[i] > 0]


def rocchio_vector(
    query_vector: np.ndarray, feedback_vectors: np.ndarray, weights: Sequence[float], beta: float = 0.5
) -> np.ndarray:
    """Rocchio (1971): the unit query vector plus `beta` times the weighted centroid of the
    feedback documents' vectors."""
    q = np.asarray(query_vector, np.float64)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    docs = np.asarray(feedback_vectors, np.float64)
    centroid = (docs * np.asarray(weights)[:, None]).sum(0) / sum(weights)
    return (q + beta * centroid).astype(np.float32)


# -- generator-based expansion ---------------------------------------------------------------

HYDE_PROMPT = (
    "Write a short passage, two or three sentences, that answers the question below as a "
    "reference text would.\n\nQuestion: {question}\n\nPassage:"
)
MULTI_QUERY_PROMPT = (
    "Write {n} different search queries that would find passages answering the question "
    "below. Use different words from the question. One query per line, nothing else.\n\n"
    "Question: {question}\n\nQueries:"
)
REWRITE_PROMPT = (
    "Question: {question}\n\nPassages found so far:\n{passages}\n\nWrite one search query that "
    "would find the missing information needed to answer the question. Reply with the query only."
)


def hyde_vector(
    generator: Generator, embedder: Embedder, query: str, query_vector: np.ndarray, max_tokens: int = 160
) -> np.ndarray:
    """The mean of the question's unit embedding (`query_vector`) and the generated passage's (HyDE)."""
    passage = generator.complete(HYDE_PROMPT.format(question=query), max_tokens=max_tokens).strip()
    q = np.asarray(query_vector, np.float64)
    vectors = [q / max(float(np.linalg.norm(q)), 1e-12)]
    if passage:
        p = np.asarray(embedder.embed([passage])[0], np.float64)
        vectors.append(p / max(float(np.linalg.norm(p)), 1e-12))
    return np.mean(vectors, axis=0).astype(np.float32)


def multi_queries(generator: Generator, query: str, n: int = 3, max_tokens: int = 120) -> list[str]:
    """The question followed by up to `n` distinct generated phrasings of it."""
    reply = generator.complete(MULTI_QUERY_PROMPT.format(n=n, question=query), max_tokens=max_tokens)
    out, seen = [query], {query.strip().lower()}
    for line in reply.splitlines():
        # Models number or bullet their lists; the markers are not part of the query.
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip().strip('"')
        if line and line.lower() not in seen:
            seen.add(line.lower())
            out.append(line)
        if len(out) > n:
            break
    return out


def generative_rewrite(generator: Generator, question: str, passages: Sequence[str], max_tokens: int = 48) -> str:
    """The generator's next search query, given the question and the passages found so far."""
    listed = "\n".join(f"[{n}] {text[:500]}" for n, text in enumerate(passages, 1))
    reply = generator.complete(REWRITE_PROMPT.format(question=question, passages=listed), max_tokens=max_tokens)
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    return lines[0].strip('"') if lines else ""


def extractive_rewrite(question: str, passages: Sequence[str], n_terms: int = 6) -> str:
    """The question plus the terms that weigh most in the found passages' relevance model and
    that the question does not already contain (a bridge to what the passages talk about)."""
    if not passages:
        return ""
    model = relevance_model(
        question,
        list(passages),
        [1.0 / (r + 1) for r in range(len(passages))],
        fb_terms=n_terms + 8,
        original_weight=0.0,
    )
    asked = set(bm25_tokens([question])[0])
    extra = [t for t, _ in sorted(model.items(), key=lambda kv: -kv[1]) if t not in asked][:n_terms]
    return f"{question} {' '.join(extra)}".strip() if extra else ""
