"""genforge.rag.qdrant: Qdrant as the vector store, checked against FAISS exact search.

Qdrant runs embedded in the test process (qdrant-client's local mode: ":memory:" or a directory
under tmp_path). The same code talks to a Qdrant server by URL; that path is exercised only
where a server is reachable (GENFORGE_QDRANT_URL), since none runs here, apart from the error a
server that cannot be reached gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qdrant_client")

from test_rag_index import HashEmbedder, synthetic_chunks

from genforge.cli import main
from genforge.rag.chunking import Chunk, chunk_document
from genforge.rag.index import HybridIndex
from genforge.rag.loaders import load_documents
from genforge.rag.qdrant import QdrantStore, check_location, payload_filter
from genforge.rag.stores import RagIndexError

# As in test_rag_milvus (not imported from there: that module skips itself without Milvus Lite).
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
    """Same scores in the same order, and the same chunks wherever the score is not tied (a
    tie may be broken either way, and the last score may tie with chunks below the cut)."""
    assert [round(s, places) for _, s in a] == [round(s, places) for _, s in b]
    scores = [round(s, places) for _, s in a]
    tied = {s for s in scores if scores.count(s) > 1} | set(scores[-1:])
    assert [c for c, s in a if round(s, places) not in tied] == [c for c, s in b if round(s, places) not in tied]


@needs_seeds
def test_faiss_exact_and_qdrant_flat_agree_on_the_seeds_corpus():
    documents, skipped = load_documents(sorted(SEEDS.glob("*.txt")))
    assert len(documents) == 5 and not skipped
    chunks = [c for d in documents for c in chunk_document(d, "qa")]
    emb = WideHashEmbedder()
    faiss_index = HybridIndex.build(chunks, emb)
    qdrant_index = HybridIndex.build(
        chunks, emb, backend="qdrant", qdrant_location=":memory:", cache=faiss_index.embedding_cache()
    )
    try:
        assert qdrant_index.backend == "qdrant" and qdrant_index.store.count() == len(chunks) > 600
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
            assert_same_top_k(top_k(qdrant_index, qdrant_index.dense_search(q, 10)), expected)
        # Filters run as Qdrant payload conditions on one side and a FAISS id selector on the other.
        for filters in (
            {"source": documents[2].source},
            {"source": [documents[0].source, documents[4].source]},
            {"item": [1, 2, 3, 50]},
            {"extension": ".txt", "qa_format": chunks[0].metadata["qa_format"]},
            {"source": "no/such/file.txt"},
        ):
            for q in vectors[:3]:
                got = top_k(qdrant_index, qdrant_index.dense_search(q, 10, filters=filters))
                want = top_k(faiss_index, faiss_index.dense_search(q, 10, filters=filters))
                if want:
                    assert_same_top_k(got, want)
                else:
                    assert got == []
    finally:
        qdrant_index.close()


def test_qdrant_incremental_updates_save_and_load(tmp_path):
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=4, items=20)
    location = tmp_path / "qdrant"
    index = HybridIndex.build(chunks, emb, backend="qdrant", qdrant_location=str(location), qdrant_collection="notes")
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
    spec = json.loads((tmp_path / "idx" / "manifest.json").read_text())["dense_store"]
    assert spec["backend"] == "qdrant" and spec["location"] == str(location.resolve())
    loaded = HybridIndex.load(tmp_path / "idx", emb)
    try:
        assert loaded.backend == "qdrant" and loaded.store.collection == "notes"
        assert_same_top_k(top_k(loaded, loaded.dense_search(q, 8)), top_k(reference, reference.dense_search(q, 8)))
        # A change made in Qdrant but never saved to the index directory is caught on load.
        loaded.add([Chunk("w7 w8", "docs/late.md", 0, 5)], emb)
    finally:
        loaded.close()
    with pytest.raises(RagIndexError, match="holds 61 vectors but the index has 60 chunks"):
        HybridIndex.load(tmp_path / "idx", emb)
    # The failed load released the directory: it opens again.
    QdrantStore.open(str(location), "notes", "flat", HashEmbedder.dimension).close()


def test_qdrant_hnsw_kind_and_search_options():
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=10, items=40)
    exact = HybridIndex.build(chunks, emb)
    index = HybridIndex.build(
        chunks, emb, dense="hnsw", backend="qdrant", qdrant_location=":memory:", cache=exact.embedding_cache()
    )
    try:
        index.set_search_options(ef_search=256)
        assert index.store.search_params == {"hnsw_ef": 256}
        with pytest.raises(RagIndexError, match="nprobe applies to IVF indexes"):
            index.set_search_options(nprobe=4)
        q = emb.embed(["question w10 w20 w30"])[0]
        got = top_k(index, index.dense_search(q, 10))
        want = top_k(exact, exact.dense_search(q, 10))
        assert len({c for c, _ in got} & {c for c, _ in want}) >= 9
    finally:
        index.close()


def test_bad_locations_and_options_are_refused_before_embedding(tmp_path):
    for bad, message in [
        ("", "a Qdrant location is needed"),
        ("localhost:6333", "write http://localhost:6333"),
        ("ftp://host", "is not accepted"),
    ]:
        with pytest.raises(RagIndexError, match=message):
            check_location(bad)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RagIndexError, match="is a file"):
        check_location(str(tmp_path / "afile"))
    assert check_location("https://qdrant.example:6333") == "https://qdrant.example:6333"
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=2, items=50)
    with pytest.raises(RagIndexError, match="needs qdrant_location"):
        HybridIndex.build(chunks, emb, backend="qdrant")
    with pytest.raises(RagIndexError, match="Qdrant has no IVF index"):
        HybridIndex.build(chunks, emb, backend="qdrant", dense="ivf", qdrant_location=":memory:")
    assert emb.calls == []  # refused before any embedding work


def test_unreachable_server_and_dimension_mismatch_are_clear(tmp_path):
    with pytest.raises(RagIndexError, match=r"cannot reach the Qdrant server at http://127\.0\.0\.1:9"):
        QdrantStore.create("http://127.0.0.1:9", dimension=8)
    location = str(tmp_path / "q")
    store = QdrantStore.create(location, dimension=8, collection="c")
    try:
        with pytest.raises(RagIndexError, match="cannot open the Qdrant directory .* already accessed"):
            QdrantStore.open(location, "c", "flat", 8)  # embedded mode: one client per directory
        with pytest.raises(RagIndexError, match="holds 8-dim vectors; got vectors of shape"):
            store.add(np.array([0]), np.ones((1, 16), np.float32), [Chunk("a", "a.md", 0, 1)])
        with pytest.raises(RagIndexError, match="query vector has 16 dimensions"):
            store.search(np.ones(16, np.float32), 3)
        with pytest.raises(RagIndexError, match="cannot be saved"):
            QdrantStore.create(":memory:", dimension=8).save(tmp_path)
    finally:
        store.close()
    with pytest.raises(RagIndexError, match="holds 8-dim vectors; this index needs 16"):
        QdrantStore.open(location, "c", "flat", 16)
    with pytest.raises(RagIndexError, match="has no collection 'other'"):
        QdrantStore.open(location, "other", "flat", 8)


def test_filters_on_odd_sources_numbers_and_booleans():
    emb = HashEmbedder()
    odd = 'docs/it\'s a "quoted" \\ name.md'
    chunks = [
        Chunk(
            f"w{i} w{i + 1}",
            odd if i % 2 else "docs/plain.md",
            0,
            5,
            metadata={"item": i, "weight": i / 2, "flag": i % 3 == 0, "one": 1 if i < 5 else True},
        )
        for i in range(10)
    ]
    index = HybridIndex.build(chunks, emb, backend="qdrant", qdrant_location=":memory:")
    reference = HybridIndex.build(chunks, emb)
    q = emb.embed(["w3 w4"])[0]
    try:
        for filters in (
            {"source": odd},
            {"weight": [1.5, 2.0]},
            {"flag": True},
            {"one": True},  # True is not the integer 1, for FAISS's matcher and for Qdrant
            {"one": 1},
            {"item": 4, "source": "docs/plain.md"},
        ):
            got = sorted(index.chunks[p].metadata["item"] for p, _ in index.dense_search(q, 10, filters=filters))
            want = sorted(
                reference.chunks[p].metadata["item"] for p, _ in reference.dense_search(q, 10, filters=filters)
            )
            assert got == want and got, filters
    finally:
        index.close()
    assert payload_filter(None) is None


@pytest.mark.slow  # loads the default sentence encoder
def test_index_and_search_through_the_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "lora.md").write_text("# LoRA\n\nLoRA trains two small low-rank matrices beside each frozen weight.\n")
    (corpus / "bread.txt").write_text("Knead the dough for ten minutes and bake it in a hot oven.\n")
    out = tmp_path / "idx"
    argv = ["rag", "index", str(corpus), "--index", str(out), "--max-tokens", "128", "--backend", "qdrant"]
    assert main(argv) == 2  # no location
    assert "--qdrant-location" in capsys.readouterr().err
    assert main([*argv, "--qdrant-location", str(tmp_path / "vectors")]) == 0
    capsys.readouterr()
    assert main(["rag", "search", "low rank adapters", "--index", str(out), "-k", "1", "--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["source"]).name == "lora.md"


@pytest.mark.skipif(not os.environ.get("GENFORGE_QDRANT_URL"), reason="no Qdrant server (set GENFORGE_QDRANT_URL)")
def test_qdrant_server_by_url():
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=2)
    index = HybridIndex.build(
        chunks,
        emb,
        backend="qdrant",
        qdrant_location=os.environ["GENFORGE_QDRANT_URL"],
        qdrant_api_key=os.environ.get("GENFORGE_QDRANT_API_KEY"),
        qdrant_collection="genforge_test",
    )
    exact = HybridIndex.build(chunks, emb)
    try:
        q = emb.embed(["question w1"])[0]
        assert_same_top_k(top_k(index, index.dense_search(q, 5)), top_k(exact, exact.dense_search(q, 5)))
        filtered = index.dense_search(q, 5, filters={"source": chunks[0].source})
        assert filtered and all(index.chunks[p].source == chunks[0].source for p, _ in filtered)
    finally:
        index.store.drop()
        index.close()
