"""Dense, sparse and hybrid retrieval, result fusion, and maximal marginal relevance.

- Reciprocal rank fusion (Cormack, Clarke & Büttcher 2009): score(d) = sum over rankings of
  1 / (k + rank(d)), ranks from 1, k = 60 as in the paper. It needs no score calibration,
  which is why it is the default for combining BM25 with cosine similarity.
- Weighted score fusion: each retriever's scores min-max normalised to [0, 1] over its own
  candidates, then a weighted sum (a document missing from a list scores 0 there).
- MMR (Carbonell & Goldstein 1998): pick, one at a time, the candidate maximising
  lambda * sim(query, d) - (1 - lambda) * max sim(d, already picked), trading relevance for
  diversity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from .chunking import Chunk
from .index import Embedder, HybridIndex

FUSIONS = ("rrf", "weighted")
MODES = ("dense", "sparse", "hybrid")


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k: int = 60) -> list[tuple[Hashable, float]]:
    """Fuse ranked lists (best first) into one list of (item, RRF score), best first; ties keep first-seen order."""
    if k < 0:
        raise ValueError(f"RRF constant k must be >= 0, got {k}")
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def weighted_score_fusion(score_lists: Sequence[dict[Hashable, float]], weights: Sequence[float]) -> list[tuple[Hashable, float]]:
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


@dataclass
class Hit:
    chunk: Chunk
    score: float
    position: int  # the chunk's position in the index


class Retriever:
    """Queries a `HybridIndex`: dense (cosine), sparse (BM25) or hybrid (fused), optionally diversified by MMR."""

    def __init__(self, index: HybridIndex, embedder: Embedder) -> None:
        if embedder.name != index.model:
            raise ValueError(f"index was built with {index.model!r}; the query embedder is {embedder.name!r}")
        self.index, self.embedder = index, embedder
        self._query_vectors: dict[str, np.ndarray] = {}

    def embed_query(self, query: str) -> np.ndarray:
        # Dense, hybrid and MMR runs of one query share its vector; the cache is bounded.
        if query not in self._query_vectors:
            if len(self._query_vectors) >= 1024:
                self._query_vectors.clear()
            self._query_vectors[query] = self.embedder.embed([query])[0]
        return self._query_vectors[query]

    def search(self, query: str, k: int = 10, mode: str = "hybrid", fusion: str = "rrf",
               weights: tuple[float, float] = (0.5, 0.5), depth: int = 50, rrf_k: int = 60,
               mmr_lambda: float | None = None) -> list[Hit]:
        """Top-k chunks. Hybrid fuses the top-`depth` of each retriever; `mmr_lambda` re-orders the
        fused candidates by MMR for diversity (None leaves relevance order)."""
        if mode not in MODES:
            raise ValueError(f"retrieval mode {mode!r} is not supported; accepted: {', '.join(MODES)}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion {fusion!r} is not supported; accepted: {', '.join(FUSIONS)}")
        depth = max(depth, k)
        qvec = self.embed_query(query) if mode != "sparse" or mmr_lambda is not None else None
        if mode == "dense":
            ranked = self.index.dense_search(qvec, depth)
        elif mode == "sparse":
            ranked = self.index.sparse_search(query, depth)
        else:
            dense = self.index.dense_search(qvec, depth)
            sparse = self.index.sparse_search(query, depth)
            if fusion == "rrf":
                ranked = reciprocal_rank_fusion([[i for i, _ in dense], [i for i, _ in sparse]], k=rrf_k)
            else:
                ranked = weighted_score_fusion([dict(dense), dict(sparse)], weights)
        if mmr_lambda is not None:
            positions = [i for i, _ in ranked]
            order = mmr(qvec, self.index.embeddings[positions], k, mmr_lambda)
            ranked = [ranked[j] for j in order]
        return [Hit(self.index.chunks[i], s, i) for i, s in ranked[:k]]
