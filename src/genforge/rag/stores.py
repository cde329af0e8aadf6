"""Vector stores for a `HybridIndex`: what the index needs from a backend (`VectorStore`), the
error every part of an index raises, and FAISS (Johnson et al. 2017), the in-process store.
Milvus, the other backend, is in `milvus.py`; the dense index kinds are described in `index.py`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .chunking import Chunk

DENSE_KINDS = ("flat", "hnsw", "ivf")
# FAISS warns below 39 training points per k-means centroid: fewer leave cells poorly placed.
IVF_POINTS_PER_LIST = 39


class RagIndexError(ValueError):
    """An index that cannot be built or used as asked; the message says what and why."""


class VectorStore(Protocol):
    """Dense vectors under stable int64 ids; what `HybridIndex` needs from a backend."""

    backend: str
    kind: str

    def add(self, ids: np.ndarray, vectors: np.ndarray, chunks: Sequence[Chunk]) -> None: ...
    def remove(self, ids: np.ndarray) -> None: ...
    def search(
        self, query: np.ndarray, k: int, filters: Mapping[str, tuple] | None, allowed_ids: np.ndarray | None
    ) -> list[tuple[int, float]]: ...
    def count(self) -> int: ...
    def set_search_options(self, nprobe: int | None = None, ef_search: int | None = None) -> None: ...
    def save(self, directory: Path) -> dict: ...
    def close(self) -> None: ...


def default_nlist(n: int) -> int:
    """sqrt(n) cells, the usual starting point, but never fewer than 39 training points per cell."""
    return max(1, min(int(round(math.sqrt(n))), n // IVF_POINTS_PER_LIST))


class FaissStore:
    """A FAISS index holding ids: `IndexIDMap2` over flat or HNSW storage, or an `IndexIVFFlat`
    (which keeps ids in its inverted lists itself).

    Flat and IVF delete in place (`remove_ids`). An HNSW graph cannot drop a node, so a deleted
    HNSW vector becomes a tombstone: it stays in the graph as a waypoint but an id selector keeps
    it out of results. When tombstones pass a quarter of the graph it is rebuilt from the
    vectors it stores (no re-embedding), because a graph of mostly dead nodes wastes the search."""

    backend = "faiss"
    COMPACT_FRACTION = 0.25

    def __init__(self, index, kind: str, tombstones: Iterable[int] = ()) -> None:
        import faiss

        self.index, self.kind = index, kind
        # The graph degree M is kept so that a rebuilt graph (after deletes) matches the original.
        self.hnsw_m = faiss.downcast_index(index.index).hnsw.nb_neighbors(1) if kind == "hnsw" else None
        self.tombstones = np.array(sorted(set(int(i) for i in tombstones)), np.int64)

    @classmethod
    def create(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        kind: str,
        hnsw_m: int = 32,
        ivf_nlist: int | None = None,
        ivf_nprobe: int | None = None,
        hnsw_ef_search: int = 128,
    ) -> FaissStore:
        import faiss

        dim = vectors.shape[1]
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            graph = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efSearch = hnsw_ef_search  # a wide beam: recall close to exact on corpora of this size
            index = faiss.IndexIDMap2(graph)
        else:
            n = len(vectors)
            nlist = ivf_nlist if ivf_nlist is not None else default_nlist(n)
            if nlist < 1:
                raise RagIndexError(f"IVF nlist must be >= 1, got {nlist}")
            if n < nlist:
                raise RagIndexError(
                    f"IVF with nlist={nlist} needs at least {nlist} vectors to train its k-means quantizer "
                    f"(better {IVF_POINTS_PER_LIST * nlist}); got {n}. Use a smaller ivf_nlist, or dense='flat'"
                )
            if ivf_nprobe is not None and ivf_nprobe < 1:
                raise RagIndexError(f"IVF nprobe must be >= 1, got {ivf_nprobe}")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(np.ascontiguousarray(vectors, np.float32))
            index.nprobe = min(nlist, ivf_nprobe if ivf_nprobe is not None else max(1, nlist // 8))
        store = cls(index, kind)
        store.add(ids, vectors, ())
        return store

    @property
    def nprobe(self) -> int | None:
        return int(self.index.nprobe) if self.kind == "ivf" else None

    def set_search_options(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        import faiss

        if nprobe is not None:
            if self.kind != "ivf":
                raise RagIndexError(f"nprobe applies to dense='ivf' indexes, this one is {self.kind!r}")
            if not 1 <= nprobe <= self.index.nlist:
                raise RagIndexError(f"nprobe must be in [1, nlist={self.index.nlist}], got {nprobe}")
            self.index.nprobe = nprobe
        if ef_search is not None:
            if self.kind != "hnsw":
                raise RagIndexError(f"ef_search applies to dense='hnsw' indexes, this one is {self.kind!r}")
            if ef_search < 1:
                raise RagIndexError(f"ef_search must be >= 1, got {ef_search}")
            faiss.downcast_index(self.index.index).hnsw.efSearch = ef_search

    def add(self, ids: np.ndarray, vectors: np.ndarray, chunks: Sequence[Chunk]) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))

    def remove(self, ids: np.ndarray) -> None:
        import faiss

        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return
        if self.kind != "hnsw":
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
            return
        self.tombstones = np.union1d(self.tombstones, ids)
        if len(self.tombstones) > self.COMPACT_FRACTION * self.index.ntotal:
            self.compact()

    def compact(self) -> None:
        """Rebuild an HNSW graph without its tombstones."""
        import faiss

        if self.kind != "hnsw" or not len(self.tombstones):
            return
        graph = faiss.downcast_index(self.index.index)
        kept_ids = faiss.vector_to_array(self.index.id_map)
        keep = ~np.isin(kept_ids, self.tombstones)
        vectors = graph.reconstruct_n(0, graph.ntotal)[keep] if graph.ntotal else np.zeros((0, graph.d), np.float32)
        fresh = faiss.IndexHNSWFlat(graph.d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        fresh.hnsw.efSearch = graph.hnsw.efSearch
        self.index = faiss.IndexIDMap2(fresh)
        self.tombstones = np.zeros(0, np.int64)
        self.add(kept_ids[keep], vectors, ())

    def search(
        self, query: np.ndarray, k: int, filters=None, allowed_ids: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        import faiss

        k = min(k, self.count())
        if k <= 0:
            return []
        params = None
        selector = None
        if allowed_ids is not None:
            if not len(allowed_ids):
                return []
            # An id selector prunes inside the search itself, so k results come back whenever k
            # chunks pass the filter (over-fetching and filtering afterwards could come up short).
            # The caller passes live ids only, so tombstones are excluded too.
            selector = faiss.IDSelectorBatch(np.asarray(allowed_ids, np.int64))
        elif len(self.tombstones):
            dead = faiss.IDSelectorBatch(self.tombstones)
            selector = faiss.IDSelectorNot(dead)
        if selector is not None:
            if self.kind == "ivf":
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
            elif self.kind == "hnsw":
                params = faiss.SearchParametersHNSW(
                    sel=selector, efSearch=faiss.downcast_index(self.index.index).hnsw.efSearch
                )
            else:
                params = faiss.SearchParameters(sel=selector)
            # `selector` stays referenced in this frame until the search returns (FAISS holds a raw pointer).
        scores, ids = self.index.search(np.ascontiguousarray(query.reshape(1, -1), np.float32), k, params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def count(self) -> int:
        """Live vectors (tombstones not counted)."""
        return int(self.index.ntotal) - len(self.tombstones)

    def save(self, directory: Path) -> dict:
        import faiss

        faiss.write_index(self.index, str(directory / "dense.faiss"))
        if len(self.tombstones):
            np.save(directory / "dense_tombstones.npy", self.tombstones, allow_pickle=False)
        return {"backend": "faiss", "kind": self.kind, "tombstones": len(self.tombstones)}

    @classmethod
    def load(cls, directory: Path, spec: dict) -> FaissStore:
        import faiss

        tombstones = np.load(directory / "dense_tombstones.npy", allow_pickle=False) if spec.get("tombstones") else ()
        return cls(faiss.read_index(str(directory / "dense.faiss")), spec["kind"], tombstones)

    def close(self) -> None:
        pass
