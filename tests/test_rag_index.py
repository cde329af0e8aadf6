"""genforge.rag.index: round trip, embedding cache, model mismatch refusal, HNSW option.

A tiny deterministic embedder (hashed bag of words) keeps these tests free of model weights.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from genforge.rag.chunking import chunk_document
from genforge.rag.index import EmbeddingCache, HybridIndex, RagIndexError
from genforge.rag.loaders import Document
from genforge.rag.retrieve import Retriever


class HashEmbedder:
    dimension = 64

    def __init__(self, name: str = "hash-bow-64") -> None:
        self.name = name
        self.calls: list[int] = []

    def embed(self, texts):
        self.calls.append(len(texts))
        out = np.zeros((len(texts), self.dimension), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dimension] += 1.0
        return out


TOPICS = ["cache keys values decoding", "rotary position angles", "beam search hypotheses",
          "quantization int8 weights", "adapter low rank updates", "retrieval sparse dense fusion"]
DOC = Document("".join(f"## {i + 1}. What about {t}?\nAnswer on {t} with detail {i}.\n\n" for i, t in enumerate(TOPICS)), "topics.md")


def test_round_trip_keeps_results(tmp_path):
    emb = HashEmbedder()
    chunks = chunk_document(DOC, "qa")
    index = HybridIndex.build(chunks, emb)
    before = Retriever(index, emb)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["embedding_model"] == "hash-bow-64" and manifest["chunks"] == len(TOPICS)
    loaded = HybridIndex.load(tmp_path / "idx", emb)
    after = Retriever(loaded, emb)
    for query in ["rotary angles", "int8 weights quantization", "fusion of sparse and dense"]:
        for mode in ("dense", "sparse", "hybrid"):
            a = [(h.chunk.chunk_id, round(h.score, 5)) for h in before.search(query, k=3, mode=mode)]
            b = [(h.chunk.chunk_id, round(h.score, 5)) for h in after.search(query, k=3, mode=mode)]
            assert a == b and a
    assert after.search("rotary angles", k=1, mode="sparse")[0].chunk.metadata["item"] == 2
    assert loaded.chunks[0].to_dict() == chunks[0].to_dict()
    # Saving again over an existing index replaces it and leaves no temporary directories behind.
    loaded.save(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_loading_with_another_embedding_model_is_refused(tmp_path):
    HybridIndex.build(chunk_document(DOC, "qa"), HashEmbedder("model-a")).save(tmp_path / "idx")
    with pytest.raises(RagIndexError, match="built with embedding model 'model-a'.*'model-b'"):
        HybridIndex.load(tmp_path / "idx", HashEmbedder("model-b"))
    with pytest.raises(RagIndexError, match="not a genforge RAG index"):
        HybridIndex.load(tmp_path, "model-a")


def test_reindexing_unchanged_chunks_embeds_nothing():
    emb = HashEmbedder()
    chunks = chunk_document(DOC, "qa")
    first = HybridIndex.build(chunks, emb)
    assert first.last_build_embedded == len(chunks)
    again = HybridIndex.build(chunks, emb, cache=first.embedding_cache())
    assert again.last_build_embedded == 0 and emb.calls == [len(chunks)]
    np.testing.assert_allclose(first.embeddings, again.embeddings, atol=1e-6)
    edited = Document(DOC.text.replace("detail 3", "detail three"), DOC.source)
    third = HybridIndex.build(chunk_document(edited, "qa"), emb, cache=again.embedding_cache())
    assert third.last_build_embedded == 1
    with pytest.raises(RagIndexError, match="holds vectors of"):
        EmbeddingCache("other").embed(["x"], emb)


def test_hnsw_option_and_bad_kind():
    emb = HashEmbedder()
    chunks = chunk_document(DOC, "qa")
    flat = HybridIndex.build(chunks, emb)
    hnsw = HybridIndex.build(chunks, emb, dense="hnsw", cache=flat.embedding_cache())
    q = emb.embed(["beam search hypotheses"])[0]
    # Same scores in the same order (which of two tied chunks comes first may differ).
    assert flat.dense_search(q, 1)[0][0] == hnsw.dense_search(q, 1)[0][0]
    assert [round(s, 5) for _, s in flat.dense_search(q, 6)] == [round(s, 5) for _, s in hnsw.dense_search(q, 6)]
    with pytest.raises(RagIndexError, match="accepted: flat, hnsw"):
        HybridIndex.build(chunks, emb, dense="ivf")
    with pytest.raises(RagIndexError, match="no chunks"):
        HybridIndex.build([], emb)
