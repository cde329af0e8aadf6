"""genforge.rag.milvus: Milvus Lite as the vector store, checked against FAISS exact search.

Milvus Lite runs inside the test process (pymilvus starts it for a path ending in .db, here under
tmp_path) and is closed after each test. The same code talks to a Milvus server by URI; that
path is exercised only where a server is reachable (GENFORGE_MILVUS_URI), since none runs here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from test_rag_index import HashEmbedder, synthetic_chunks

from genforge.rag.chunking import Chunk, chunk_document
from genforge.rag.index import HybridIndex
from genforge.rag.loaders import load_documents
from genforge.rag.milvus import check_uri, filter_expression
from genforge.rag.stores import RagIndexError

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
if not SEEDS.is_dir():
    SEEDS = Path("/work/shared/seeds")
needs_seeds = pytest.mark.skipif(not SEEDS.is_dir(), reason=f"seeds corpus not found at {SEEDS}")


class WideHashEmbedder(HashEmbedder):
    # 256 buckets: few accidental ties between different chunks of the real corpus.
    dimension = 256


def top_k(index, results):
    return [(index.chunks[p].chunk_id, s) for p, s in results]


def assert_same_top_k(a, b, places=4):
    """Same scores in the same order, and the same chunks wherever the score is not tied."""
    assert [round(s, places) for _, s in a] == [round(s, places) for _, s in b]
    tied = {round(s, places) for _, s in a if sum(round(t, places) == round(s, places) for _, t in a) > 1}
    if a:  # the last score may be tied with chunks below the cut-off; those are left out too
        tied.add(round(a[-1][1], places))
    assert [c for c, s in a if round(s, places) not in tied] == [c for c, s in b if round(s, places) not in tied]


@pytest.fixture
def lite_uri(tmp_path):
    uri = str(tmp_path / "vectors.db")
    yield uri
    from milvus_lite.server_manager import server_manager_instance

    # Whatever a test left open is closed, so the next test's database starts clean.
    server_manager_instance.release_server(uri)


@needs_seeds
def test_faiss_exact_and_milvus_lite_flat_agree_on_the_seeds_corpus(lite_uri):
    documents, skipped = load_documents(sorted(SEEDS.glob("*.txt")))
    assert len(documents) == 5 and not skipped
    chunks = [c for d in documents for c in chunk_document(d, "qa")]
    emb = WideHashEmbedder()
    faiss_index = HybridIndex.build(chunks, emb)
    milvus_index = HybridIndex.build(
        chunks, emb, backend="milvus", milvus_uri=lite_uri, cache=faiss_index.embedding_cache()
    )
    try:
        assert milvus_index.backend == "milvus" and milvus_index.store.count() == len(chunks) > 600
        queries = [
            "how does attention scale with sequence length",
            "low rank adapters for fine tuning",
            "reward model preference data",
            "tokenizer merges frequent pairs",
            "retrieval augmented generation",
        ]
        rng = np.random.default_rng(0)
        vectors = [emb.embed([q])[0] for q in queries] + list(
            rng.standard_normal((5, emb.dimension)).astype(np.float32)
        )
        for q in vectors:
            expected = top_k(faiss_index, faiss_index.dense_search(q, 10))
            assert_same_top_k(top_k(milvus_index, milvus_index.dense_search(q, 10)), expected)
        # Filters run as a Milvus expression on one side and a FAISS id selector on the other.
        name = documents[2].source
        for filters in (
            {"source": name},
            {"source": [documents[0].source, documents[4].source]},
            {"item": [1, 2, 3, 50]},
            {"extension": ".txt", "qa_format": chunks[0].metadata["qa_format"]},
            {"source": "no/such/file.txt"},
        ):
            for q in vectors[:3]:
                got = top_k(milvus_index, milvus_index.dense_search(q, 10, filters=filters))
                want = top_k(faiss_index, faiss_index.dense_search(q, 10, filters=filters))
                if want:
                    assert_same_top_k(got, want)
                else:
                    assert got == []
    finally:
        milvus_index.close()


def test_milvus_incremental_updates_save_and_load(lite_uri, tmp_path):
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=4, items=20)
    index = HybridIndex.build(chunks, emb, backend="milvus", milvus_uri=lite_uri, milvus_collection="notes")
    reference = HybridIndex.build(chunks, emb)
    try:
        assert index.delete("docs/file1.txt") == 20 and reference.delete("docs/file1.txt") == 20
        edited = [c for c in chunks if c.source == "docs/file2.md"]
        edited[0] = Chunk(**{**edited[0].to_dict(), "text": edited[0].text + " w1 w1 w1"})
        assert index.upsert(edited, emb)["embedded"] == 1 and reference.upsert(edited, emb)["embedded"] == 1
        assert index.store.count() == len(index.chunks) == 60
        q = emb.embed(["question w1 w3"])[0]
        assert_same_top_k(top_k(index, index.dense_search(q, 8)), top_k(reference, reference.dense_search(q, 8)))
        index.save(tmp_path / "idx")
    finally:
        index.close()
    loaded = HybridIndex.load(tmp_path / "idx", emb)
    try:
        assert loaded.backend == "milvus" and loaded.store.collection == "notes"
        assert_same_top_k(top_k(loaded, loaded.dense_search(q, 8)), top_k(reference, reference.dense_search(q, 8)))
        # A change made in Milvus but never saved to the index directory is caught on load.
        loaded.add([Chunk("w7 w8", "docs/late.md", 0, 5)], emb)
    finally:
        loaded.close()
    with pytest.raises(RagIndexError, match="holds 61 vectors but the index has 60 chunks"):
        HybridIndex.load(tmp_path / "idx", emb)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_milvus_approximate_kinds(kind, lite_uri):
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=10, items=40)
    exact = HybridIndex.build(chunks, emb)
    index = HybridIndex.build(
        chunks, emb, dense=kind, backend="milvus", milvus_uri=lite_uri, cache=exact.embedding_cache()
    )
    try:
        if kind == "ivf":
            assert index.store.search_params["nprobe"] == 1
            index.set_search_options(nprobe=10)  # every cell: exact
        q = emb.embed(["question w10 w20 w30"])[0]
        got = top_k(index, index.dense_search(q, 10))
        want = top_k(exact, exact.dense_search(q, 10))
        assert len({c for c, _ in got} & {c for c, _ in want}) >= 9
    finally:
        index.close()


def test_bad_uris_and_filter_expressions():
    for bad in ["vectors.sqlite", "", "ftp://host"]:
        with pytest.raises(RagIndexError, match="ending in .db"):
            check_uri(bad)
    assert check_uri("http://milvus:19530") == "http://milvus:19530"
    emb = HashEmbedder()
    with pytest.raises(RagIndexError, match="needs milvus_uri"):
        HybridIndex.build(synthetic_chunks(n_docs=1), emb, backend="milvus")
    with pytest.raises(RagIndexError, match="'vectors.sqlite' is not accepted"):
        HybridIndex.build(synthetic_chunks(n_docs=1), emb, backend="milvus", milvus_uri="vectors.sqlite")
    assert emb.calls == []  # refused before any embedding work
    # Strings are quoted with escapes; JSON keys with "in" become or-ed equalities.
    assert filter_expression({"source": ('a"b\\c', "d"), "item": (1, 2), "flag": (True,)}) == (
        'source in ["a\\"b\\\\c", "d"] and (metadata["item"] == 1 or metadata["item"] == 2) and (metadata["flag"] == true)'
    )
    assert filter_expression(None) == ""


def test_quoted_source_filter_round_trips_through_milvus(lite_uri):
    emb = HashEmbedder()
    odd = 'docs/it\'s a "quoted" \\ name.md'
    chunks = [Chunk(f"w{i} w{i + 1}", odd if i % 2 else "docs/plain.md", 0, 5, metadata={"item": i}) for i in range(10)]
    index = HybridIndex.build(chunks, emb, backend="milvus", milvus_uri=lite_uri)
    try:
        hits = index.dense_search(emb.embed(["w3 w4"])[0], 10, filters={"source": odd})
        assert sorted(index.chunks[p].metadata["item"] for p, _ in hits) == [1, 3, 5, 7, 9]
    finally:
        index.close()


@pytest.mark.skipif(not os.environ.get("GENFORGE_MILVUS_URI"), reason="no Milvus server (set GENFORGE_MILVUS_URI)")
def test_milvus_server_by_uri():
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=2)
    index = HybridIndex.build(
        chunks,
        emb,
        backend="milvus",
        milvus_uri=os.environ["GENFORGE_MILVUS_URI"],
        milvus_token=os.environ.get("GENFORGE_MILVUS_TOKEN"),
        milvus_collection="genforge_test",
    )
    exact = HybridIndex.build(chunks, emb)
    try:
        q = emb.embed(["question w1"])[0]
        assert_same_top_k(top_k(index, index.dense_search(q, 5)), top_k(exact, exact.dense_search(q, 5)))
    finally:
        index.store.drop()
        index.close()
