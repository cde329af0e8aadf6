"""Multi-vector (ColBERT-style) first-stage retrieval: MaxSim over compressed token vectors with
PLAID centroid pruning, alone and inside a HybridIndex / Retriever."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from test_rag_retrieve import HashEmbedder, tiny_chunks

from genforge.rag import HybridIndex, Retriever
from genforge.rag.multivector import MultiVectorIndex
from genforge.rag.rerank import maxsim
from genforge.rag.stores import RagIndexError


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def topic_documents(n_docs=120, dim=32, topics=12, seed=0):
    """Documents whose tokens cluster around a few topic directions, as real token vectors do
    (uniform random tokens would leave centroids meaningless); plus queries drawn the same way."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((topics, dim)))

    def text(n_tokens):
        picked = rng.choice(topics, size=2, replace=False)
        return unit(centres[rng.choice(picked, n_tokens)] + 0.35 * rng.standard_normal((n_tokens, dim)))

    docs = [text(int(rng.integers(3, 25))) for _ in range(n_docs)]
    queries = [text(6) for _ in range(20)]
    return docs, queries


class HashTokenEmbedder:
    """One deterministic unit vector per lower-cased word: token vectors without a model."""

    max_tokens = 64

    def __init__(self, dimension=32):
        self.dimension = dimension

    def encode(self, texts):
        out = []
        for text in texts:
            words = text.lower().replace(",", " ").replace(".", " ").split() or ["<empty>"]
            rows = [
                np.random.default_rng(int(hashlib.md5(w.encode()).hexdigest()[:8], 16)).standard_normal(self.dimension)
                for w in words
            ]
            out.append(unit(np.stack(rows)))
        return out

    documents = encode


def brute_force(query, docs, ids, k):
    scores = maxsim(query, docs)
    order = np.lexsort((np.arange(len(docs)), -scores))[:k]
    return [(int(ids[o]), float(scores[o])) for o in order]


@pytest.mark.parametrize("compression", ["none", "residual"])
def test_exhaustive_search_equals_brute_force_maxsim(compression):
    docs, queries = topic_documents()
    ids = np.arange(len(docs)) * 3 + 7  # ids are not positions
    index = MultiVectorIndex.from_token_vectors(docs, ids, compression=compression, bits=2)
    # What is stored: float16 vectors, or centroid + quantized residual; brute force over exactly that.
    stored = [index.decompress(np.array([n])) for n in range(len(docs))]
    if compression == "none":
        np.testing.assert_array_equal(stored[5], docs[5].astype(np.float16).astype(np.float32))
    for q in queries:
        found = index.search(q, 10, exhaustive=True)
        expected = brute_force(q, stored, ids, 10)
        assert [i for i, _ in found] == [i for i, _ in expected]
        np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], rtol=1e-5)
        # Probing every centroid and keeping every candidate is no pruning either.
        full = index.search(q, 10, nprobe=len(index.centroids), candidates=len(docs))
        assert [i for i, _ in full] == [i for i, _ in found]


def test_pruned_search_recall_against_brute_force():
    docs, queries = topic_documents(n_docs=300, seed=1)
    index = MultiVectorIndex.from_token_vectors(docs, np.arange(len(docs)), compression="none")
    overlaps = {}
    for nprobe, candidates in [(1, 32), (4, 128)]:
        overlaps[nprobe] = np.mean(
            [
                len(
                    {i for i, _ in index.search(q, 10, nprobe=nprobe, candidates=candidates)}
                    & {i for i, _ in index.search(q, 10, exhaustive=True)}
                )
                / 10
                for q in queries
            ]
        )
    # Top-10 recall against brute force, measured on this data (256 centroids, 300 documents):
    # 0.755 at (nprobe 1, 32 candidates), 0.975 at (4, 128); the candidate count limits it most
    # (0.935 at (4, 64) and at (8, 64)).
    assert overlaps[4] >= 0.95
    assert 0.6 <= overlaps[1] < overlaps[4]


def test_residual_compression_size_and_fidelity():
    docs, _ = topic_documents(dim=64)
    flat = np.concatenate(docs)
    for bits in (1, 2, 4):
        index = MultiVectorIndex.from_token_vectors(docs, np.arange(len(docs)), bits=bits, nlist=16)
        assert index.residuals.shape == (len(flat), 64 * bits // 8)
        assert index.codes.dtype == np.uint16
        cosine = np.sum(index.decompress(np.arange(len(docs))) * flat, axis=1)
        centroid_only = np.sum(index.centroids[index.codes] * flat, axis=1)
        # Measured mean cosine to the original: 0.748 (1 bit), 0.905 (2), 0.985 (4), against 0.361
        # for the centroid alone (16 centroids for 12 two-topic mixtures: residuals carry most of it).
        assert cosine.mean() > {1: 0.7, 2: 0.88, 4: 0.97}[bits] > centroid_only.mean()
    # 2 bits per dimension: 2 bytes of centroid number + 16 bytes of residual, against 256 float32.
    two_bit = MultiVectorIndex.from_token_vectors(docs, np.arange(len(docs)), bits=2, nlist=16)
    per_token = (two_bit.codes.nbytes + two_bit.residuals.nbytes) / two_bit.tokens
    assert per_token == 2 + 64 * 2 / 8


def test_save_load_round_trip_and_atomic_replace(tmp_path, monkeypatch):
    docs, queries = topic_documents()
    index = MultiVectorIndex.from_token_vectors(docs, np.arange(len(docs)), bits=2)
    index.save(tmp_path / "mv")
    loaded = MultiVectorIndex.load(tmp_path / "mv")
    for q in queries[:5]:
        assert loaded.search(q, 5) == index.search(q, 5)
    # A save that fails half-way leaves the previous index in place, whole.
    other = MultiVectorIndex.from_token_vectors(docs[:10], np.arange(10), bits=1, nlist=4)
    real_save = np.save
    calls = []

    def failing_save(path, array, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(path, array, **kw)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        other.save(tmp_path / "mv")
    monkeypatch.setattr(np, "save", real_save)
    again = MultiVectorIndex.load(tmp_path / "mv")
    assert len(again) == len(docs) and again.bits == 2
    assert [p.name for p in tmp_path.iterdir()] == ["mv"]  # no staging directory left behind
    with pytest.raises(RagIndexError, match="not a multi-vector index"):
        MultiVectorIndex.load(tmp_path)


def test_add_and_remove_keep_search_exact():
    docs, queries = topic_documents(n_docs=80)
    index = MultiVectorIndex.from_token_vectors(docs[:50], np.arange(50))
    index.add(docs[50:], np.arange(50, 80))
    assert index.remove([3, 60, 999]) == 2
    kept = [n for n in range(80) if n not in (3, 60)]
    stored = [index.decompress(np.array([p])) for p in range(len(index))]
    assert list(index.ids) == kept
    for q in queries[:5]:
        assert [i for i, _ in index.search(q, 8, exhaustive=True)] == [i for i, _ in brute_force(q, stored, kept, 8)]
        assert not {3, 60} & {i for i, _ in index.search(q, 20)}
    with pytest.raises(RagIndexError, match="already indexed"):
        index.add(docs[:1], [5])


def test_bad_options_are_refused_before_work():
    docs, _ = topic_documents(n_docs=5)
    with pytest.raises(RagIndexError, match="compression"):
        MultiVectorIndex.from_token_vectors(docs, range(5), compression="pq")
    with pytest.raises(RagIndexError, match="bits"):
        MultiVectorIndex.from_token_vectors(docs, range(5), bits=3)
    with pytest.raises(RagIndexError, match="nlist"):
        MultiVectorIndex.from_token_vectors(docs, range(5), nlist=10_000)
    with pytest.raises(RagIndexError, match="one id per document"):
        MultiVectorIndex.from_token_vectors(docs, range(4))
    with pytest.raises(RagIndexError, match="no token vectors"):
        MultiVectorIndex.from_token_vectors([docs[0], docs[0][:0]], range(2))
    index = MultiVectorIndex.from_token_vectors(docs, range(5), nlist=4)
    with pytest.raises(RagIndexError, match="matrix"):
        index.search(np.ones((2, 7), np.float32), 3)


# -- inside a HybridIndex and a Retriever -------------------------------------------------------


@pytest.fixture()
def hybrid_with_tokens():
    embedder, tokens = HashEmbedder(), HashTokenEmbedder()
    index = HybridIndex.build(
        tiny_chunks(), embedder, multivector=True, token_embedder=tokens, multivector_options={"nlist": 8}
    )
    return index, embedder, tokens


def test_retriever_multivector_mode_and_fusion(hybrid_with_tokens):
    index, embedder, tokens = hybrid_with_tokens
    retriever = Retriever(index, embedder)
    hits = retriever.search("low rank matrices beside frozen weights", k=3, mode="multivector")
    assert hits[0].chunk.source == "lora.md"
    expected = brute_force(
        tokens.encode(["low rank matrices beside frozen weights"])[0],
        [index.multivector.decompress(np.array([p])) for p in range(len(index.chunks))],
        index.ids,
        3,
    )
    exhaustive = index.multivector_search(
        retriever.query_tokens("low rank matrices beside frozen weights"), 3, exhaustive=True
    )
    assert [index.ids[p] for p, _ in exhaustive] == [i for i, _ in expected]
    # Filters restrict the token search as they do dense and BM25.
    filtered = retriever.search("cache blocks", k=5, mode="multivector", filters={"source": "lora.md"})
    assert filtered and {h.chunk.source for h in filtered} == {"lora.md"}
    # Fused as a third hybrid list: a different weight changes the fused scores.
    plain = retriever.search("paged cache blocks", k=5, mode="hybrid", fusion="weighted", multivector_weight=0.0)
    fused = retriever.search("paged cache blocks", k=5, mode="hybrid", fusion="weighted", multivector_weight=1.0)
    assert fused[0].chunk.source == "paged.md"
    assert [h.score for h in fused] != [h.score for h in plain]
    with pytest.raises(ValueError, match="multivector_weight must be >= 0"):
        retriever.search("paged", multivector_weight=-1)
    with pytest.raises(ValueError, match="prf"):
        retriever.search("paged", mode="multivector", expansion="prf")


def test_hybrid_index_without_tokens_explains(hybrid_with_tokens):
    _, embedder, _ = hybrid_with_tokens
    plain = Retriever(HybridIndex.build(tiny_chunks(), embedder), embedder)
    with pytest.raises(ValueError, match="multivector=True"):
        plain.search("paged", mode="multivector")
    with pytest.raises(RagIndexError, match="has no encoder"):
        HybridIndex.build(tiny_chunks(), embedder, multivector=True)
    with pytest.raises(RagIndexError, match="multivector=False"):
        HybridIndex.build(tiny_chunks(), embedder, multivector_options={"bits": 1})


def test_hybrid_index_updates_and_round_trip_keep_tokens_in_step(hybrid_with_tokens, tmp_path):
    index, embedder, tokens = hybrid_with_tokens
    index.delete("cook.md")
    edited = [c for c in tiny_chunks() if c.source == "lora.md"]
    edited[1] = type(edited[1])(**{**edited[1].to_dict(), "text": "QLoRA quantizes the frozen base to NF4."})
    index.upsert(edited, embedder)
    assert list(index.multivector.ids) == list(index.ids)
    query = tokens.encode(["quantizes the frozen base"])[0]
    top = index.multivector_search(query, 1)
    assert index.chunks[top[0][0]].text.startswith("QLoRA quantizes")
    index.save(tmp_path / "idx")
    loaded = HybridIndex.load(tmp_path / "idx", embedder)
    assert loaded.multivector is not None and list(loaded.multivector.ids) == list(index.ids)
    loaded.token_embedder = tokens
    assert loaded.multivector_search(query, 3) == index.multivector_search(query, 3)
    # A loaded index adds chunks' token vectors too.
    loaded.add(tiny_chunks()[-1:], embedder)
    assert list(loaded.multivector.ids) == list(loaded.ids)


def test_cli_indexes_token_vectors_and_searches_by_maxsim(tmp_path, capsys, one_thread):
    import json

    from genforge.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "paging.md").write_text(
        "# Paged attention\n\nPaged attention keeps the key-value cache in fixed-size blocks, like virtual memory pages.\n"
    )
    (corpus / "lora.md").write_text("# LoRA\n\nLoRA trains two small low-rank matrices beside each frozen weight.\n")
    (corpus / "bread.txt").write_text("Knead the dough, let it rise for two hours and bake it in a hot oven.\n")
    out = tmp_path / "idx"
    assert main(["rag", "index", str(corpus), "--index", str(out), "--max-tokens", "128", "--multivector"]) == 0
    assert (out / "multivector" / "multivector.json").is_file()
    capsys.readouterr()
    query = ["where is the key value cache kept", "--index", str(out), "-k", "1", "--json"]
    assert main(["rag", "search", *query, "--mode", "multivector"]) == 0
    hit = json.loads(capsys.readouterr().out.splitlines()[0])
    assert hit["source"].endswith("paging.md")
