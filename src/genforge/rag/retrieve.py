"""Dense, sparse and hybrid retrieval, result fusion, MMR, query expansion, re-ranking,
adaptive k and multi-hop retrieval.

- Reciprocal rank fusion (Cormack, Clarke & Büttcher 2009): score(d) = sum over rankings of
  1 / (k + rank(d)), ranks from 1, k = 60 as in the paper. It needs no score calibration,
  which is why it is the default for combining BM25 with cosine similarity.
- Weighted score fusion: each retriever's scores min-max normalised to [0, 1] over its own
  candidates, then a weighted sum (a document missing from a list scores 0 there).
- MMR (Carbonell & Goldstein 1998): pick, one at a time, the candidate maximising
  lambda * sim(query, d) - (1 - lambda) * max sim(d, already picked), trading relevance for
  diversity.
- Query expansion (`expand.py`): pseudo-relevance feedback (RM3 for BM25, Rocchio for the
  dense vector), HyDE and multi-query when a generator is configured.
- Multi-vector first stage (`multivector.py`, mode "multivector"): ColBERT-style MaxSim over
  every chunk's compressed token vectors, with PLAID's centroid pruning, on an index built with
  `multivector=True`.
- Re-ranking (`rerank.py`): ColBERT-style late interaction (MaxSim) or a cross-encoder over
  the top candidates.
- Adaptive k: keep hits scoring at least a fraction of the best hit's score, so a sharp
  question gets few passages and a broad one more.
- Multi-hop: retrieve, rewrite the question from what was found, retrieve again, fuse.
- Duplicate-aware ranking (`group_duplicate_questions`, on by default): Q&A items asking the
  same question rank together, where the best of them ranks.
- Word forms (`Retriever.word_form_search`, on by default): BM25 lets each query word match its
  inflected forms in the index, scored by the best one, since the index is not stemmed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sysconfig
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chunking import EMBEDDING_TEXT_VERSION, Chunk
from .embedders import Embedder, EncoderEmbedder
from .expand import (
    extractive_rewrite,
    generative_rewrite,
    hyde_vector,
    multi_queries,
    relevance_model,
    rm3_scores,
    rocchio_vector,
)
from .filters import check_filters, chunk_matches
from .index import MANIFEST, HybridIndex, bm25_tokens
from .rerank import CrossEncoderReranker, LateInteractionReranker, TokenEmbedder
from .stores import RagIndexError

FUSIONS = ("rrf", "weighted")
DUPLICATES = ("group", "keep")
# Words that do not tell two questions apart ("What is X?" and "What is the X?" ask the same thing).
_QUESTION_FILLER = frozenset(
    "a an the is are was were what whats which how do does did of in on for to and or vs versus "
    "explain describe define can you".split()
)
MODES = ("dense", "sparse", "hybrid", "multivector")
EXPANSIONS = ("prf", "hyde", "multi_query")
# Hybrid's weight for MaxSim over token vectors beside dense and BM25 at 0.5 each (weighted
# fusion), where the index has token vectors: chosen by 2-fold cross-validation on the seeds
# queries (both folds chose 0.25 or 0.5; held-out recall@5 0.849 -> 0.858, MRR 0.873 -> 0.963).
DEFAULT_MULTIVECTOR_WEIGHT = 0.25


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k: int = 60) -> list[tuple[Hashable, float]]:
    """Fuse ranked lists (best first) into one list of (item, RRF score), best first; ties keep first-seen order."""
    if k < 0:
        raise ValueError(f"RRF constant k must be >= 0, got {k}")
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def weighted_score_fusion(
    score_lists: Sequence[dict[Hashable, float]], weights: Sequence[float]
) -> list[tuple[Hashable, float]]:
    """Min-max normalise each {item: score} map, then sum with `weights`; best first."""
    if len(score_lists) != len(weights):
        raise ValueError(f"got {len(score_lists)} score lists but {len(weights)} weights; give one weight per list")
    fused: dict[Hashable, float] = {}
    for scores, weight in zip(score_lists, weights):
        if not scores:
            continue
        lo, hi = min(scores.values()), max(scores.values())
        for item, s in scores.items():
            # One candidate (or all tied) carries no spread; it counts as fully relevant.
            norm = (s - lo) / (hi - lo) if hi > lo else 1.0
            fused[item] = fused.get(item, 0.0) + weight * norm
    return sorted(fused.items(), key=lambda kv: -kv[1])


def mmr(query_vector: np.ndarray, candidate_vectors: np.ndarray, k: int, lambda_: float = 0.5) -> list[int]:
    """Indices into candidate_vectors picked by MMR with cosine similarity; lambda_=1 is plain relevance order."""
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"MMR lambda must be in [0, 1], got {lambda_}")
    cands = np.asarray(candidate_vectors, np.float64)
    if len(cands) == 0:
        return []
    cands = cands / np.linalg.norm(cands, axis=1, keepdims=True).clip(min=1e-12)
    q = np.asarray(query_vector, np.float64)
    q = q / max(np.linalg.norm(q), 1e-12)
    relevance = cands @ q
    pairwise = cands @ cands.T
    picked: list[int] = []
    left = list(range(len(cands)))
    while left and len(picked) < k:
        redundancy = pairwise[np.ix_(left, picked)].max(axis=1) if picked else np.zeros(len(left))
        scores = lambda_ * relevance[left] - (1 - lambda_) * redundancy
        best = left[int(np.argmax(scores))]
        picked.append(best)
        left.remove(best)
    return picked


def adaptive_cutoff(scores: Sequence[float], ratio: float, min_k: int = 1) -> int:
    """How many of the (best-first) scores to keep: those at least `ratio` x the best score.

    A relative threshold adapts k to the query: one clear winner keeps one passage, several
    close ones keep them all. It assumes non-negative, comparable scores (cosine, weighted
    fusion, a re-ranker's); with RRF scores, which shrink slowly with rank, it keeps more.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"adaptive-k ratio must be in [0, 1], got {ratio}")
    if min_k < 0:
        raise ValueError(f"min_k must be >= 0, got {min_k}")
    scores = list(scores)
    if not scores:
        return 0
    best = scores[0]
    if best <= 0:
        return min(len(scores), max(min_k, 1))
    keep = sum(1 for s in scores if s >= ratio * best)
    return min(len(scores), max(keep, min_k))


_INFLECTIONS = frozenset({"", "s", "es", "e", "ed", "d", "ing", "y", "ies", "ied"})


def inflected_forms(a: str, b: str) -> bool:
    """Whether two distinct words differ only by an English inflectional ending past their
    common prefix (cache / cached / caching, key / keys, merge / merging), not by a derivational
    one (token / tokenizer, prefer / preference)."""
    if a == b:
        return False
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n >= 3 and a[n:] in _INFLECTIONS and b[n:] in _INFLECTIONS


def question_key(chunk: Chunk) -> frozenset[str] | None:
    """The identity of a Q&A item's question: its content words, order and case ignored, or None
    for chunks that are not Q&A items (or whose question has no content word).

    "What is Byte Pair Encoding (BPE)?" and "What is BPE (Byte Pair Encoding)?" share a key;
    "What is DPO?" and "What is DPO's advantage over PPO?" do not."""
    if "question" not in chunk.metadata:
        return None
    words = frozenset(re.findall(r"\w+", str(chunk.metadata["question"]).lower())) - _QUESTION_FILLER
    return words or None


def group_duplicate_questions(
    ranked: Sequence[tuple[int, float]], chunks: Sequence[Chunk], depth: int | None = None
) -> list[tuple[int, float]]:
    """Duplicate-aware ranking: chunks answering the same question rank next to each other.

    A corpus of Q&A collections often asks one question several times (a chat export repeating
    a block with a reworded answer, two documents covering the same interview question). The
    answers differ in wording, so a query phrased like one of them can rank its twins far apart,
    although relevance belongs to the question: whatever makes one answer relevant makes the
    others relevant too (the cluster hypothesis, van Rijsbergen 1979, in its strongest form).
    Each group of items with the same `question_key` is placed where its best member ranks,
    members in their own score order (members missing from `ranked` are pulled in from `chunks`
    just after them); the score a member reports is the group's best, so downstream cut-offs
    treat twins alike. Non-Q&A chunks keep their place. `depth` bounds how far down the list
    groups are expanded (None: everywhere).
    """
    keys: dict[frozenset[str], list[int]] = {}
    for position, chunk in enumerate(chunks):
        key = question_key(chunk)
        if key is not None:
            keys.setdefault(key, []).append(position)
    own = dict(ranked)
    out: list[tuple[int, float]] = []
    placed: set[int] = set()
    for n, (position, score) in enumerate(ranked):
        if position in placed:
            continue
        key = question_key(chunks[position])
        members = [position]
        if key is not None and (depth is None or n < depth):
            # Ranked twins by their own scores, then unranked twins in corpus order.
            twins = [p for p in keys[key] if p != position and p not in placed]
            members += sorted(twins, key=lambda p: (p not in own, -own.get(p, 0.0)))
        for p in members:
            placed.add(p)
            out.append((p, score))
    return out


@dataclass
class Hit:
    chunk: Chunk
    score: float
    position: int  # the chunk's position in the index
    hop: int = 0  # multi-hop: the hop that first found the chunk
    details: dict = field(default_factory=dict)  # component scores (e.g. "rerank", "first_stage")


class Retriever:
    """Queries a `HybridIndex`: dense (cosine), sparse (BM25) or hybrid (fused), optionally
    expanded (PRF, HyDE, multi-query), re-ranked, diversified by MMR and cut by adaptive k.

    `generator` (anything with `complete(prompt, max_tokens) -> str`, see `expand.Generator`)
    enables HyDE, multi-query and generative multi-hop rewrites; `reranker` (see `rerank.py`)
    is used when `search(..., rerank=True)`.
    """

    def __init__(
        self,
        index: HybridIndex,
        embedder: Embedder,
        generator=None,
        reranker=None,
        multivector_weight: float = DEFAULT_MULTIVECTOR_WEIGHT,
    ) -> None:
        if embedder.name != index.model:
            raise ValueError(f"index was built with {index.model!r}; the query embedder is {embedder.name!r}")
        if multivector_weight < 0:
            raise ValueError(f"multivector_weight must be >= 0 (0 leaves token vectors out), got {multivector_weight}")
        self.index, self.embedder = index, embedder
        # Hybrid's weight for MaxSim over token vectors, used when the index has them.
        self.multivector_weight = multivector_weight
        self.generator, self.reranker = generator, reranker
        self._query_vectors: dict[str, np.ndarray] = {}
        self._query_tokens: dict[str, np.ndarray] = {}

    def embed_query(self, query: str) -> np.ndarray:
        # Dense, hybrid and MMR runs of one query share its vector; the cache is bounded.
        if query not in self._query_vectors:
            if len(self._query_vectors) >= 1024:
                self._query_vectors.clear()
            self._query_vectors[query] = self.embedder.embed([query])[0]
        return self._query_vectors[query]

    def query_tokens(self, query: str) -> np.ndarray:
        """The query's token vectors for multi-vector search (the index's token embedder), cached."""
        if query not in self._query_tokens:
            if len(self._query_tokens) >= 1024:
                self._query_tokens.clear()
            self._query_tokens[query] = self.index.tokens_for(self.embedder).encode([query])[0]
        return self._query_tokens[query]

    def search(
        self,
        query: str,
        k: int = 10,
        mode: str = "hybrid",
        fusion: str = "rrf",
        weights: tuple[float, float] = (0.5, 0.5),
        depth: int = 50,
        rrf_k: int = 60,
        mmr_lambda: float | None = None,
        expansion: str | None = None,
        rerank: bool = False,
        rerank_depth: int = 20,
        rerank_fusion: str = "replace",
        min_score_ratio: float | None = None,
        filters=None,
        duplicates: str = "group",
        word_forms: bool = True,
        multivector_weight: float | None = None,
    ) -> list[Hit]:
        """Top-k chunks.

        Hybrid fuses the top-`depth` of each retriever. `expansion` is "prf" (RM3 + Rocchio
        pseudo-relevance feedback), "hyde" or "multi_query" (both need a generator). `rerank`
        re-scores the top `rerank_depth` candidates with the retriever's re-ranker, replacing
        the first-stage order (`rerank_fusion="replace"`) or fusing both orders by RRF ("rrf").
        `mmr_lambda` re-orders by MMR for diversity (None leaves relevance order).
        `min_score_ratio` turns on adaptive k: hits scoring under that fraction of the best
        are dropped (at most k are returned either way). `filters` ({metadata key: value or
        values}) restricts every stage to matching chunks (see `HybridIndex.dense_search`).
        """
        if not query or not query.strip():
            raise ValueError("the query is empty; give the question or keywords to search for")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if mode not in MODES:
            raise ValueError(f"retrieval mode {mode!r} is not supported; accepted: {', '.join(MODES)}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion {fusion!r} is not supported; accepted: {', '.join(FUSIONS)}")
        if expansion is not None and expansion not in EXPANSIONS:
            raise ValueError(
                f"query expansion {expansion!r} is not supported; accepted: {', '.join(EXPANSIONS)} or None"
            )
        if mode == "multivector" and expansion in ("prf", "hyde"):
            raise ValueError(
                f"expansion {expansion!r} rewrites a query vector or BM25 terms, which mode='multivector' does not use; "
                "use it with dense, sparse or hybrid"
            )
        if mode == "multivector" and self.index.multivector is None:
            raise ValueError(
                "mode='multivector' needs an index built with token vectors: HybridIndex.build(..., multivector=True) "
                "or `genforge rag index --multivector`"
            )
        if expansion in ("hyde", "multi_query") and self.generator is None:
            raise ValueError(
                f"expansion {expansion!r} needs a generator; pass Retriever(..., generator=...) or use 'prf'"
            )
        if rerank and self.reranker is None:
            raise ValueError(
                "rerank=True needs a re-ranker; pass Retriever(..., reranker=LateInteractionReranker() or CrossEncoderReranker(dir))"
            )
        if rerank_fusion not in ("rrf", "replace"):
            raise ValueError(f"rerank_fusion {rerank_fusion!r} is not supported; accepted: rrf, replace")
        if mmr_lambda is not None and not 0.0 <= mmr_lambda <= 1.0:
            raise ValueError(f"MMR lambda must be in [0, 1], got {mmr_lambda}")
        if duplicates not in DUPLICATES:
            raise ValueError(f"duplicates {duplicates!r} is not supported; accepted: {', '.join(DUPLICATES)}")
        if multivector_weight is not None and multivector_weight < 0:
            raise ValueError(f"multivector_weight must be >= 0 (0 leaves token vectors out), got {multivector_weight}")
        if multivector_weight and self.index.multivector is None:
            raise ValueError(
                "multivector_weight needs an index built with token vectors: HybridIndex.build(..., multivector=True)"
            )
        depth = max(depth, k, rerank_depth if rerank else 0)
        options = dict(
            mode=mode,
            fusion=fusion,
            weights=weights,
            depth=depth,
            rrf_k=rrf_k,
            filters=filters,
            word_forms=word_forms,
            multivector_weight=multivector_weight,
        )
        if expansion is None:
            ranked = self.rank(query, **options)
        elif expansion == "prf":
            ranked = self._prf_rank(query, **options)
        elif expansion == "hyde":
            query_vector = hyde_vector(self.generator, self.embedder, query, self.embed_query(query))
            ranked = self.rank(query, query_vector=query_vector, **options)
        else:
            rankings = [self.rank(q, **options) for q in multi_queries(self.generator, query)]
            ranked = reciprocal_rank_fusion([[i for i, _ in r] for r in rankings], k=rrf_k)[:depth]
        details: dict[int, dict] = {}
        if rerank:
            ranked, details = self._rerank(query, ranked, rerank_depth, rerank_fusion, rrf_k)
        if duplicates == "group":
            ranked = group_duplicate_questions(ranked, self.index.chunks, depth=k)
        if mmr_lambda is not None:
            positions = [i for i, _ in ranked]
            order = mmr(self.embed_query(query), self.index.embeddings[positions], k, mmr_lambda)
            ranked = [ranked[j] for j in order]
        ranked = ranked[:k]
        if min_score_ratio is not None:
            ranked = ranked[: adaptive_cutoff([s for _, s in ranked], min_score_ratio)]
        return [Hit(self.index.chunks[i], float(s), i, details=details.get(i, {})) for i, s in ranked]

    def _prf_rank(
        self,
        query: str,
        fb_docs: int = 5,
        fb_terms: int = 10,
        original_weight: float = 0.5,
        rocchio_beta: float = 0.5,
        **options,
    ) -> list[tuple[int, float]]:
        """Pseudo-relevance feedback: a first pass, then RM3 for BM25 and Rocchio for the dense vector."""
        first = self.rank(query, **options)[:fb_docs]
        if not first:
            return first
        positions = [i for i, _ in first]
        chunks = [self.index.chunks[i] for i in positions]
        # Rank-based document weights: fused scores are not probabilities, ranks are comparable.
        weights = [1.0 / (r + 1) for r in range(len(positions))]
        mode, depth = options.get("mode", "hybrid"), options.get("depth", 50)
        sparse = None
        if mode != "dense":
            model = relevance_model(query, [c.text for c in chunks], weights, fb_terms, original_weight)
            sparse = rm3_scores(self.index.bm25, model, depth if not options.get("filters") else len(self.index.chunks))
            if options.get("filters"):
                wanted = check_filters(options["filters"])
                sparse = [(i, s) for i, s in sparse if chunk_matches(self.index.chunks[i], wanted)][:depth]
        qvec = None
        if mode != "sparse":
            qvec = rocchio_vector(self.embed_query(query), self.index.embeddings[positions], weights, rocchio_beta)
        return self.rank(query, query_vector=qvec, sparse_scores=sparse, **options)

    def rank(
        self,
        query: str,
        mode: str = "hybrid",
        fusion: str = "rrf",
        weights: tuple[float, float] = (0.5, 0.5),
        depth: int = 50,
        rrf_k: int = 60,
        query_vector: np.ndarray | None = None,
        sparse_scores: list[tuple[int, float]] | None = None,
        filters=None,
        word_forms: bool = True,
        multivector_weight: float | None = None,
    ) -> list[tuple[int, float]]:
        """(chunk position, score) best first: the first stage, without re-ranking. `query_vector`
        replaces the query's embedding (HyDE, Rocchio); `sparse_scores` replaces BM25's list (RM3).
        `word_forms` lets BM25 match other inflected forms of the query's words (`word_form_search`).
        `multivector_weight` (see `search`) adds MaxSim as a third hybrid list."""
        dense = sparse = None
        # Filters are passed only when given, so an index without filter support still serves.
        extra = {"filters": filters} if filters else {}
        if mode == "multivector":
            return self.index.multivector_search(self.query_tokens(query), depth, **extra)
        if mode != "sparse":
            qvec = self.embed_query(query) if query_vector is None else query_vector
            dense = self.index.dense_search(qvec, depth, **extra)
        if mode != "dense":
            if sparse_scores is None:
                sparse_scores = (
                    self.word_form_search(query, depth, filters)
                    if word_forms
                    else self.index.sparse_search(query, depth, **extra)
                )
            sparse = sparse_scores
        if mode == "dense":
            return dense
        if mode == "sparse":
            return sparse
        lists, list_weights = [dense, sparse], tuple(weights)
        if multivector_weight is None:
            multivector_weight = self.multivector_weight
        if multivector_weight and self.index.multivector is not None:
            lists.append(self.index.multivector_search(self.query_tokens(query), depth, **extra))
            list_weights += (multivector_weight,)
        if fusion == "rrf":
            return reciprocal_rank_fusion([[i for i, _ in r] for r in lists], k=rrf_k)
        return weighted_score_fusion([dict(r) for r in lists], list_weights)

    def word_form_search(self, query: str, depth: int, filters=None) -> list[tuple[int, float]]:
        """BM25 where each query word also matches the other inflected forms of it that the index
        holds ("caching" matches "cache" and "cached", "keys" matches "key"):
        score(d) = sum over query words w of max over forms f of w of BM25(f, d).

        The BM25 index matches exact tokens and does not stem its documents; stemming only the
        query would miss every document word in another form. Grouping the indexed words by their
        English Snowball stem (Porter 1980) and scoring a query word by its best-matching form
        gets the effect of stemming both sides without rebuilding the index. The maximum, not the
        sum, keeps a document that uses two forms of one word from counting it twice. Only
        inflections count (`inflected_forms`): Snowball also strips derivational suffixes, and
        "tokens" matching "tokenizer", or "preferred" matching "preference", drew queries off
        their topic on the seeds corpus. A query with no word in another form runs as plain BM25.
        """
        forms = self._word_forms()
        words = bm25_tokens([query])[0] if forms else []
        groups = [[w] + [v for v in forms.get(self._stemmer.stem(w), ()) if inflected_forms(w, v)] for w in words]
        bm25 = self.index.bm25
        if bm25 is None or not any(len(g) > 1 for g in groups):
            return self.index.sparse_search(query, depth, **({"filters": filters} if filters else {}))

        def compute():
            vocab = getattr(bm25, "vocab_dict", None) or {}
            total = np.zeros(len(self.index.chunks), np.float64)
            for group in groups:
                known = [f for f in group if f in vocab]
                if known:
                    total += np.max([np.asarray(bm25.get_scores([f]), np.float64) for f in known], axis=0)
            if filters:
                wanted = check_filters(filters)
                total *= np.array([chunk_matches(c, wanted) for c in self.index.chunks], np.float64)
            order = np.argsort(-total, kind="stable")[:depth]
            return [(int(i), float(total[i])) for i in order if total[i] > 0]

        key = ("word_forms", query, depth, repr(sorted((filters or {}).items(), key=str)))
        return list(self.index.cached(key, compute))

    def _word_forms(self) -> dict[str, tuple[str, ...]]:
        # {stem: indexed words with that stem}, rebuilt when the index changes.
        version = self.index.version
        if getattr(self, "_forms_version", None) != version:
            vocab = getattr(self.index.bm25, "vocab_dict", None) or {}
            from nltk.stem.snowball import SnowballStemmer

            self._stemmer = SnowballStemmer("english")
            forms: dict[str, list[str]] = {}
            for word in vocab:
                if isinstance(word, str) and word.isalpha():
                    forms.setdefault(self._stemmer.stem(word), []).append(word)
            self._forms = {s: tuple(sorted(w)) for s, w in forms.items()}
            self._forms_version = version
        return self._forms

    def _rerank(self, query: str, ranked: list[tuple[int, float]], depth: int, how: str, rrf_k: int):
        head, rest = ranked[:depth], ranked[depth:]
        if not head:
            return ranked, {}
        scores = np.asarray(self.reranker.score(query, [self.index.chunks[i] for i, _ in head]), np.float64)
        order = np.argsort(-scores, kind="stable")
        by_rerank = [head[j][0] for j in order]
        details = {i: {"first_stage": float(s), "rerank": float(r)} for (i, s), r in zip(head, scores)}
        if how == "replace":
            reranked = [(head[j][0], float(scores[j])) for j in order]
        else:
            # RRF of the two orders: the re-ranker refines the first stage instead of overruling it,
            # which matters when the re-ranker was not trained for this corpus.
            reranked = reciprocal_rank_fusion([[i for i, _ in head], by_rerank], k=rrf_k)
        # Candidates past the re-ranking depth keep their first-stage order, below every re-ranked one.
        floor = min(s for _, s in reranked)
        return list(reranked) + [(i, floor - 1e-9 * (n + 1)) for n, (i, _) in enumerate(rest)], details

    def confidence(self, query: str, hits: Sequence[Hit]) -> float:
        """Retrieval confidence: the best cosine between the query and the retrieved chunks.

        Fused and BM25 scores are not comparable across queries; the cosine of a unit-length
        embedding is, which is what a "not covered" threshold needs (see answer.py).
        """
        if not hits:
            return 0.0
        q = np.asarray(self.embed_query(query), np.float64)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        vectors = np.asarray(self.index.embeddings[[h.position for h in hits]], np.float64)
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        return float((vectors @ q).max())

    def multi_hop(self, query: str, hops: int = 2, k: int = 10, **options) -> tuple[list[Hit], list[str]]:
        """Multi-hop retrieval: search, rewrite the question from what was found, search again.

        The rewrite comes from the generator when one is configured (it is asked for the next
        search query given the passages), else it is extractive: the question plus the most
        telling terms of the top passages that the question lacks (`expand.extractive_rewrite`).
        Every hop's list is fused by RRF, the original question's first. Returns the fused hits
        (each tagged with the hop that first found it) and the queries that were run.
        """
        if hops < 1:
            raise ValueError(f"hops must be >= 1, got {hops}")
        queries, lists, first_hop = [query], [], {}
        for hop in range(hops):
            hits = self.search(queries[-1], k=max(k, 10), **options)
            lists.append([h.position for h in hits])
            for h in hits:
                first_hop.setdefault(h.position, hop)
            if hop == hops - 1:
                break
            passages = [h.chunk.text for h in hits[:3]]
            rewrite = (
                generative_rewrite(self.generator, query, passages)
                if self.generator is not None
                else extractive_rewrite(query, passages)
            )
            if not rewrite or rewrite in queries:
                break
            queries.append(rewrite)
        fused = reciprocal_rank_fusion(lists, k=options.get("rrf_k", 60))[:k]
        return [Hit(self.index.chunks[i], float(s), i, hop=first_hop[i]) for i, s in fused], queries


def index_documents(
    paths: Sequence[str | Path], embedder: Embedder, strategy: str = "auto", **build_options
) -> tuple[HybridIndex, list[tuple[str, str]]]:
    """Load, chunk and index files and folders; returns the index and the skipped files with reasons."""
    if not paths:
        raise ValueError("no paths given; pass files or folders of .txt, .md, .html, .pdf or .docx documents")
    index, skipped = HybridIndex.build_from_paths([Path(p) for p in paths], embedder, strategy, **build_options)
    return index, skipped


# -- opening indexes, and the embedded index over genforge's own docs ---------------------------


def embedder_for_index(directory: str | Path, encoder: str | Path | None = None) -> Embedder:
    """The `EncoderEmbedder` matching the model named in an index's manifest (same encoder and
    token window), so that queries land in the index's vector space."""
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        raise RagIndexError(
            f"{directory} is not a genforge RAG index (no {MANIFEST}); build one with `genforge rag index`"
        )
    model = json.loads(manifest_path.read_text())["embedding_model"]
    window = re.search(r"/max(\d+)$", model)
    embedder = EncoderEmbedder(encoder, max_tokens=int(window.group(1)) if window else None)
    if embedder.name != model:
        hint = "pass --encoder with the encoder directory it was built with" if encoder is None else "rebuild the index"
        raise RagIndexError(
            f"{directory} was built with embedding model {model!r}; the encoder at hand is {embedder.name!r}; {hint}"
        )
    return embedder


def cache_dir() -> Path:
    """genforge's user cache: $GENFORGE_CACHE_DIR, else $XDG_CACHE_HOME/genforge, else ~/.cache/genforge."""
    if os.environ.get("GENFORGE_CACHE_DIR"):
        return Path(os.environ["GENFORGE_CACHE_DIR"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "genforge"


def docs_dir() -> Path:
    """genforge's own documentation folder: $GENFORGE_DOCS if set; else the checkout's docs/
    (an editable install); else where a wheel install put them (<prefix>/share/genforge/docs)."""
    if os.environ.get("GENFORGE_DOCS"):
        candidates = [Path(os.environ["GENFORGE_DOCS"])]
    else:
        schemes = (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user"))
        candidates = [Path(__file__).resolve().parents[3] / "docs"]
        candidates += [Path(sysconfig.get_path("data", scheme)) / "share" / "genforge" / "docs" for scheme in schemes]
    for directory in candidates:
        if directory.is_dir() and any(directory.glob("*.md")):
            return directory
    raise FileNotFoundError(
        f"genforge's docs folder was not found (looked in {', '.join(map(str, candidates))}); "
        "set GENFORGE_DOCS to it, or pass --index DIR built with `genforge rag index`"
    )


def default_docs_index(
    embedder: Embedder | None = None, docs: str | Path | None = None
) -> tuple[HybridIndex, Embedder]:
    """The embedded index over genforge's docs, built on first use into the user cache.

    Its directory name carries a digest of the docs' bytes and the embedding model, so an edited
    page or another model means a new index; it is written atomically (`HybridIndex.save`), so
    two processes racing to build it leave one complete index, and older versions are removed.
    """
    docs = Path(docs) if docs is not None else docs_dir()
    embedder = embedder or EncoderEmbedder()
    files = sorted(p for p in docs.rglob("*") if p.is_file() and p.suffix in (".md", ".markdown", ".txt"))
    chunking = {"max_chars": 1500}
    digest = hashlib.sha256(f"{embedder.name}|markdown|{chunking}|text{EMBEDDING_TEXT_VERSION}".encode())
    for p in files:
        digest.update(str(p.relative_to(docs)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    root = cache_dir() / "rag"
    target = root / f"docs-{digest.hexdigest()[:16]}"
    if (target / "manifest.json").is_file():
        return HybridIndex.load(target, embedder), embedder
    # Markdown sections (not "auto"): numbered lists in the docs would pass for Q&A items.
    index, _ = index_documents(files, embedder, "markdown", chunk_options=chunking)
    index.save(target)
    for old in root.glob("docs-*"):
        if old != target and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return index, embedder


def open_retriever(
    index_dir: str | Path | None = None, encoder: str | Path | None = None, generator=None, reranker=None
) -> Retriever:
    """A `Retriever` over a saved index (its embedder chosen from its manifest), or over the
    embedded docs index when `index_dir` is None. `reranker` is a re-ranker or a spec for
    `make_reranker` ("late" shares the index's encoder instead of loading a second copy)."""
    if isinstance(reranker, str) and reranker != "late":
        reranker = make_reranker(reranker)  # a bad spec fails before the index loads
    if index_dir is None:
        index, embedder = default_docs_index()
    else:
        embedder = embedder_for_index(index_dir, encoder)
        index = HybridIndex.load(index_dir, embedder)
    if reranker == "late":
        # Passage token vectors persist in the user cache, keyed by the embedding model.
        key = hashlib.sha256(embedder.name.encode()).hexdigest()[:16]
        reranker = LateInteractionReranker(
            TokenEmbedder(getattr(embedder, "encoder", None)), cache_path=cache_dir() / "rag" / f"late-tokens-{key}.npz"
        )
    return Retriever(index, embedder, generator=generator, reranker=reranker)


def make_reranker(spec: str | None, encoder=None):
    """A re-ranker from a short spec: None, "late" (MaxSim over token vectors of `encoder`, by
    default the offline MiniLM) or a cross-encoder directory."""
    if spec is None:
        return None
    if spec == "late":
        return LateInteractionReranker(TokenEmbedder(encoder))
    if Path(spec).is_dir():
        return CrossEncoderReranker(spec)
    raise ValueError(f"re-ranker {spec!r} is neither 'late' (MaxSim late interaction) nor a cross-encoder directory")
