"""Indexes over chunks: BM25 (Robertson & Zaragoza 2009) through `bm25s`, and dense vectors in a
vector store: FAISS (Johnson et al. 2017) in this process, Milvus (Wang et al. 2021,
"Milvus: A Purpose-Built Vector Data Management System") locally as Milvus Lite or on a server,
or Qdrant embedded (in memory or a directory) or on a server.

Dense index kinds (the same names for every backend; Qdrant has no `ivf`):

- `flat`: exact inner product over unit vectors (cosine). Every query touches every vector.
- `hnsw`: a hierarchical navigable small-world graph (Malkov & Yashunin 2018); approximate,
  with query time roughly logarithmic in the corpus size.
- `ivf`: an inverted file (Jégou, Douze & Schmid 2011, "Product quantization for nearest
  neighbor search", section on the coarse quantizer): k-means splits the vectors into `nlist`
  cells and a query scans only the `nprobe` nearest cells.

Embeddings come from an `Embedder` (by default genforge's `SentenceEncoder` running
all-MiniLM-L6-v2) and are cached by content hash, so re-indexing unchanged chunks embeds
nothing. Every chunk carries a stable integer id, which is what the vector store holds, so
documents can be added, replaced and deleted without rebuilding the dense index; BM25 is
re-fitted from the stored chunk texts after each change, because bm25s has no incremental add
(its scores depend on corpus-wide document frequencies and the average length anyway).

With `multivector=True` the index also keeps every chunk's token vectors, compressed, for
ColBERT-style MaxSim search as a first stage (`multivector.py`); they follow every add, update
and delete, and are saved in the index directory's `multivector/`.

An index is a directory written atomically (built in a temporary sibling, then renamed into
place) with a manifest naming the embedding model; loading it with a different model is
refused, because vectors from two models live in unrelated spaces.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import staged_directory
from .chunking import Chunk, chunk_document
from .embedders import Embedder, EmbeddingCache
from .embedders import EncoderEmbedder as EncoderEmbedder  # docs/serving.md names genforge.rag.index.EncoderEmbedder
from .filters import Filters, check_filters, chunk_matches
from .loaders import load_documents
from .milvus import MilvusStore, check_uri
from .multivector import DEFAULT_CANDIDATES, DEFAULT_NPROBE, MultiVectorIndex
from .qdrant import QdrantStore, check_location
from .rerank import TokenEmbedder
from .stores import DENSE_KINDS, IVF_POINTS_PER_LIST, FaissStore, RagIndexError, VectorStore

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # version 1 (no chunk ids) is converted on load
BACKENDS = ("faiss", "milvus", "qdrant")
MANIFEST = "manifest.json"
MULTIVECTOR_DIR = "multivector"
# A filter passing at most this many chunks is answered by exact scoring of just those chunks.
FILTERED_EXACT_LIMIT = 2048


class QueryCache:
    """Results of repeated identical searches, least recently used evicted first.

    Keys include the index version, and the cache empties itself when it sees a new version,
    so a result computed before an add, update or delete is never returned after it."""

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 0:
            raise ValueError(f"query cache size must be >= 0 (0 disables it), got {max_entries}")
        self.max_entries = max_entries
        self.entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.version: int | None = None
        self.hits = self.misses = 0

    def get_or_compute(self, version: int, key: Hashable, compute: Callable[[], Any]) -> Any:
        if version != self.version:
            self.entries.clear()
            self.version = version
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = compute()
        if self.max_entries:
            self.entries[key] = value
            if len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        return value


def _open_milvus(spec: dict, token: str | None, create: dict | None = None) -> MilvusStore:
    if create is not None:
        return MilvusStore.create(spec["uri"], token=token, collection=spec.get("collection"), **create)
    return MilvusStore.open(
        spec["uri"],
        token=token,
        collection=spec["collection"],
        kind=spec["kind"],
        dimension=spec["dimension"],
        search_params=spec.get("search_params"),
    )


def _open_qdrant(spec: dict, api_key: str | None, create: dict | None = None) -> QdrantStore:
    if create is not None:
        return QdrantStore.create(spec["location"], api_key=api_key, collection=spec.get("collection"), **create)
    return QdrantStore.open(
        spec["location"],
        api_key=api_key,
        collection=spec["collection"],
        kind=spec["kind"],
        dimension=spec["dimension"],
        search_params=spec.get("search_params"),
    )


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def fit_bm25(chunks: Sequence[Chunk]):
    import bm25s

    if not chunks:
        return None
    bm25 = bm25s.BM25()
    bm25.index(bm25_tokens([c.text for c in chunks]), show_progress=False)
    return bm25


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: how re-indexing tells a changed file from an unchanged one."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def token_embedder_for(embedder: Embedder, max_tokens: int | None = None) -> TokenEmbedder:
    """Token vectors from the encoder behind `embedder` (an `EncoderEmbedder`), with its window:
    what a multi-vector index stores and what its queries are encoded with."""
    encoder = getattr(embedder, "encoder", None)
    if encoder is None:
        raise RagIndexError(
            f"multi-vector search needs token vectors, and embedder {embedder.name!r} has no encoder to give them; "
            "use an EncoderEmbedder or pass token_embedder=..."
        )
    return TokenEmbedder(encoder, max_tokens=max_tokens)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    # Unit length makes inner product equal cosine similarity, whatever the model does.
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


class HybridIndex:
    """Chunks with a BM25 index and a dense vector store over their embeddings.

    `chunks`, `embeddings` and `ids` are kept in the same order; search results name chunks by
    their position in that order. `ids` are the stable ids the vector store holds: positions
    shift when chunks are deleted, ids never do. `version` counts changes (it keys the query
    cache); `file_hashes` maps each indexed source file to the SHA-256 of its bytes."""

    def __init__(
        self,
        chunks: list[Chunk],
        embeddings: np.ndarray,
        model: str,
        dense_kind: str,
        bm25,
        faiss_index=None,
        *,
        ids: np.ndarray | None = None,
        store: VectorStore | None = None,
        file_hashes: dict[str, str] | None = None,
        query_cache_size: int = 1024,
        multivector: MultiVectorIndex | None = None,
        token_embedder=None,
    ) -> None:
        import faiss

        self.chunks, self.embeddings, self.model = list(chunks), np.asarray(embeddings, np.float32), model
        self.dense_kind, self.bm25 = dense_kind, bm25
        self.ids = np.arange(len(self.chunks), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        if store is None:
            if faiss_index is None:
                raise RagIndexError("HybridIndex needs a vector store (or a FAISS index)")
            if isinstance(faiss_index, (faiss.IndexIDMap2, faiss.IndexIVF)):
                store = FaissStore(faiss_index, dense_kind)
            else:
                # A bare index (format 1) numbers vectors by position and cannot delete without
                # renumbering; re-insert the stored vectors under ids (no re-embedding).
                store = FaissStore.create(self.embeddings, self.ids, dense_kind)
        self.store = store
        self.file_hashes = dict(file_hashes or {})
        self.version = 0
        self.query_cache = QueryCache(query_cache_size)
        self.filtered_exact_limit = FILTERED_EXACT_LIMIT
        self.last_build_embedded = 0
        self._positions: dict[int, int] | None = None
        # The next id to hand out; it only grows, so a deleted chunk's id is never reused.
        self.next_id = int(self.ids.max()) + 1 if len(self.ids) else 0
        # Token vectors for MaxSim first-stage search (None: not built); `token_embedder` encodes
        # new chunks and queries for it (derived from the embedder on first need when None).
        self.multivector = multivector
        self.token_embedder = token_embedder

    @property
    def faiss_index(self):
        """The FAISS index of a FAISS-backed index (None for Milvus)."""
        return self.store.index if isinstance(self.store, FaissStore) else None

    @property
    def backend(self) -> str:
        return self.store.backend

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        chunks: Sequence[Chunk],
        embedder: Embedder,
        dense: str = "flat",
        cache: EmbeddingCache | None = None,
        hnsw_m: int = 32,
        *,
        backend: str = "faiss",
        ivf_nlist: int | None = None,
        ivf_nprobe: int | None = None,
        ivf_fallback: bool = True,
        milvus_uri: str | None = None,
        milvus_token: str | None = None,
        milvus_collection: str | None = None,
        qdrant_location: str | None = None,
        qdrant_api_key: str | None = None,
        qdrant_collection: str | None = None,
        file_hashes: dict[str, str] | None = None,
        multivector: bool = False,
        multivector_options: Mapping[str, Any] | None = None,
        token_embedder=None,
    ) -> HybridIndex:
        """Index chunks for BM25 and dense search.

        `cache` (e.g. `old_index.embedding_cache()`) supplies vectors for chunks whose text has not
        changed. `dense` is flat, hnsw or ivf; for ivf, `ivf_nlist` defaults to sqrt(n) capped so
        each cell trains on >= 39 vectors, and `ivf_nprobe` to nlist/8. Fewer than 78 chunks (two
        cells of 39) fall back to exact search with a warning (`ivf_fallback=False` raises
        instead). Options are checked before anything is embedded. `backend="milvus"` keeps the vectors in Milvus at
        `milvus_uri`: a path ending in `.db` (Milvus Lite, no server) or `http(s)://host:19530`;
        `backend="qdrant"` in Qdrant at `qdrant_location`: ":memory:", a directory (embedded, no
        server) or `http(s)://host:6333`, with `qdrant_api_key` for a secured server.
        `multivector=True` also indexes every chunk's token vectors for MaxSim search
        (`MultiVectorIndex.from_token_vectors` options in `multivector_options`: compression,
        bits, nlist), encoded by `token_embedder` (default: the embedder's own encoder)."""
        if dense not in DENSE_KINDS:
            raise RagIndexError(f"dense index kind {dense!r} is not supported; accepted: {', '.join(DENSE_KINDS)}")
        if backend not in BACKENDS:
            raise RagIndexError(f"vector backend {backend!r} is not supported; accepted: {', '.join(BACKENDS)}")
        if backend == "milvus" and not milvus_uri:
            raise RagIndexError(
                "backend='milvus' needs milvus_uri: a local file ending in .db (Milvus Lite) "
                "or a server URI such as http://localhost:19530"
            )
        if hnsw_m < 2:
            raise RagIndexError(f"hnsw_m (graph degree) must be >= 2, got {hnsw_m}")
        if backend == "milvus":
            check_uri(milvus_uri)
        if backend == "qdrant":
            if not qdrant_location:
                raise RagIndexError(
                    "backend='qdrant' needs qdrant_location: ':memory:', a local directory (embedded mode) "
                    "or a server URL such as http://localhost:6333"
                )
            check_location(qdrant_location)
            if dense == "ivf":
                raise RagIndexError("Qdrant has no IVF index; use dense='flat' (exact) or dense='hnsw'")
        chunks = list(chunks)
        if not chunks:
            raise RagIndexError("no chunks to index; load and chunk at least one readable document first")
        if multivector_options and not multivector:
            raise RagIndexError("multivector_options were given but multivector=False; pass multivector=True")
        if multivector and token_embedder is None:
            token_embedder = token_embedder_for(embedder)
        if ivf_nprobe is not None and ivf_nprobe < 1:
            raise RagIndexError(f"IVF nprobe must be >= 1, got {ivf_nprobe}")
        if dense == "ivf" and ivf_nlist is not None and not 1 <= ivf_nlist <= len(chunks):
            raise RagIndexError(
                f"IVF with nlist={ivf_nlist} needs at least {ivf_nlist} vectors to train its k-means "
                f"quantizer (better {IVF_POINTS_PER_LIST * ivf_nlist}); got {len(chunks)}. "
                "Use a smaller ivf_nlist, or dense='flat'"
            )
        if dense == "ivf" and ivf_nlist is None and len(chunks) < 2 * IVF_POINTS_PER_LIST:
            message = (
                f"{len(chunks)} chunks are too few to train an IVF quantizer (at least {2 * IVF_POINTS_PER_LIST} "
                "give two cells of 39); exact search is as fast at this size"
            )
            if not ivf_fallback:
                raise RagIndexError(message + "; use dense='flat'")
            warnings.warn(message + "; using dense='flat'", stacklevel=2)
            dense = "flat"
        cache = cache if cache is not None else EmbeddingCache(embedder.name)
        misses = cache.misses
        vectors = _unit_rows(cache.embed([c.embedding_text for c in chunks], embedder))
        ids = np.arange(len(chunks), dtype=np.int64)
        tokens = None
        if multivector:  # before any vector store is opened, so a bad option leaves nothing behind
            tokens = MultiVectorIndex.build(
                [c.embedding_text for c in chunks], ids, token_embedder, **dict(multivector_options or {})
            )
        if backend == "faiss":
            store = FaissStore.create(vectors, ids, dense, hnsw_m=hnsw_m, ivf_nlist=ivf_nlist, ivf_nprobe=ivf_nprobe)
        elif backend == "qdrant":
            store = _open_qdrant(
                {"location": qdrant_location, "collection": qdrant_collection},
                qdrant_api_key,
                create={"dimension": vectors.shape[1], "kind": dense, "hnsw_m": hnsw_m},
            )
            try:
                store.add(ids, vectors, chunks)
            except BaseException:
                store.close()
                raise
        else:
            store = _open_milvus(
                {"uri": milvus_uri, "collection": milvus_collection},
                milvus_token,
                create={
                    "dimension": vectors.shape[1],
                    "kind": dense,
                    "hnsw_m": hnsw_m,
                    "ivf_nlist": ivf_nlist,
                    "ivf_nprobe": ivf_nprobe,
                    "count": len(chunks),
                },
            )
            store.add(ids, vectors, chunks)
        index = cls(
            chunks,
            vectors,
            embedder.name,
            dense,
            fit_bm25(chunks),
            store=store,
            ids=ids,
            file_hashes=file_hashes,
            multivector=tokens,
            token_embedder=token_embedder,
        )
        index.last_build_embedded = cache.misses - misses
        return index

    @classmethod
    def build_from_paths(
        cls,
        paths: Iterable[str | Path] | str | Path,
        embedder: Embedder,
        strategy: str = "auto",
        chunk_options: Mapping[str, Any] | None = None,
        **build_options,
    ) -> tuple[HybridIndex, list]:
        """Load files and folders, chunk them and build; records each file's hash so that a
        later `sync` re-reads only what changed. Returns (index, skipped files with reasons)."""
        documents, skipped = load_documents(paths)
        chunks = [c for d in documents for c in chunk_document(d, strategy, **dict(chunk_options or {}))]
        hashes = {d.source: file_digest(d.source) for d in documents}
        return cls.build(chunks, embedder, file_hashes=hashes, **build_options), skipped

    def embedding_cache(self) -> EmbeddingCache:
        return EmbeddingCache(self.model, {c.content_hash: v for c, v in zip(self.chunks, self.embeddings)})

    # -- incremental updates -----------------------------------------------------------------
    def _changed(self) -> None:
        self.bm25 = fit_bm25(self.chunks)
        self._positions = None
        self.version += 1

    def _check_embedder(self, embedder: Embedder) -> None:
        # Checked before any change, so a refused update leaves the index as it was.
        if embedder.name != self.model:
            raise RagIndexError(
                f"this index holds vectors of {self.model!r}; chunks cannot be added with {embedder.name!r}"
            )

    def _append(self, chunks: list[Chunk], embedder: Embedder, cache: EmbeddingCache) -> int:
        misses = cache.misses
        vectors = (
            _unit_rows(cache.embed([c.embedding_text for c in chunks], embedder))
            if chunks
            else np.zeros((0, self.embeddings.shape[1]), np.float32)
        )
        if vectors.shape[1] != self.embeddings.shape[1]:
            raise RagIndexError(
                f"the embedder gives {vectors.shape[1]}-dim vectors; this index holds {self.embeddings.shape[1]}-dim"
            )
        ids = np.arange(self.next_id, self.next_id + len(chunks), dtype=np.int64)
        tokens = None
        if self.multivector is not None and chunks:
            # Encoded before anything changes, so a failure leaves the index as it was.
            tokens = self.tokens_for(embedder).documents([c.embedding_text for c in chunks])
        self.next_id += len(chunks)
        self.store.add(ids, vectors, chunks)
        if tokens is not None:
            self.multivector.add(tokens, ids)
        self.chunks.extend(chunks)
        self.embeddings = np.concatenate([self.embeddings, vectors]) if len(self.embeddings) else vectors
        self.ids = np.concatenate([self.ids, ids])
        return cache.misses - misses

    def _drop(self, mask: np.ndarray) -> int:
        if not mask.any():
            return 0
        self.store.remove(self.ids[mask])
        if self.multivector is not None:
            self.multivector.remove(self.ids[mask])
        self.chunks = [c for c, gone in zip(self.chunks, mask) if not gone]
        self.embeddings, self.ids = self.embeddings[~mask], self.ids[~mask]
        return int(mask.sum())

    def add(self, chunks: Sequence[Chunk], embedder: Embedder, cache: EmbeddingCache | None = None) -> int:
        """Add chunks in place (vectors appended to the store, BM25 re-fitted). Returns how many
        were embedded: chunks whose text the index or `cache` already holds embed nothing."""
        self._check_embedder(embedder)
        cache = cache if cache is not None else self.embedding_cache()
        embedded = self._append(list(chunks), embedder, cache)
        self._changed()
        return embedded

    def delete(self, sources: Iterable[str] | str) -> int:
        """Remove every chunk of the given source paths (document ids); returns how many."""
        sources = {sources} if isinstance(sources, str) else set(sources)
        removed = self._drop(np.array([c.source in sources for c in self.chunks], bool))
        for s in sources:
            self.file_hashes.pop(s, None)
        if removed:
            self._changed()
        return removed

    def upsert(
        self, chunks: Sequence[Chunk], embedder: Embedder, cache: EmbeddingCache | None = None
    ) -> dict[str, int]:
        """Replace the chunks of every source that `chunks` come from with `chunks`.

        Chunks identical to one already indexed keep their id and vector; the rest of that
        source's old chunks are deleted and the new ones added, embedding only texts not seen
        before. Returns counts: kept, added, removed, embedded."""
        self._check_embedder(embedder)
        chunks = list(chunks)
        sources = {c.source for c in chunks}
        known = self.embedding_cache()
        if cache is not None:
            known.vectors.update(cache.vectors)
        # Match old and new chunks as multisets of their full contents: an old chunk equal to a
        # new one stays (id and vector kept); every other old chunk of these sources goes.
        wanted = Counter(json.dumps(c.to_dict(), sort_keys=True) for c in chunks)
        mask = np.zeros(len(self.chunks), bool)
        for pos, c in enumerate(self.chunks):
            if c.source in sources:
                key = json.dumps(c.to_dict(), sort_keys=True)
                if wanted[key] > 0:
                    wanted[key] -= 1
                else:
                    mask[pos] = True
        fresh = []
        for c in chunks:
            key = json.dumps(c.to_dict(), sort_keys=True)
            if wanted[key] > 0:  # what is left over after matching is new
                wanted[key] -= 1
                fresh.append(c)
        kept = len(chunks) - len(fresh)
        removed = self._drop(mask)
        embedded = self._append(fresh, embedder, known)
        if removed or fresh:
            self._changed()
        return {"kept": kept, "added": len(fresh), "removed": removed, "embedded": embedded}

    def sync(
        self,
        paths: Iterable[str | Path] | str | Path,
        embedder: Embedder,
        strategy: str = "auto",
        chunk_options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Bring the index in line with files and folders on disk, by content hash.

        New files are added, files whose bytes changed are re-chunked and upserted (unchanged
        chunks in them embed nothing), and indexed files under the given folders (or given by
        name) that no longer exist are deleted. A file that became unreadable is deleted from
        the index and reported in `skipped`. Returns lists of added, changed, removed and skipped
        paths, the number unchanged, and how many chunks were embedded."""
        self._check_embedder(embedder)
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        files: list[Path] = []
        roots: list[Path] = []
        missing = []
        for p in map(Path, paths):
            if p.is_dir():
                roots.append(p.resolve())
                files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
            elif p.is_file():
                files.append(p)
            else:
                missing.append(p)
                roots.append(p.resolve())  # a given file that is gone: its chunks go too
        indexed = {c.source for c in self.chunks} | set(self.file_hashes)
        by_resolved = {Path(s).resolve(): s for s in indexed}
        on_disk = {f.resolve() for f in files}
        report: dict[str, Any] = {
            "added": [],
            "changed": [],
            "removed": [],
            "skipped": [],
            "unchanged": 0,
            "embedded": 0,
        }
        todo: list[Path] = []
        digests: dict[str, str] = {}
        for f in files:
            source = by_resolved.get(f.resolve(), str(f))
            digest = file_digest(f)
            if source not in indexed:
                report["added"].append(source)
            elif self.file_hashes.get(source) != digest:
                report["changed"].append(source)
            else:
                report["unchanged"] += 1
                continue
            todo.append(Path(source))
            digests[source] = digest
        gone = [
            s
            for r, s in by_resolved.items()
            if r not in on_disk and any(r == root or root in r.parents for root in roots)
        ]
        documents, skipped = load_documents(todo) if todo else ([], [])
        # An unreadable file is only reported (and retried next time); if it was indexed, its
        # old chunks go, since they no longer describe the file.
        report["skipped"] = skipped
        unreadable = {s for s, _ in skipped}
        report["added"] = [s for s in report["added"] if s not in unreadable]
        report["changed"] = [s for s in report["changed"] if s not in unreadable]
        removed_sources = sorted(set(gone) | (unreadable & indexed))
        report["removed"] = removed_sources
        version = self.version
        if removed_sources:
            self.delete(removed_sources)
        new_chunks = [c for d in documents for c in chunk_document(d, strategy, **dict(chunk_options or {}))]
        if new_chunks:
            counts = self.upsert(new_chunks, embedder)
            report["embedded"] = counts["embedded"]
        for d in documents:
            self.file_hashes[d.source] = digests[d.source]
        # A changed file that now chunks to nothing leaves no chunks behind.
        emptied = {d.source for d in documents} - {c.source for c in new_chunks}
        if emptied:
            self.delete(emptied)
        if self.version == version and (documents or removed_sources):
            self.version += 1
        return report

    # -- search ------------------------------------------------------------------------------
    def _position_of(self, chunk_id: int) -> int:
        if self._positions is None:
            self._positions = {int(i): p for p, i in enumerate(self.ids)}
        return self._positions[chunk_id]

    def _allowed_positions(self, filters) -> np.ndarray:
        return np.array([p for p, c in enumerate(self.chunks) if chunk_matches(c, filters)], np.int64)

    def dense_search(self, query_vector: np.ndarray, k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        """(chunk position, cosine) for the k nearest chunks that pass `filters`."""
        checked = check_filters(filters)
        q = np.asarray(query_vector, np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        key = ("dense", q.tobytes(), k, _filter_key(checked))

        def compute():
            allowed = None
            if checked is not None and self.store.backend == "faiss":
                positions = self._allowed_positions(checked)
                if len(positions) <= self.filtered_exact_limit:
                    # Few chunks pass: scoring them directly is exact and cheaper than steering an
                    # approximate index around the rest (HNSW and IVF lose recall under a tight filter).
                    scores = self.embeddings[positions] @ q
                    order = np.argsort(-scores, kind="stable")[:k]
                    return [(int(positions[o]), float(scores[o])) for o in order]
                allowed = self.ids[positions]
            found = self.store.search(q, min(k, len(self.chunks)), checked, allowed)
            return [(self._position_of(i), s) for i, s in found]

        return list(self.query_cache.get_or_compute(self.version, key, compute))

    def sparse_search(self, query: str, k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        """(chunk position, BM25 score) for the k best chunks with a positive score that pass `filters`."""
        checked = check_filters(filters)

        def compute():
            tokens = bm25_tokens([query])
            if not tokens[0] or self.bm25 is None:
                return []
            mask = None
            if checked is not None:
                # bm25s scores every document anyway; the mask zeroes those the filter rejects.
                mask = np.array([chunk_matches(c, checked) for c in self.chunks], np.float32)
                if not mask.any():
                    return []
            ids, scores = self.bm25.retrieve(tokens, k=min(k, len(self.chunks)), show_progress=False, weight_mask=mask)
            return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]

        return list(self.query_cache.get_or_compute(self.version, ("sparse", query, k, _filter_key(checked)), compute))

    def tokens_for(self, embedder: Embedder | None = None) -> TokenEmbedder:
        """The token embedder of the multi-vector index (made from `embedder`'s encoder, with the
        index's token window, the first time one is needed)."""
        if self.token_embedder is None:
            if embedder is None:
                raise RagIndexError("this index has no token embedder yet; pass the embedder it was built with")
            max_tokens = self.multivector.max_tokens if self.multivector is not None else None
            self.token_embedder = token_embedder_for(embedder, max_tokens)
        return self.token_embedder

    def multivector_search(
        self,
        query_tokens: np.ndarray,
        k: int,
        filters: Filters | None = None,
        *,
        nprobe: int = DEFAULT_NPROBE,
        candidates: int = DEFAULT_CANDIDATES,
        exhaustive: bool = False,
    ) -> list[tuple[int, float]]:
        """(chunk position, MaxSim / query tokens) for the k best chunks by late interaction over
        their stored token vectors (see `MultiVectorIndex.search` for the pruning options)."""
        if self.multivector is None:
            raise RagIndexError(
                "this index has no token vectors for multi-vector search; build it with multivector=True "
                "(`genforge rag index --multivector`)"
            )
        checked = check_filters(filters)
        q = np.asarray(query_tokens, np.float32)
        key = ("multivector", q.tobytes(), q.shape, k, nprobe, candidates, exhaustive, _filter_key(checked))

        def compute():
            allowed = self.ids[self._allowed_positions(checked)] if checked is not None else None
            found = self.multivector.search(
                q,
                min(k, len(self.chunks)),
                nprobe=nprobe,
                candidates=candidates,
                exhaustive=exhaustive,
                allowed=allowed,
            )
            # Divided by the query's length: the same order, on a cosine scale like the dense scores.
            return [(self._position_of(i), s / len(q)) for i, s in found]

        return list(self.query_cache.get_or_compute(self.version, key, compute))

    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The query-result cache for callers (e.g. a retriever caching whole fused results):
        `compute()` runs once per key until the index changes."""
        return self.query_cache.get_or_compute(self.version, ("user", key), compute)

    def set_search_options(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF cells scanned per query (`nprobe`) or the HNSW beam width (`ef_search`)."""
        self.store.set_search_options(nprobe=nprobe, ef_search=ef_search)
        self.version += 1  # results may change

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the index to `directory`, replacing any index there only once all is written.
        With the Milvus backend the vectors live in Milvus; the directory holds the rest and
        the collection's address."""
        with staged_directory(directory) as tmp:
            np.save(tmp / "embeddings.npy", self.embeddings, allow_pickle=False)
            np.save(tmp / "ids.npy", self.ids, allow_pickle=False)
            dense = self.store.save(tmp)
            if self.bm25 is not None:
                self.bm25.save(str(tmp / "bm25"))
            if self.multivector is not None:
                self.multivector.write(tmp / MULTIVECTOR_DIR)
            (tmp / "chunks.jsonl").write_text(
                "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in self.chunks)
            )
            manifest = {
                "format_version": FORMAT_VERSION,
                "embedding_model": self.model,
                "dimension": int(self.embeddings.shape[1]),
                "dense_index": self.dense_kind,
                "dense_store": dense,
                "chunks": len(self.chunks),
                "next_id": self.next_id,
                "file_hashes": self.file_hashes,
                "multivector": self.multivector is not None,
            }
            # The manifest is written last: a directory without one is never a finished index.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(
        cls,
        directory: str | Path,
        embedder: Embedder | str,
        milvus_token: str | None = None,
        qdrant_api_key: str | None = None,
    ) -> HybridIndex:
        """Load an index, refusing one whose vectors came from another embedding model. A server
        backend's secret (`milvus_token`, `qdrant_api_key`) is given here: it is never saved."""
        import bm25s

        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            raise RagIndexError(
                f"{directory} is not a genforge RAG index (no {MANIFEST}); build one with HybridIndex.build(...).save(dir)"
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") not in READABLE_FORMATS:
            raise RagIndexError(
                f"{directory}: index format {manifest.get('format_version')} is not supported; "
                f"accepted: {', '.join(map(str, READABLE_FORMATS))}"
            )
        model = embedder if isinstance(embedder, str) else embedder.name
        if manifest["embedding_model"] != model:
            raise RagIndexError(
                f"{directory} was built with embedding model {manifest['embedding_model']!r}, but queries would be embedded "
                f"with {model!r}; vectors from different models are not comparable. Rebuild the index with {model!r} "
                f"or query it with {manifest['embedding_model']!r}."
            )
        if not isinstance(embedder, str) and manifest["dimension"] != embedder.dimension:
            raise RagIndexError(
                f"{directory} holds {manifest['dimension']}-dim vectors; the embedder gives {embedder.dimension}"
            )
        chunks = [Chunk(**json.loads(line)) for line in (directory / "chunks.jsonl").read_text().splitlines() if line]
        embeddings = np.load(directory / "embeddings.npy", allow_pickle=False)
        bm25 = bm25s.BM25.load(str(directory / "bm25")) if (directory / "bm25").exists() else None
        kind = manifest["dense_index"]
        if manifest["format_version"] == 1:
            import faiss

            return cls(chunks, embeddings, model, kind, bm25, faiss.read_index(str(directory / "dense.faiss")))
        ids = np.load(directory / "ids.npy", allow_pickle=False)
        spec = manifest["dense_store"]
        if spec["backend"] == "faiss":
            store = FaissStore.load(directory, spec)
        elif spec["backend"] == "qdrant":
            store = _open_qdrant(spec, qdrant_api_key)
        else:
            store = _open_milvus(spec, milvus_token)
        stored = store.count()
        if stored != len(chunks):
            store.close()  # an embedded store's file or directory is released for the next try
            raise RagIndexError(
                f"{directory}: the {spec['backend']} vector store holds {stored} vectors but the index "
                f"has {len(chunks)} chunks; it was changed without saving this directory. Rebuild the index."
            )
        tokens = None
        if manifest.get("multivector"):
            tokens = MultiVectorIndex.load(directory / MULTIVECTOR_DIR)
            if not np.array_equal(tokens.ids, ids):
                store.close()
                raise RagIndexError(
                    f"{directory}: the token vectors name other chunks than the index; it is damaged. Rebuild the index."
                )
        index = cls(
            chunks,
            embeddings,
            model,
            kind,
            bm25,
            store=store,
            ids=ids,
            file_hashes=manifest.get("file_hashes"),
            multivector=tokens,
        )
        index.next_id = max(index.next_id, int(manifest.get("next_id", 0)))
        return index

    def close(self) -> None:
        """Release the vector store's connection (a Milvus Lite database or an embedded Qdrant
        directory is closed)."""
        self.store.close()


def _filter_key(filters: Mapping[str, tuple] | None) -> Hashable:
    return None if filters is None else tuple(sorted((k, tuple(map(repr, v))) for k, v in filters.items()))
