"""Milvus as the dense vector store of a `HybridIndex` (Wang et al. 2021, "Milvus: A
Purpose-Built Vector Data Management System", SIGMOD).

One class, two deployments, chosen by the URI alone:

- a path ending in `.db`: Milvus Lite, an embedded database in this process (pymilvus starts it
  through the `milvus-lite` package; no server, the data lives in that path);
- `http://host:19530` (or https, with a token such as "user:password" or an API key): a Milvus
  server or cluster, for corpora beyond one machine's memory or indexes shared by many readers.

The collection holds each chunk's stable id (primary key), its unit-length vector, its source
path and extension as scalar fields, and its metadata as a JSON field, so that metadata filters
run inside Milvus as a boolean expression. Inner product over unit vectors is cosine, the same
score the FAISS backend returns. Writes are upserts and deletes by id; reads ask for strong
consistency, so a search sees every write made before it (a server's default, bounded
staleness, could miss a just-inserted chunk).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .chunking import Chunk
from .stores import DENSE_KINDS, IVF_POINTS_PER_LIST, RagIndexError, default_nlist

DEFAULT_COLLECTION = "genforge_chunks"
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://")
# Milvus index types for genforge's dense kinds.
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}
MAX_SOURCE_CHARS = 4096
INSERT_BATCH = 1000  # rows per upsert: well under gRPC's message limit at 1024 dims


def check_uri(uri: str) -> str:
    """A local Milvus Lite path (made absolute, so a saved index finds it from anywhere) or a server URI."""
    if not isinstance(uri, (str, Path)) or not str(uri):
        raise RagIndexError("a Milvus URI is needed: a local file ending in .db (Milvus Lite) or http://host:19530")
    uri = str(uri)
    if uri.startswith(SERVER_SCHEMES):
        return uri
    if uri.endswith(".db"):
        path = Path(uri).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)
    raise RagIndexError(
        f"Milvus URI {uri!r} is not accepted: give a local path ending in .db (Milvus Lite) or a server "
        f"URI starting with {', '.join(SERVER_SCHEMES)}"
    )


def _literal(value: Any) -> str:
    """A value as a Milvus expression literal. JSON string quoting (double quotes, backslash
    escapes) is what the Milvus expression grammar reads."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise RagIndexError(f"filter value {value!r} is not a finite number")
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def filter_expression(filters: Mapping[str, Sequence[Any]] | None) -> str:
    """A checked filter ({field: allowed values}) as a Milvus boolean expression.

    `source` and `extension` are scalar columns and take `in [...]`; metadata keys live in the
    JSON column, where a list of values is spelt as equalities joined by `or` (Milvus Lite's
    parser accepts `in` only on plain columns)."""
    if not filters:
        return ""
    terms = []
    for key, values in filters.items():
        if key in ("source", "extension"):
            terms.append(f"{key} in [{', '.join(_literal(v) for v in values)}]")
        else:
            field = f"metadata[{json.dumps(key)}]"
            terms.append("(" + " or ".join(f"{field} == {_literal(v)}" for v in values) + ")")
    return " and ".join(terms)


class MilvusStore:
    """A Milvus collection as a `VectorStore` (add/remove by id, search with filters, count)."""

    backend = "milvus"

    def __init__(self, client, uri: str, collection: str, kind: str, dimension: int, search_params: dict) -> None:
        self.client, self.uri, self.collection = client, uri, collection
        self.kind, self.dimension, self.search_params = kind, dimension, search_params

    @property
    def is_lite(self) -> bool:
        return not self.uri.startswith(SERVER_SCHEMES)

    @staticmethod
    def _connect(uri: str, token: str | None):
        from pymilvus import MilvusClient

        return MilvusClient(uri=uri, token=token or "")

    @classmethod
    def create(
        cls,
        uri: str,
        dimension: int,
        kind: str = "flat",
        token: str | None = None,
        collection: str | None = None,
        hnsw_m: int = 32,
        ivf_nlist: int | None = None,
        ivf_nprobe: int | None = None,
        count: int | None = None,
        hnsw_ef_search: int = 128,
    ) -> MilvusStore:
        """A new, empty collection (an existing one of that name is dropped: building replaces)."""
        from pymilvus import DataType

        if kind not in DENSE_KINDS:
            raise RagIndexError(f"dense index kind {kind!r} is not supported; accepted: {', '.join(DENSE_KINDS)}")
        uri, collection = check_uri(uri), collection or DEFAULT_COLLECTION
        params: dict[str, Any] = {}
        search: dict[str, Any] = {}
        if kind == "hnsw":
            params, search = {"M": hnsw_m, "efConstruction": 200}, {"ef": hnsw_ef_search}
        elif kind == "ivf":
            n = count or 0
            nlist = ivf_nlist if ivf_nlist is not None else default_nlist(n)
            if nlist < 1 or n < nlist:
                raise RagIndexError(
                    f"IVF with nlist={nlist} needs at least {nlist} vectors to train (better "
                    f"{IVF_POINTS_PER_LIST * nlist}); got {n}. Use a smaller ivf_nlist, or dense='flat'"
                )
            params, search = (
                {"nlist": nlist},
                {"nprobe": min(nlist, ivf_nprobe if ivf_nprobe is not None else max(1, nlist // 8))},
            )
        client = cls._connect(uri, token)
        try:
            if client.has_collection(collection):
                client.drop_collection(collection)
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dimension))
            schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_CHARS)
            schema.add_field("extension", DataType.VARCHAR, max_length=64)
            schema.add_field("metadata", DataType.JSON)
            index_params = client.prepare_index_params()
            index_params.add_index("vector", index_type=INDEX_TYPES[kind], metric_type="IP", params=params)
            client.create_collection(collection, schema=schema, index_params=index_params, consistency_level="Strong")
        except BaseException:
            client.close()
            raise
        return cls(client, uri, collection, kind, int(dimension), search)

    @classmethod
    def open(
        cls,
        uri: str,
        collection: str,
        kind: str,
        dimension: int,
        token: str | None = None,
        search_params: dict | None = None,
    ) -> MilvusStore:
        """An existing collection, checked for the vector dimension the index expects."""
        uri = check_uri(uri)
        client = cls._connect(uri, token)
        if not client.has_collection(collection):
            client.close()
            raise RagIndexError(
                f"Milvus at {uri} has no collection {collection!r}; rebuild the index with backend='milvus'"
            )
        fields = {f["name"]: f for f in client.describe_collection(collection)["fields"]}
        dim = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
        if dim != dimension:
            client.close()
            raise RagIndexError(
                f"Milvus collection {collection!r} holds {dim}-dim vectors; this index needs {dimension}"
            )
        client.load_collection(collection)
        return cls(client, uri, collection, kind, dimension, dict(search_params or {}))

    # -- VectorStore ------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray, chunks: Sequence[Chunk]) -> None:
        if len(ids) != len(chunks) or len(ids) != len(vectors):
            raise RagIndexError(
                f"Milvus rows need one id, vector and chunk each; got {len(ids)}, {len(vectors)}, {len(chunks)}"
            )
        for chunk in chunks:
            if len(chunk.source) > MAX_SOURCE_CHARS:
                raise RagIndexError(
                    f"source path longer than {MAX_SOURCE_CHARS} characters cannot be stored in Milvus: {chunk.source[:80]}..."
                )
        rows = [
            {
                "id": int(i),
                "vector": np.asarray(v, np.float32).tolist(),
                "source": c.source,
                "extension": Path(c.source).suffix.lower(),
                "metadata": c.metadata,
            }
            for i, v, c in zip(ids, vectors, chunks)
        ]
        for start in range(0, len(rows), INSERT_BATCH):
            self.client.upsert(self.collection, rows[start : start + INSERT_BATCH])

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self.client.delete(self.collection, ids=[int(i) for i in ids])

    def search(
        self, query: np.ndarray, k: int, filters: Mapping[str, Sequence[Any]] | None = None, allowed_ids=None
    ) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        found = self.client.search(
            self.collection,
            data=[np.asarray(query, np.float32).reshape(-1).tolist()],
            limit=int(k),
            filter=filter_expression(filters),
            anns_field="vector",
            output_fields=["id"],
            search_params={"metric_type": "IP", "params": self.search_params},
            consistency_level="Strong",
        )
        return [(int(hit["id"]), float(hit["distance"])) for hit in found[0]]

    def count(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def set_search_options(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        if nprobe is not None:
            if self.kind != "ivf":
                raise RagIndexError(f"nprobe applies to dense='ivf' indexes, this one is {self.kind!r}")
            self.search_params["nprobe"] = int(nprobe)
        if ef_search is not None:
            if self.kind != "hnsw":
                raise RagIndexError(f"ef_search applies to dense='hnsw' indexes, this one is {self.kind!r}")
            self.search_params["ef"] = int(ef_search)

    def save(self, directory: Path) -> dict:
        # The vectors are already durable in Milvus; the index directory records where they are
        # (never the token: it is given again when loading).
        return {
            "backend": "milvus",
            "kind": self.kind,
            "uri": self.uri,
            "collection": self.collection,
            "dimension": self.dimension,
            "search_params": self.search_params,
        }

    def drop(self) -> None:
        """Delete the collection (and its vectors) from Milvus."""
        self.client.drop_collection(self.collection)

    def close(self) -> None:
        """Close the connection; for Milvus Lite also stop its in-process server, releasing the .db."""
        self.client.close()
        if self.is_lite:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)
