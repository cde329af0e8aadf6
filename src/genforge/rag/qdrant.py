"""Qdrant as the dense vector store of a `HybridIndex` (the Qdrant vector database,
qdrant.tech, through its Python client `qdrant-client`).

One class, three deployments, chosen by the location alone:

- `":memory:"`: an embedded collection in this process that lives as long as the index (for
  tests and throwaway indexes; it cannot be saved);
- a directory path: qdrant-client's embedded local mode, persisted in that directory (no
  server; one process at a time may open it);
- `http://host:6333` or `https://...` (with an API key for Qdrant Cloud or a secured server,
  given as `api_key` or in the environment as QDRANT_API_KEY): a Qdrant server or cluster.

Each chunk is a point under its stable id, with its unit-length vector and a payload holding
its source path, extension and metadata, so that metadata filters run inside Qdrant as payload
conditions. The distance is the dot product, which over unit vectors is the cosine FAISS
returns (Qdrant's "Cosine" would normalise again, and round differently). `flat` searches
exactly (`SearchParams(exact=True)`); `hnsw` uses Qdrant's HNSW graph (Malkov & Yashunin 2018)
with `ef` as the beam; Qdrant has no inverted-file index, so `ivf` is refused. The embedded
modes search by brute force whatever the kind, so they are exact. Writes wait for the server to
apply them (`wait=True`), so a search sees every write made before it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .chunking import Chunk
from .stores import RagIndexError

DEFAULT_COLLECTION = "genforge_chunks"
IN_MEMORY = ":memory:"
SERVER_SCHEMES = ("http://", "https://")
KINDS = ("flat", "hnsw")  # Qdrant has no IVF index
UPSERT_BATCH = 512  # points per request: well under a server's 32 MiB request limit at 1024 dims
SERVER_TIMEOUT_S = 10


def check_location(location: str | Path) -> str:
    """`:memory:`, a server URL, or a local directory (made absolute, so that a saved index
    finds it from anywhere)."""
    if not isinstance(location, (str, Path)) or not str(location):
        raise RagIndexError(
            "a Qdrant location is needed: ':memory:', a local directory (embedded mode) or http://host:6333"
        )
    location = str(location)
    if location == IN_MEMORY or location.startswith(SERVER_SCHEMES):
        return location
    if re.fullmatch(r"[\w.-]+:\d+", location):
        raise RagIndexError(
            f"Qdrant location {location!r} looks like a server address without a scheme; write http://{location} "
            "(or give a directory path for embedded mode)"
        )
    if "://" in location:
        raise RagIndexError(
            f"Qdrant location {location!r} is not accepted: give ':memory:', a local directory, or a server URL "
            f"starting with {' or '.join(SERVER_SCHEMES)}"
        )
    path = Path(location).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise RagIndexError(f"Qdrant embedded mode stores its data in a directory; {path} is a file")
    return str(path)


def _condition(key: str, value: Any):
    from qdrant_client import models

    path = key if key in ("source", "extension") else f"metadata.{key}"
    if isinstance(value, float) and not isinstance(value, bool):
        # Qdrant matches exact values of keywords, integers and booleans; a float equality is a
        # closed range of width zero (which also matches an integer of the same value, as == does).
        return models.FieldCondition(key=path, range=models.Range(gte=value, lte=value))
    return models.FieldCondition(key=path, match=models.MatchValue(value=value))


def payload_filter(filters: Mapping[str, Sequence[Any]] | None):
    """A checked filter ({field: allowed values}) as a Qdrant payload filter: every field must
    match (`must`), one of its values will do (`should`). None for no filter."""
    from qdrant_client import models

    if not filters:
        return None
    return models.Filter(
        must=[models.Filter(should=[_condition(key, v) for v in values]) for key, values in filters.items()]
    )


class QdrantStore:
    """A Qdrant collection as a `VectorStore` (add/remove by id, search with filters, count)."""

    backend = "qdrant"

    def __init__(self, client, location: str, collection: str, kind: str, dimension: int, search_params: dict) -> None:
        self.client, self.location, self.collection = client, location, collection
        self.kind, self.dimension, self.search_params = kind, dimension, search_params

    @property
    def is_server(self) -> bool:
        return self.location.startswith(SERVER_SCHEMES)

    @staticmethod
    def _connect(location: str, api_key: str | None):
        """A client, checked to answer: a server that cannot be reached, or refuses the key, is
        a RagIndexError naming the address, before anything else is tried."""
        from qdrant_client import QdrantClient

        try:
            if location == IN_MEMORY:
                return QdrantClient(location=IN_MEMORY)
            if not location.startswith(SERVER_SCHEMES):
                return QdrantClient(path=location)
        except RuntimeError as err:  # embedded mode: the directory is open in another client
            raise RagIndexError(f"cannot open the Qdrant directory {location}: {err}") from None
        api_key = api_key or os.environ.get("QDRANT_API_KEY") or None
        # A first client without the version check asks for the collections: an unreachable
        # server (or a refused key) is one clear error here, not the version check's warning.
        probe = QdrantClient(url=location, api_key=api_key, timeout=SERVER_TIMEOUT_S, check_compatibility=False)
        try:
            probe.get_collections()
        except Exception as err:  # httpx, grpc and HTTP status errors alike
            raise RagIndexError(
                f"cannot reach the Qdrant server at {location}: {type(err).__name__}: {err}. Check that it runs "
                "and the URL (and api key) are right"
            ) from None
        finally:
            probe.close()
        client = QdrantClient(url=location, api_key=api_key, timeout=SERVER_TIMEOUT_S)
        return client

    @staticmethod
    def _search_params(kind: str, hnsw_ef_search: int) -> dict:
        return {"exact": True} if kind == "flat" else {"hnsw_ef": int(hnsw_ef_search)}

    @classmethod
    def create(
        cls,
        location: str,
        dimension: int,
        kind: str = "flat",
        api_key: str | None = None,
        collection: str | None = None,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 128,
    ) -> QdrantStore:
        """A new, empty collection (an existing one of that name is deleted: building replaces)."""
        from qdrant_client import models

        if kind not in KINDS:
            raise RagIndexError(
                f"dense index kind {kind!r} is not available with Qdrant (it has no IVF index); "
                f"accepted: {', '.join(KINDS)}"
            )
        location, collection = check_location(location), collection or DEFAULT_COLLECTION
        client = cls._connect(location, api_key)
        try:
            if client.collection_exists(collection):
                client.delete_collection(collection)
            client.create_collection(
                collection,
                vectors_config=models.VectorParams(size=int(dimension), distance=models.Distance.DOT),
                hnsw_config=models.HnswConfigDiff(m=hnsw_m, ef_construct=200),
            )
            if location.startswith(SERVER_SCHEMES):
                # Keyword indexes make source/extension filters cheap on a server (embedded mode
                # scans payloads and has no use for them).
                for field in ("source", "extension"):
                    client.create_payload_index(collection, field, models.PayloadSchemaType.KEYWORD, wait=True)
        except BaseException:
            client.close()
            raise
        return cls(client, location, collection, kind, int(dimension), cls._search_params(kind, hnsw_ef_search))

    @classmethod
    def open(
        cls,
        location: str,
        collection: str,
        kind: str,
        dimension: int,
        api_key: str | None = None,
        search_params: dict | None = None,
    ) -> QdrantStore:
        """An existing collection, checked for the vector dimension the index expects."""
        location = check_location(location)
        if location == IN_MEMORY:
            raise RagIndexError("an in-memory Qdrant collection ends with its process; there is nothing to open")
        client = cls._connect(location, api_key)
        try:
            if not client.collection_exists(collection):
                raise RagIndexError(
                    f"Qdrant at {location} has no collection {collection!r}; rebuild the index with backend='qdrant'"
                )
            vectors = client.get_collection(collection).config.params.vectors
            size = getattr(vectors, "size", None)
            if size != dimension:
                raise RagIndexError(
                    f"Qdrant collection {collection!r} holds {size}-dim vectors; this index needs {dimension}"
                )
        except BaseException:
            client.close()
            raise
        return cls(client, location, collection, kind, dimension, dict(search_params or cls._search_params(kind, 128)))

    # -- VectorStore ------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray, chunks: Sequence[Chunk]) -> None:
        from qdrant_client import models

        vectors = np.asarray(vectors, np.float32)
        if len(ids) != len(chunks) or len(ids) != len(vectors):
            raise RagIndexError(
                f"Qdrant points need one id, vector and chunk each; got {len(ids)}, {len(vectors)}, {len(chunks)}"
            )
        if len(ids) and (vectors.ndim != 2 or vectors.shape[1] != self.dimension):
            raise RagIndexError(
                f"Qdrant collection {self.collection!r} holds {self.dimension}-dim vectors; got vectors of shape "
                f"{tuple(vectors.shape)}"
            )
        points = [
            models.PointStruct(
                id=int(i),
                vector=v.tolist(),
                payload={"source": c.source, "extension": Path(c.source).suffix.lower(), "metadata": c.metadata},
            )
            for i, v, c in zip(ids, vectors, chunks)
        ]
        for start in range(0, len(points), UPSERT_BATCH):
            self.client.upsert(self.collection, points[start : start + UPSERT_BATCH], wait=True)

    def remove(self, ids: np.ndarray) -> None:
        from qdrant_client import models

        if len(ids):
            self.client.delete(self.collection, models.PointIdsList(points=[int(i) for i in ids]), wait=True)

    def search(
        self, query: np.ndarray, k: int, filters: Mapping[str, Sequence[Any]] | None = None, allowed_ids=None
    ) -> list[tuple[int, float]]:
        from qdrant_client import models

        query = np.asarray(query, np.float32).reshape(-1)
        if len(query) != self.dimension:
            raise RagIndexError(f"the query vector has {len(query)} dimensions; this collection holds {self.dimension}")
        if k <= 0:
            return []
        # Embedded mode always searches exactly and warns about search parameters it ignores.
        params = models.SearchParams(**self.search_params) if self.is_server else None
        found = self.client.query_points(
            self.collection,
            query=query.tolist(),
            query_filter=payload_filter(filters),
            search_params=params,
            limit=int(k),
            with_payload=False,
        )
        return [(int(point.id), float(point.score)) for point in found.points]

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def set_search_options(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        if nprobe is not None:
            raise RagIndexError(f"nprobe applies to IVF indexes, which Qdrant has none of; this one is {self.kind!r}")
        if ef_search is not None:
            if self.kind != "hnsw":
                raise RagIndexError(f"ef_search applies to dense='hnsw' indexes, this one is {self.kind!r}")
            if ef_search < 1:
                raise RagIndexError(f"ef_search must be >= 1, got {ef_search}")
            self.search_params["hnsw_ef"] = int(ef_search)

    def save(self, directory: Path) -> dict:
        # The vectors are already durable in Qdrant; the index directory records where they are
        # (never the API key: it is given again when loading).
        if self.location == IN_MEMORY:
            raise RagIndexError(
                "an in-memory Qdrant collection cannot be saved; build with a directory (embedded mode) or a server URL"
            )
        return {
            "backend": "qdrant",
            "kind": self.kind,
            "location": self.location,
            "collection": self.collection,
            "dimension": self.dimension,
            "search_params": self.search_params,
        }

    def drop(self) -> None:
        """Delete the collection (and its vectors) from Qdrant."""
        self.client.delete_collection(self.collection)

    def close(self) -> None:
        """Close the connection; in embedded mode this releases the directory for another client."""
        self.client.close()
