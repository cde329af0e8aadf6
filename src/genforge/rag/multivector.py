"""Multi-vector first-stage retrieval: ColBERT's late interaction (Khattab & Zaharia 2020,
"ColBERT: Efficient and Effective Passage Search via Contextualized Late Interaction over
BERT") searched over the whole corpus, with ColBERTv2's residual compression (Santhanam et al.
2022, "ColBERTv2: Effective and Efficient Retrieval via Lightweight Late Interaction") and
PLAID's centroid pruning (Santhanam et al. 2022, "PLAID: An Efficient Engine for Late
Interaction Retrieval").

Every chunk is stored as one unit vector per token (the contextual outputs of genforge's
encoder, `rerank.TokenEmbedder`); a query scores a chunk by MaxSim, sum over query tokens of
the best cosine with any chunk token. Token vectors are many per chunk, so they are not kept
as floats:

- k-means (FAISS, spherical) splits all token vectors into `nlist` centroids; each token keeps
  its centroid's number (2 bytes) and its residual (vector minus centroid) quantized to `bits`
  bits per dimension. The bucket edges are quantiles of all residual values and each bucket
  decodes to the mean of its quantile range, as in ColBERTv2. A 384-dim token costs
  2 + 384 * bits / 8 bytes instead of 1,536 (float32): 98 bytes at 2 bits.
- Candidate generation: each query token probes its `nprobe` nearest centroids (a FAISS
  inner-product search over the centroids); the candidates are the chunks having a token in
  any probed centroid (an inverted list from centroid to chunks).
- Centroid interaction (PLAID): each candidate is scored by MaxSim with every token replaced by
  its centroid, which needs no decompression; the best `candidates` chunks go on.
- Exact stage: those chunks' tokens are decompressed and scored by MaxSim.

With pruning off (`exhaustive=True`) every chunk is scored exactly, which is brute-force MaxSim
over the stored vectors. Chunks are added (assigned to the existing centroids, compressed with
the existing bucket edges) and removed without re-training; re-build when a corpus has grown
many times over, as for an IVF index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..atomic import staged_directory
from .stores import RagIndexError

COMPRESSIONS = ("residual", "none")
RESIDUAL_BITS = (1, 2, 4, 8)
MANIFEST = "multivector.json"
FORMAT_VERSION = 1
# k-means trains on at most this many token vectors (a uniform sample): centroids settle long before.
KMEANS_SAMPLE = 100_000
QUANTILE_SAMPLE = 1_000_000
# Pruning defaults: on the seeds corpus (640 chunks, 1,024 centroids) they return 99.6% of the
# exhaustive top 10 over 47 queries (benchmarks/results/rag_multivector.md).
DEFAULT_NPROBE = 2
DEFAULT_CANDIDATES = 64


class TokenVectors(Protocol):
    """What gives token vectors: `rerank.TokenEmbedder` (queries through `encode`, passages
    through the cached `documents`), each text a (tokens, dim) matrix of unit rows."""

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def documents(self, texts: Sequence[str]) -> list[np.ndarray]: ...


def default_nlist(tokens: int) -> int:
    """A power of two near 4 sqrt(tokens) (ColBERTv2 uses 16 sqrt for corpora of millions of
    passages; a quarter of that keeps small corpora's cells from holding one token each)."""
    if tokens < 1:
        raise RagIndexError("no token vectors to cluster")
    return int(min(tokens, 2 ** round(np.log2(max(1.0, 4 * np.sqrt(tokens))))))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def _segment_maxsim(sims: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum over rows (query tokens) of each segment's row maximum: MaxSim for documents laid
    out one after another along the columns, `lengths` tokens each (all >= 1)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.maximum.reduceat(sims, starts, axis=1).sum(axis=0)


class MultiVectorIndex:
    """Token vectors of chunks, compressed, searched by MaxSim (see the module docstring).

    Chunks are known by integer id (the ids of the `HybridIndex` they belong to); documents
    are stored in insertion order, `lengths[n]` tokens each, tokens concatenated."""

    def __init__(
        self,
        centroids: np.ndarray,
        codes: np.ndarray,
        lengths: np.ndarray,
        ids: np.ndarray,
        *,
        compression: str,
        bits: int = 0,
        residuals: np.ndarray | None = None,
        cutoffs: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        vectors: np.ndarray | None = None,
        max_tokens: int | None = None,
    ) -> None:
        import faiss

        self.centroids = _unit(centroids)
        self.codes = np.asarray(codes, self._code_dtype(len(self.centroids)))
        self.lengths = np.asarray(lengths, np.int64)
        self.ids = np.asarray(ids, np.int64)
        self.compression, self.bits = compression, int(bits)
        self.residuals, self.cutoffs, self.weights, self.vectors = residuals, cutoffs, weights, vectors
        self.max_tokens = max_tokens
        self._table: np.ndarray | None = None
        self.dimension = self.centroids.shape[1]
        self.centroid_index = faiss.IndexFlatIP(self.dimension)
        self.centroid_index.add(self.centroids)
        self._inverted: tuple[np.ndarray, np.ndarray] | None = None
        self._offsets: np.ndarray | None = None
        self._positions: dict[int, int] | None = None

    @staticmethod
    def _code_dtype(nlist: int):
        return np.uint16 if nlist <= 1 << 16 else np.int32

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def from_token_vectors(
        cls,
        documents: Sequence[np.ndarray],
        ids: Sequence[int] | np.ndarray,
        *,
        compression: str = "residual",
        bits: int = 2,
        nlist: int | None = None,
        seed: int = 0,
        max_tokens: int | None = None,
    ) -> MultiVectorIndex:
        """Cluster, assign and compress token vectors (one (tokens, dim) matrix per document)."""
        import faiss

        if compression not in COMPRESSIONS:
            raise RagIndexError(f"compression {compression!r} is not supported; accepted: {', '.join(COMPRESSIONS)}")
        if compression == "residual" and bits not in RESIDUAL_BITS:
            raise RagIndexError(
                f"residual bits must be one of {', '.join(map(str, RESIDUAL_BITS))} per dimension, got {bits}"
            )
        ids = np.asarray(ids, np.int64)
        if len(documents) != len(ids):
            raise RagIndexError(f"got {len(documents)} documents but {len(ids)} ids; give one id per document")
        if not len(documents):
            raise RagIndexError("no documents to index; give at least one chunk's token vectors")
        lengths = np.array([len(d) for d in documents], np.int64)
        if lengths.min() < 1:
            raise RagIndexError("a document has no token vectors; every chunk needs at least one")
        flat = _unit(np.concatenate([np.asarray(d, np.float32) for d in documents]))
        if nlist is None:
            nlist = default_nlist(len(flat))
        if not 1 <= nlist <= len(flat):
            raise RagIndexError(f"nlist must be between 1 and the number of token vectors ({len(flat)}), got {nlist}")
        rng = np.random.default_rng(seed)
        sample = flat if len(flat) <= KMEANS_SAMPLE else flat[rng.choice(len(flat), KMEANS_SAMPLE, replace=False)]
        kmeans = faiss.Kmeans(
            flat.shape[1],
            nlist,
            niter=20,
            seed=seed,
            spherical=True,
            min_points_per_centroid=1,
            max_points_per_centroid=1 << 20,
        )
        kmeans.train(sample)
        index = cls(
            kmeans.centroids,
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            compression=compression,
            bits=bits if compression == "residual" else 0,
            max_tokens=max_tokens,
        )
        codes = index._assign(flat)
        if compression == "residual":
            residual = flat - index.centroids[codes]
            values = residual.reshape(-1)
            if len(values) > QUANTILE_SAMPLE:
                values = values[rng.choice(len(values), QUANTILE_SAMPLE, replace=False)]
            levels = 1 << bits
            index.cutoffs = np.quantile(values, np.arange(1, levels) / levels).astype(np.float32)
            index.weights = np.quantile(values, (np.arange(levels) + 0.5) / levels).astype(np.float32)
            index.residuals = np.zeros((0, flat.shape[1] * bits // 8), np.uint8)
        else:
            index.vectors = np.zeros((0, flat.shape[1]), np.float16)
        index._append(flat, codes, lengths, ids)
        return index

    @classmethod
    def build(cls, texts: Sequence[str], ids, token_embedder: TokenVectors, **options) -> MultiVectorIndex:
        """Encode passages into token vectors with `token_embedder`, then `from_token_vectors`."""
        max_tokens = getattr(token_embedder, "max_tokens", None)
        return cls.from_token_vectors(token_embedder.documents(list(texts)), ids, max_tokens=max_tokens, **options)

    def _assign(self, flat: np.ndarray) -> np.ndarray:
        _, nearest = self.centroid_index.search(np.ascontiguousarray(flat, np.float32), 1)
        return nearest[:, 0].astype(np.int64)

    def _compress(self, flat: np.ndarray, codes: np.ndarray) -> np.ndarray:
        buckets = np.searchsorted(self.cutoffs, flat - self.centroids[codes], side="right").astype(np.uint8)
        # Each dimension's bucket number as `bits` bits, most significant first, packed 8 to a byte.
        shifts = np.arange(self.bits - 1, -1, -1, dtype=np.uint8)
        bit_planes = (buckets[:, :, None] >> shifts) & 1
        return np.packbits(bit_planes.reshape(len(flat), -1), axis=1)

    def _append(self, flat: np.ndarray, codes: np.ndarray, lengths: np.ndarray, ids: np.ndarray) -> None:
        if self.compression == "residual":
            self.residuals = np.concatenate([self.residuals, self._compress(flat, codes)])
        else:
            self.vectors = np.concatenate([self.vectors, flat.astype(np.float16)])
        self.codes = np.concatenate([self.codes, codes.astype(self.codes.dtype)])
        self.lengths = np.concatenate([self.lengths, lengths])
        self.ids = np.concatenate([self.ids, ids])
        self._changed()

    def _changed(self) -> None:
        self._inverted = self._offsets = self._positions = None

    # -- incremental updates -----------------------------------------------------------------
    def add(self, documents: Sequence[np.ndarray], ids: Sequence[int] | np.ndarray) -> None:
        """Add documents' token vectors under new ids, with the existing centroids and buckets."""
        ids = np.asarray(ids, np.int64)
        if len(documents) != len(ids):
            raise RagIndexError(f"got {len(documents)} documents but {len(ids)} ids; give one id per document")
        if not len(documents):
            return
        clash = set(ids.tolist()) & set(self.ids.tolist())
        if clash or len(set(ids.tolist())) != len(ids):
            raise RagIndexError(f"ids already indexed or repeated: {sorted(clash)[:5] or 'repeated in the batch'}")
        lengths = np.array([len(d) for d in documents], np.int64)
        if lengths.min() < 1:
            raise RagIndexError("a document has no token vectors; every chunk needs at least one")
        flat = _unit(np.concatenate([np.asarray(d, np.float32) for d in documents]))
        if flat.shape[1] != self.dimension:
            raise RagIndexError(f"token vectors have {flat.shape[1]} dims; this index holds {self.dimension}-dim ones")
        self._append(flat, self._assign(flat), lengths, ids)

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove documents by id (unknown ids are ignored); returns how many were removed."""
        gone = np.isin(self.ids, np.asarray(ids, np.int64))
        if not gone.any():
            return 0
        keep_tokens = np.repeat(~gone, self.lengths)
        self.codes = self.codes[keep_tokens]
        if self.compression == "residual":
            self.residuals = self.residuals[keep_tokens]
        else:
            self.vectors = self.vectors[keep_tokens]
        self.lengths, self.ids = self.lengths[~gone], self.ids[~gone]
        self._changed()
        return int(gone.sum())

    # -- search ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return len(self.codes)

    def nbytes(self) -> int:
        """Bytes of the searchable index: centroids, codes, residuals (or vectors), lengths, ids."""
        parts = [self.centroids, self.codes, self.lengths, self.ids]
        parts += [self.residuals, self.cutoffs, self.weights] if self.compression == "residual" else [self.vectors]
        return int(sum(p.nbytes for p in parts))

    def _token_offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        return self._offsets

    def _inverted_lists(self) -> tuple[np.ndarray, np.ndarray]:
        # Centroid -> documents with a token there, as CSR: (starts per centroid, document positions).
        if self._inverted is None:
            docs = np.repeat(np.arange(len(self.ids), dtype=np.int64), self.lengths)
            pairs = np.unique(self.codes.astype(np.int64) * max(len(self.ids), 1) + docs)
            centroid, position = np.divmod(pairs, max(len(self.ids), 1))
            starts = np.searchsorted(centroid, np.arange(len(self.centroids) + 1))
            self._inverted = (starts, position)
        return self._inverted

    def decompress(self, positions: np.ndarray) -> np.ndarray:
        """The stored token vectors (unit rows) of documents at `positions`, concatenated in that order."""
        positions = np.asarray(positions, np.int64)
        offsets = self._token_offsets()
        lengths = self.lengths[positions]
        # Token rows of each document in turn, without a Python loop over documents.
        rows = np.repeat(offsets[positions] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        rows = rows + np.arange(int(lengths.sum()))
        if self.compression == "none":
            return self.vectors[rows].astype(np.float32)
        residual = self._byte_table()[self.residuals[rows]].reshape(len(rows), -1)[:, : self.dimension]
        return _unit(self.centroids[self.codes[rows]] + residual)

    def _byte_table(self) -> np.ndarray:
        # Each packed byte holds 8 / bits buckets, most significant first; one gather from this
        # (256, 8 / bits) table of bucket values decodes a byte, instead of unpacking bit by bit.
        if self._table is None:
            per_byte, mask = 8 // self.bits, (1 << self.bits) - 1
            shifts = 8 - self.bits * (np.arange(per_byte) + 1)
            buckets = (np.arange(256)[:, None] >> shifts[None, :]) & mask
            self._table = self.weights[buckets].astype(np.float32)
        return self._table

    def maxsim(self, query_tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Exact MaxSim of the query against the stored vectors of documents at `positions`."""
        positions = np.asarray(positions, np.int64)
        if not len(positions):
            return np.zeros(0, np.float32)
        sims = np.asarray(query_tokens, np.float32) @ self.decompress(positions).T
        return _segment_maxsim(sims, self.lengths[positions])

    def search(
        self,
        query_tokens: np.ndarray,
        k: int,
        *,
        nprobe: int = DEFAULT_NPROBE,
        candidates: int = DEFAULT_CANDIDATES,
        exhaustive: bool = False,
        allowed: np.ndarray | None = None,
    ) -> list[tuple[int, float]]:
        """(chunk id, MaxSim) of the k best documents, best first.

        `nprobe` centroids are probed per query token; centroid interaction keeps the best
        `candidates` documents for exact scoring. `exhaustive=True` scores every document
        exactly (pruning off). `allowed` (chunk ids) restricts the search to those chunks."""
        q = np.asarray(query_tokens, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dimension or not len(q):
            raise RagIndexError(f"query token vectors must be a (tokens >= 1, {self.dimension}) matrix, got {q.shape}")
        if k <= 0:
            raise RagIndexError(f"k must be positive, got {k}")
        if nprobe < 1 or candidates < 1:
            raise RagIndexError(f"nprobe and candidates must be >= 1, got nprobe={nprobe}, candidates={candidates}")
        q = _unit(q)
        candidates = max(candidates, k)  # never fewer exact scores than results asked for
        if exhaustive:
            pool = np.arange(len(self.ids), dtype=np.int64)
        else:
            _, probed = self.centroid_index.search(q, min(nprobe, len(self.centroids)))
            starts, members = self._inverted_lists()
            probed = np.unique(probed)
            pool = np.unique(np.concatenate([members[starts[c] : starts[c + 1]] for c in probed]))
        if allowed is not None:
            pool = pool[np.isin(self.ids[pool], np.asarray(allowed, np.int64))]
        if not len(pool):
            return []
        if not exhaustive and len(pool) > candidates:
            # Centroid interaction: MaxSim with each token replaced by its centroid, no decompression.
            offsets = self._token_offsets()
            lengths = self.lengths[pool]
            rows = np.repeat(offsets[pool] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            rows = rows + np.arange(int(lengths.sum()))
            approx = _segment_maxsim((q @ self.centroids.T)[:, self.codes[rows]], lengths)
            pool = pool[np.argpartition(-approx, candidates - 1)[:candidates]]
        scores = self.maxsim(q, pool)
        order = np.lexsort((pool, -scores))[:k]  # ties: the earlier document first
        return [(int(self.ids[pool[o]]), float(scores[o])) for o in order]

    # -- persistence -------------------------------------------------------------------------
    def write(self, directory: str | Path) -> None:
        """Write the arrays and a manifest into `directory` (created; not atomic by itself:
        `save`, or a `HybridIndex.save` that holds it, stages the whole directory)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"centroids": self.centroids, "codes": self.codes, "lengths": self.lengths, "ids": self.ids}
        if self.compression == "residual":
            arrays.update(residuals=self.residuals, cutoffs=self.cutoffs, weights=self.weights)
        else:
            arrays["vectors"] = self.vectors
        for name, array in arrays.items():
            np.save(directory / f"{name}.npy", array, allow_pickle=False)
        manifest = {
            "format_version": FORMAT_VERSION,
            "compression": self.compression,
            "bits": self.bits,
            "dimension": self.dimension,
            "nlist": len(self.centroids),
            "documents": len(self.ids),
            "tokens": self.tokens,
            "max_tokens": self.max_tokens,
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the directory finished

    def save(self, directory: str | Path) -> None:
        """Write the index to `directory` atomically (staged beside it, then renamed into place)."""
        with staged_directory(directory) as tmp:
            self.write(tmp)

    @classmethod
    def load(cls, directory: str | Path) -> MultiVectorIndex:
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise RagIndexError(f"{directory} is not a multi-vector index (no {MANIFEST})")
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise RagIndexError(
                f"{directory}: multi-vector format {manifest.get('format_version')} is not supported; accepted: {FORMAT_VERSION}"
            )

        def array(name: str) -> np.ndarray:
            return np.load(directory / f"{name}.npy", allow_pickle=False)

        compression = manifest["compression"]
        extra = (
            {"residuals": array("residuals"), "cutoffs": array("cutoffs"), "weights": array("weights")}
            if compression == "residual"
            else {"vectors": array("vectors")}
        )
        index = cls(
            array("centroids"),
            array("codes"),
            array("lengths"),
            array("ids"),
            compression=compression,
            bits=manifest["bits"],
            max_tokens=manifest.get("max_tokens"),
            **extra,
        )
        if len(index.ids) != manifest["documents"] or index.tokens != manifest["tokens"]:
            raise RagIndexError(f"{directory}: arrays do not match the manifest's counts; the index is damaged")
        return index
