"""genforge.rag.index: round trip, embedding cache, model mismatch refusal, HNSW and IVF indexes,
incremental add/update/delete and folder sync, metadata filters, the query-result cache.

A tiny deterministic embedder (hashed bag of words) keeps these tests free of model weights.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from genforge.rag.chunking import Chunk, chunk_document
from genforge.rag.embedders import EmbeddingCache
from genforge.rag.index import HybridIndex
from genforge.rag.loaders import Document
from genforge.rag.retrieve import Retriever
from genforge.rag.stores import RagIndexError


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


TOPICS = [
    "cache keys values decoding",
    "rotary position angles",
    "beam search hypotheses",
    "quantization int8 weights",
    "adapter low rank updates",
    "retrieval sparse dense fusion",
]
DOC = Document(
    "".join(f"## {i + 1}. What about {t}?\nAnswer on {t} with detail {i}.\n\n" for i, t in enumerate(TOPICS)),
    "topics.md",
)


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
    with pytest.raises(RagIndexError, match="accepted: flat, hnsw, ivf"):
        HybridIndex.build(chunks, emb, dense="annoy")
    with pytest.raises(RagIndexError, match="accepted: faiss, milvus, qdrant"):
        HybridIndex.build(chunks, emb, backend="weaviate")
    with pytest.raises(RagIndexError, match="no chunks"):
        HybridIndex.build([], emb)


# -- a larger synthetic corpus: enough chunks to train IVF, several sources and formats ---------

WORDS = [f"w{i}" for i in range(300)]


def synthetic_chunks(n_docs: int = 12, items: int = 40, seed: int = 0, suffixes=(".md", ".txt")):
    """Q&A-style documents of random words; chunk metadata carries the format and item number."""
    rng = np.random.default_rng(seed)
    chunks = []
    for d in range(n_docs):
        suffix = suffixes[d % len(suffixes)]
        text = "".join(
            f"## {i + 1}. Question {' '.join(rng.choice(WORDS, 4))}?\n{' '.join(rng.choice(WORDS, 25))}.\n\n"
            for i in range(items)
        )
        doc = Document(
            text, f"docs/file{d}{suffix}", {"format": "markdown" if suffix == ".md" else "text", "team": f"t{d % 3}"}
        )
        chunks.extend(chunk_document(doc, "qa"))
    return chunks


def ranked_ids(index, results):
    return [(index.chunks[p].chunk_id, round(s, 4)) for p, s in results]


def exact_dense(index, q, k, keep=lambda c: True):
    """Brute-force cosine top-k over the index's own vectors: the reference for every FAISS kind."""
    q = q / np.linalg.norm(q)
    scores = index.embeddings @ q
    order = [p for p in np.argsort(-scores, kind="stable") if keep(index.chunks[p])][:k]
    return [(index.chunks[p].chunk_id, round(float(scores[p]), 4)) for p in order]


def test_ivf_trains_quantizer_and_matches_exact_with_full_probe(tmp_path):
    emb = HashEmbedder()
    chunks = synthetic_chunks()
    flat = HybridIndex.build(chunks, emb)
    ivf = HybridIndex.build(chunks, emb, dense="ivf", cache=flat.embedding_cache())
    nlist = ivf.faiss_index.nlist
    # sqrt(480) ~ 22 cells, capped so that each trains on >= 39 vectors: 480 // 39 = 12.
    assert nlist == 12 and ivf.faiss_index.is_trained and ivf.store.nprobe == 1
    ivf.set_search_options(nprobe=nlist)  # scanning every cell is exact search
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = rng.standard_normal(emb.dimension).astype(np.float32)
        assert (
            ranked_ids(ivf, ivf.dense_search(q, 10))
            == exact_dense(flat, q, 10)
            == ranked_ids(flat, flat.dense_search(q, 10))
        )
    ivf.save(tmp_path / "ivf")
    loaded = HybridIndex.load(tmp_path / "ivf", emb)
    assert loaded.dense_kind == "ivf" and loaded.store.nprobe == nlist
    assert ranked_ids(loaded, loaded.dense_search(q, 5)) == exact_dense(flat, q, 5)
    with pytest.raises(RagIndexError, match=r"nprobe must be in \[1, nlist=12\]"):
        ivf.set_search_options(nprobe=13)
    with pytest.raises(RagIndexError, match="nprobe applies to dense='ivf'"):
        flat.set_search_options(nprobe=2)


def test_ivf_with_too_few_vectors_falls_back_or_explains():
    emb = HashEmbedder()
    chunks = chunk_document(DOC, "qa")
    with pytest.warns(UserWarning, match="too few to train an IVF quantizer.*using dense='flat'"):
        index = HybridIndex.build(chunks, emb, dense="ivf")
    assert index.dense_kind == "flat"
    with pytest.raises(RagIndexError, match="too few to train an IVF quantizer.*use dense='flat'"):
        HybridIndex.build(chunks, emb, dense="ivf", ivf_fallback=False)
    calls = len(emb.calls)
    with pytest.raises(RagIndexError, match="nlist=10 needs at least 10 vectors"):
        HybridIndex.build(chunks, emb, dense="ivf", ivf_nlist=10)
    assert len(emb.calls) == calls  # refused before any embedding work


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_incremental_updates_match_a_full_rebuild(kind, tmp_path):
    emb = HashEmbedder()
    chunks = synthetic_chunks()
    extra = synthetic_chunks(n_docs=2, seed=7)
    extra = [Chunk(**{**c.to_dict(), "source": c.source.replace("file", "new")}) for c in extra]
    index = HybridIndex.build(chunks, emb, dense=kind)
    if kind == "ivf":
        index.set_search_options(nprobe=index.faiss_index.nlist)
    calls = len(emb.calls)
    # Add two new documents: only their chunks are embedded.
    assert index.add(extra, emb) == len(extra) and len(emb.calls) == calls + 1
    # Delete one document by its source path.
    assert index.delete("docs/file3.txt") == 40
    # Update another: one item edited, one dropped; the other 38 keep their ids and embed nothing.
    old_ids = {c.chunk_id: i for c, i in zip(index.chunks, index.ids)}
    edited = [c for c in chunks if c.source == "docs/file4.md"]
    edited[5] = Chunk(**{**edited[5].to_dict(), "text": edited[5].text + " extra words"})
    del edited[9]
    counts = index.upsert(edited, emb)
    assert counts == {"kept": 38, "added": 1, "removed": 2, "embedded": 1}
    assert {c.chunk_id: i for c, i in zip(index.chunks, index.ids)}["docs/file4.md#1"] == old_ids["docs/file4.md#1"]
    assert len(set(index.ids.tolist())) == len(index.ids) == index.store.count() == len(index.chunks)

    final = [c for c in chunks if c.source not in ("docs/file3.txt", "docs/file4.md")] + extra + edited
    rebuilt = HybridIndex.build(final, emb, dense="flat")
    rng = np.random.default_rng(2)
    for query in ["question w1 w7 w200", "w42 w43", "w299"]:
        q = rng.standard_normal(emb.dimension).astype(np.float32)
        got = ranked_ids(index, index.dense_search(q, 8))
        if kind == "hnsw":  # approximate: compare as sets with the exact answer
            assert len(set(got) & set(exact_dense(rebuilt, q, 8))) >= 7
        else:
            assert got == exact_dense(rebuilt, q, 8)
        # BM25 is re-fitted from the stored texts, so every score equals a fresh build's (compared
        # over all matches: ties at a top-k cut-off may be broken differently).
        every = len(final)
        assert sorted(ranked_ids(index, index.sparse_search(query, every))) == sorted(
            ranked_ids(rebuilt, rebuilt.sparse_search(query, every))
        )
    # Saved and loaded, the incrementally updated index answers the same; new ids never reuse old ones.
    index.save(tmp_path / "idx")
    loaded = HybridIndex.load(tmp_path / "idx", emb)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    assert ranked_ids(loaded, loaded.dense_search(q, 8)) == ranked_ids(index, index.dense_search(q, 8))
    top = int(loaded.ids.max())
    loaded.delete(loaded.chunks[-1].source)
    loaded.add(extra[:1], emb)
    assert int(loaded.ids[-1]) == top + 1


def test_sync_folder_detects_added_changed_removed_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, topic in enumerate(TOPICS[:4]):
        (folder / f"f{i}.md").write_text(
            f"## 1. What is {topic}?\nIt is about {topic}.\n\n## 2. Why {topic}?\nBecause {i}.\n"
        )
    emb = HashEmbedder()
    index, skipped = HybridIndex.build_from_paths([folder], emb, strategy="qa")
    assert skipped == [] and len(index.chunks) == 8 and len(index.file_hashes) == 4
    index.save(tmp_path / "idx")
    index = HybridIndex.load(tmp_path / "idx", emb)
    calls = len(emb.calls)
    (folder / "f0.md").write_text((folder / "f0.md").read_text().replace("Because 0.", "Because zero."))  # changed
    (folder / "f1.md").unlink()  # removed
    (folder / "f9.md").write_text("## 1. What is new?\nSomething.\n\n## 2. And else?\nMore.\n")  # added
    (folder / "bad.bin").write_bytes(b"\x00\x01")  # skipped
    (folder / "f2.md").touch()  # same bytes
    version = index.version
    report = index.sync([folder], emb, strategy="qa")
    f = lambda name: str(folder / name)  # noqa: E731
    assert report["added"] == [f("f9.md")] and report["changed"] == [f("f0.md")] and report["removed"] == [f("f1.md")]
    assert report["unchanged"] == 2 and [s for s, _ in report["skipped"]] == [f("bad.bin")]
    # One edited item and two new items are embedded; nothing else.
    assert report["embedded"] == 3 and sum(emb.calls[calls:]) == 3 and index.version > version
    fresh, _ = HybridIndex.build_from_paths([folder], HashEmbedder(), strategy="qa")
    assert sorted(c.chunk_id for c in index.chunks) == sorted(c.chunk_id for c in fresh.chunks)
    assert set(index.file_hashes) == set(fresh.file_hashes) and index.file_hashes == fresh.file_hashes
    # Nothing changed since: a second sync does no work and leaves the version alone.
    version = index.version
    again = index.sync([folder], emb, strategy="qa")
    assert again["added"] == again["changed"] == again["removed"] == [] and index.version == version


def test_metadata_filters_in_every_faiss_kind_and_bm25():
    emb = HashEmbedder()
    chunks = synthetic_chunks()
    flat = HybridIndex.build(chunks, emb)
    rng = np.random.default_rng(3)
    q = rng.standard_normal(emb.dimension).astype(np.float32)
    cases = [
        ({"source": "docs/file2.md"}, lambda c: c.source == "docs/file2.md"),
        ({"source": ["docs/file1.txt", "docs/file6.md"]}, lambda c: c.source in ("docs/file1.txt", "docs/file6.md")),
        ({"extension": ".txt", "team": "t1"}, lambda c: c.source.endswith(".txt") and c.metadata["team"] == "t1"),
        ({"item": [3, 4], "format": "markdown"}, lambda c: c.metadata["item"] in (3, 4) and c.source.endswith(".md")),
        ({"item": True}, lambda c: False),  # True is not item 1
        ({"missing_key": "x"}, lambda c: False),
    ]
    for kind in ("flat", "hnsw", "ivf"):
        index = HybridIndex.build(chunks, emb, dense=kind, cache=flat.embedding_cache())
        if kind == "ivf":
            index.set_search_options(nprobe=index.faiss_index.nlist)
        # A FAISS id selector inside the search (limit 0), and exact scoring of the few chunks
        # that pass (the default for filters passing <= 2048 chunks): the same answers.
        for limit in (0, 2048):
            index.filtered_exact_limit = limit
            for filters, keep in cases:
                got = ranked_ids(index, index.dense_search(q, 10, filters=filters))
                want = exact_dense(flat, q, 10, keep)
                assert got == want, (kind, limit, filters)
        for filters, keep in cases:
            assert all(keep(index.chunks[p]) for p, _ in index.sparse_search("question w5 w9", 10, filters=filters))
    # BM25 under a filter: the unfiltered scores of the passing chunks, best first.
    everything = dict(flat.sparse_search("question w5 w9 w11", len(chunks)))
    filtered = flat.sparse_search("question w5 w9 w11", 5, filters={"source": "docs/file2.md"})
    want = sorted(((p, s) for p, s in everything.items() if chunks[p].source == "docs/file2.md"), key=lambda t: -t[1])[
        :5
    ]
    assert [round(s, 5) for _, s in filtered] == [round(s, 5) for _, s in want] and filtered
    for bad, message in [
        ({"source": {"a": 1}}, "accepted: str, int, float, bool"),
        ({"source": []}, "lists no values"),
        ({"bad key!": 1}, "filter field 'bad key!'"),
        ("source=a", "filters must be a dict"),
    ]:
        with pytest.raises(RagIndexError, match=message):
            flat.dense_search(q, 3, filters=bad)


def test_query_cache_returns_repeats_and_is_invalidated_by_changes():
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=2)
    index = HybridIndex.build(chunks, emb)
    q = emb.embed(["question w1 w2"])[0]
    first = index.dense_search(q, 5)
    assert index.dense_search(q, 5) == first and index.query_cache.hits == 1
    index.sparse_search("w1 w2", 5), index.sparse_search("w1 w2", 5)
    assert index.query_cache.hits == 2
    # Other options are other entries.
    index.dense_search(q, 6), index.dense_search(q, 5, filters={"source": "docs/file0.md"})
    assert index.query_cache.hits == 2
    assert index.cached(("fused", "w1"), lambda: [1, 2]) == [1, 2] and index.cached(("fused", "w1"), lambda: [3]) == [
        1,
        2,
    ]
    # A new chunk identical to the query must show up at once: the version bump empties the cache.
    probe = Chunk("question w1 w2", "docs/probe.md", 0, 14)
    index.add([probe], emb)
    assert index.chunks[index.dense_search(q, 1)[0][0]].source == "docs/probe.md"
    assert index.chunks[index.sparse_search("w1 w2", 1)[0][0]].source == "docs/probe.md"
    assert index.cached(("fused", "w1"), lambda: [3]) == [3]
    index.delete("docs/probe.md")
    assert all(index.chunks[p].source != "docs/probe.md" for p, _ in index.dense_search(q, 5))


def test_format_1_index_is_read_and_converted(tmp_path):
    import faiss

    emb = HashEmbedder()
    chunks = chunk_document(DOC, "qa")
    index = HybridIndex.build(chunks, emb)
    index.save(tmp_path / "idx")
    # Rewrite it the way format 1 stored it: a bare IndexFlatIP numbered by position, no ids file.
    faiss.write_index(faiss.IndexFlatIP(emb.dimension), str(tmp_path / "idx" / "dense.faiss"))
    bare = faiss.read_index(str(tmp_path / "idx" / "dense.faiss"))
    bare.add(index.embeddings)
    faiss.write_index(bare, str(tmp_path / "idx" / "dense.faiss"))
    (tmp_path / "idx" / "ids.npy").unlink()
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest = {k: manifest[k] for k in ("embedding_model", "dimension", "dense_index", "chunks")} | {
        "format_version": 1
    }
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    old = HybridIndex.load(tmp_path / "idx", emb)
    q = emb.embed(["rotary position angles"])[0]
    assert ranked_ids(old, old.dense_search(q, 3)) == ranked_ids(index, index.dense_search(q, 3))
    assert (
        old.delete("topics.md") == len(chunks) and old.dense_search(q, 3) == [] and old.sparse_search("rotary", 3) == []
    )


def test_updates_with_another_model_or_bad_options_are_refused_before_any_change():
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=2)
    index = HybridIndex.build(chunks, emb)
    before = (len(index.chunks), index.version, index.store.count())
    other = HashEmbedder("another-model")
    for update in (
        lambda: index.add(chunks[:1], other),
        lambda: index.upsert(chunks[:3], other),
        lambda: index.sync([], other),
    ):
        with pytest.raises(RagIndexError, match="holds vectors of 'hash-bow-64'.*'another-model'"):
            update()
    assert (len(index.chunks), index.version, index.store.count()) == before
    with pytest.raises(RagIndexError, match="nprobe must be >= 1"):
        HybridIndex.build(chunks, emb, dense="ivf", ivf_nprobe=0)
    with pytest.raises(RagIndexError, match="ef_search applies to dense='hnsw'"):
        index.set_search_options(ef_search=64)


def test_upsert_matches_duplicates_as_a_multiset():
    emb = HashEmbedder()
    a = Chunk("same words here", "docs/dup.md", 0, 15)
    b = Chunk("other words", "docs/dup.md", 16, 27)
    index = HybridIndex.build([a, b], emb)
    # The new version holds `a` twice (e.g. a repeated paragraph) and drops `b`.
    counts = index.upsert([a, Chunk(**a.to_dict())], emb)
    assert counts == {"kept": 1, "added": 1, "removed": 1, "embedded": 0}
    assert [c.text for c in index.chunks] == ["same words here", "same words here"] and index.store.count() == 2


def test_hnsw_deletes_are_tombstones_until_compaction(tmp_path):
    emb = HashEmbedder()
    chunks = synthetic_chunks(n_docs=10, items=20)  # 200 chunks in 10 sources of 20
    index = HybridIndex.build(chunks, emb, dense="hnsw")
    store = index.store
    gone = index.chunks[5]
    q = index.embeddings[5]  # the deleted chunk's own vector: exact search would rank it first
    assert index.delete(gone.source) == 20
    # 10% deleted: the graph keeps the nodes as waypoints, results never show them.
    assert store.index.ntotal == 200 and len(store.tombstones) == 20 and store.count() == 180
    hits = index.dense_search(q, 10)
    assert len(hits) == 10 and all(index.chunks[p].source != gone.source for p, _ in hits)
    index.save(tmp_path / "idx")
    loaded = HybridIndex.load(tmp_path / "idx", emb)
    assert len(loaded.store.tombstones) == 20 and loaded.dense_search(q, 10) == hits
    # Past a quarter of the graph the tombstones are compacted away.
    loaded.delete([c.source for c in loaded.chunks[:60:20]])  # three more sources: 80 of 200
    assert loaded.store.index.ntotal == 120 == loaded.store.count() and len(loaded.store.tombstones) == 0
    # The rebuilt graph finds the exact scores (which of two tied chunks comes first may differ).
    assert [s for _, s in ranked_ids(loaded, loaded.dense_search(q, 5))] == [s for _, s in exact_dense(loaded, q, 5)]
