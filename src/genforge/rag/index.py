"""Indexes over chunks: BM25 (Robertson & Zaragoza 2009) through `bm25s`, and dense vectors
through FAISS (Johnson et al. 2017): exact inner product over unit vectors (cosine), or HNSW
(Malkov & Yashunin 2018) when an approximate graph search is wanted.

Embeddings come from an `Embedder` (by default genforge's `SentenceEncoder` running
all-MiniLM-L6-v2) and are cached by content hash, so re-indexing unchanged chunks embeds
nothing. An index is a directory written atomically (built in a temporary sibling, then
renamed into place) with a manifest naming the embedding model; loading it with a different
model is refused, because vectors from two models live in unrelated spaces.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ..atomic import staged_directory
from .chunking import Chunk

FORMAT_VERSION = 1
DENSE_KINDS = ("flat", "hnsw")
MANIFEST = "manifest.json"


class RagIndexError(ValueError):
    """An index that cannot be built or used as asked; the message says what and why."""


class Embedder(Protocol):
    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class EncoderEmbedder:
    """genforge's `SentenceEncoder` as an `Embedder`; its name identifies the model in manifests."""

    def __init__(self, directory: str | Path | None = None, batch_size: int = 32, device: str = "cpu",
                 max_tokens: int | None = None) -> None:
        from ..encoder import SentenceEncoder, default_encoder_path

        label = "all-MiniLM-L6-v2" if directory is None else Path(directory).name
        directory = Path(directory) if directory is not None else default_encoder_path()
        self.encoder = SentenceEncoder(directory, device=device)
        self.batch_size = batch_size
        if max_tokens is not None:
            # A shorter window embeds faster (attention is quadratic in it); all-MiniLM-L6-v2 was
            # trained on 128-token inputs, so the question and the answer's opening carry the signal.
            self.encoder.max_length = min(max_tokens, self.encoder.max_length)
        self.dimension = self.encoder.dimension
        # The directory name alone could collide (two fine-tunes of one base); the config and
        # weights' size make the name specific without hashing hundreds of megabytes.
        weights = sorted(p.stat().st_size for p in directory.glob("*.safetensors"))
        digest = hashlib.sha256((directory / "config.json").read_bytes() + repr(weights).encode()).hexdigest()[:12]
        self.name = f"{label}@{digest}" + (f"/max{self.encoder.max_length}" if max_tokens is not None else "")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(list(texts), batch_size=self.batch_size).numpy().astype(np.float32)


class EmbeddingCache:
    """Vectors by content hash for one embedding model: only texts not seen before are embedded."""

    def __init__(self, model: str, vectors: dict[str, np.ndarray] | None = None) -> None:
        self.model = model
        self.vectors = dict(vectors or {})
        self.misses = 0

    def embed(self, texts: Sequence[str], embedder: Embedder) -> np.ndarray:
        if embedder.name != self.model:
            raise RagIndexError(f"embedding cache holds vectors of {self.model!r}, not {embedder.name!r}")
        hashes = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        todo = sorted({h: t for h, t in zip(hashes, texts) if h not in self.vectors}.items())
        if todo:
            fresh = embedder.embed([t for _, t in todo])
            self.vectors.update({h: v for (h, _), v in zip(todo, fresh)})
        self.misses += len(todo)
        if not hashes:
            return np.zeros((0, embedder.dimension), np.float32)
        return np.stack([self.vectors[h] for h in hashes]).astype(np.float32)


def _bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class HybridIndex:
    """Chunks with a BM25 index and a FAISS index over their embeddings, kept in the same order."""

    def __init__(self, chunks: list[Chunk], embeddings: np.ndarray, model: str, dense_kind: str, bm25, faiss_index) -> None:
        self.chunks, self.embeddings, self.model = chunks, embeddings, model
        self.dense_kind, self.bm25, self.faiss_index = dense_kind, bm25, faiss_index

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, chunks: Sequence[Chunk], embedder: Embedder, dense: str = "flat",
              cache: EmbeddingCache | None = None, hnsw_m: int = 32) -> "HybridIndex":
        """Index chunks for BM25 and dense search; `cache` (e.g. `old_index.embedding_cache()`)
        supplies vectors for chunks whose text has not changed."""
        import bm25s

        if dense not in DENSE_KINDS:
            raise RagIndexError(f"dense index kind {dense!r} is not supported; accepted: {', '.join(DENSE_KINDS)}")
        chunks = list(chunks)
        if not chunks:
            raise RagIndexError("no chunks to index; load and chunk at least one readable document first")
        cache = cache if cache is not None else EmbeddingCache(embedder.name)
        vectors = cache.embed([c.embedding_text for c in chunks], embedder)
        # Unit length makes inner product equal cosine similarity, whatever the model does.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        bm25 = bm25s.BM25()
        bm25.index(_bm25_tokens([c.text for c in chunks]), show_progress=False)
        index = cls(chunks, vectors, embedder.name, dense, bm25, _faiss_index(vectors, dense, hnsw_m))
        index.last_build_embedded = cache.misses
        return index

    def embedding_cache(self) -> EmbeddingCache:
        return EmbeddingCache(self.model, {c.content_hash: v for c, v in zip(self.chunks, self.embeddings)})

    # -- search ------------------------------------------------------------------------------
    def dense_search(self, query_vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk position, cosine) for the k nearest chunks."""
        q = np.asarray(query_vector, np.float32).reshape(1, -1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        scores, ids = self.faiss_index.search(q, min(k, len(self.chunks)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def sparse_search(self, query: str, k: int) -> list[tuple[int, float]]:
        """(chunk position, BM25 score) for the k best chunks with a positive score."""
        tokens = _bm25_tokens([query])
        if not tokens[0]:
            return []
        ids, scores = self.bm25.retrieve(tokens, k=min(k, len(self.chunks)), show_progress=False)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the index to `directory`, replacing any index there only once all is written."""
        import faiss

        with staged_directory(directory) as tmp:
            np.save(tmp / "embeddings.npy", self.embeddings, allow_pickle=False)
            faiss.write_index(self.faiss_index, str(tmp / "dense.faiss"))
            self.bm25.save(str(tmp / "bm25"))
            (tmp / "chunks.jsonl").write_text("".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in self.chunks))
            manifest = {"format_version": FORMAT_VERSION, "embedding_model": self.model, "dimension": int(self.embeddings.shape[1]),
                        "dense_index": self.dense_kind, "chunks": len(self.chunks)}
            # The manifest is written last: a directory without one is never a finished index.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder | str) -> "HybridIndex":
        """Load an index, refusing one whose vectors came from another embedding model."""
        import bm25s
        import faiss

        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            raise RagIndexError(f"{directory} is not a genforge RAG index (no {MANIFEST}); build one with HybridIndex.build(...).save(dir)")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise RagIndexError(f"{directory}: index format {manifest.get('format_version')} is not supported; accepted: {FORMAT_VERSION}")
        model = embedder if isinstance(embedder, str) else embedder.name
        if manifest["embedding_model"] != model:
            raise RagIndexError(
                f"{directory} was built with embedding model {manifest['embedding_model']!r}, but queries would be embedded "
                f"with {model!r}; vectors from different models are not comparable. Rebuild the index with {model!r} "
                f"or query it with {manifest['embedding_model']!r}."
            )
        if not isinstance(embedder, str) and manifest["dimension"] != embedder.dimension:
            raise RagIndexError(f"{directory} holds {manifest['dimension']}-dim vectors; the embedder gives {embedder.dimension}")
        chunks = [Chunk(**json.loads(line)) for line in (directory / "chunks.jsonl").read_text().splitlines() if line]
        embeddings = np.load(directory / "embeddings.npy", allow_pickle=False)
        bm25 = bm25s.BM25.load(str(directory / "bm25"))
        return cls(chunks, embeddings, model, manifest["dense_index"], bm25, faiss.read_index(str(directory / "dense.faiss")))


def _faiss_index(vectors: np.ndarray, kind: str, hnsw_m: int):
    import faiss

    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128  # a wide beam: recall close to exact on corpora of this size
    index.add(np.ascontiguousarray(vectors, np.float32))
    return index
