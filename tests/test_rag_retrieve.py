"""Fusion and MMR on cases small enough to compute by hand."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from genforge.rag.chunking import Chunk
from genforge.rag.retrieve import mmr, reciprocal_rank_fusion, weighted_score_fusion


def test_rrf_matches_hand_computation():
    # k = 60: a = 1/61 + 1/63, b = 1/62 + 1/61, c = 1/63, d = 1/62
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["b", "d", "a"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 63)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 63)
    assert fused["d"] == pytest.approx(1 / 62)
    assert [item for item, _ in reciprocal_rank_fusion([["a", "b", "c"], ["b", "d", "a"]])] == ["b", "a", "d", "c"]


def test_weighted_fusion_min_max_normalises_each_list():
    # dense: x=1, y=0 after normalisation; sparse: y=1, z=0.5, x=0.
    fused = dict(weighted_score_fusion([{"x": 0.9, "y": 0.5}, {"y": 12.0, "z": 7.0, "x": 2.0}], [0.7, 0.3]))
    assert fused == pytest.approx({"x": 0.7, "y": 0.3, "z": 0.15})
    with pytest.raises(ValueError, match="one weight per list"):
        weighted_score_fusion([{"x": 1.0}], [0.5, 0.5])


def test_mmr_prefers_a_diverse_second_pick():
    q = np.array([1.0, 0.0])
    cands = np.array([[1.0, 0.0], [0.99, 0.141], [0.6, -0.8]])
    # Relevance: 1.0, ~0.990, 0.6. After picking 0, candidate 1 is nearly a copy of it (sim ~0.990)
    # and candidate 2 is not (sim 0.6). Pure relevance (lambda 1) keeps the near-copy second.
    assert mmr(q, cands, k=3, lambda_=1.0) == [0, 1, 2]
    # lambda 0.3: cand1 = 0.3*0.990 - 0.7*0.990 = -0.396; cand2 = 0.3*0.6 - 0.7*0.6 = -0.24 -> cand 2 wins.
    assert mmr(q, cands, k=2, lambda_=0.3) == [0, 2]
    with pytest.raises(ValueError, match="lambda"):
        mmr(q, cands, k=1, lambda_=1.5)


# -- a tiny corpus with a deterministic embedder: retrieval logic without a model -------------
CORPUS = [
    ("paged.md", "Paged attention stores the key value cache in fixed size blocks, like virtual memory pages."),
    ("paged.md", "The block table maps each sequence to its physical cache blocks so memory is not fragmented."),
    ("lora.md", "LoRA trains two small low rank matrices beside each frozen weight matrix."),
    ("lora.md", "QLoRA keeps the frozen base model in four bit precision while training the adapters."),
    ("bm25.md", "BM25 scores documents by term frequency, inverse document frequency and length normalisation."),
    ("rrf.md", "Reciprocal rank fusion adds one over sixty plus the rank from every ranked list."),
    ("cook.md", "Knead the dough, let it rise for two hours, then bake it in a hot oven."),
]


class HashEmbedder:
    """Bag of words hashed into 64 dimensions: deterministic, instant, and similar texts share words."""

    name, dimension = "hash-bow-64", 64

    def embed(self, texts):
        out = np.zeros((len(texts), self.dimension), np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace(",", " ").replace(".", " ").split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dimension] += 1.0
        return out + 1e-3  # never all-zero


def tiny_chunks():
    chunks, offsets = [], {}
    for n, (source, text) in enumerate(CORPUS):
        start = offsets.get(source, 0)
        chunks.append(Chunk(text, source, start, start + len(text), title=source[:-3], metadata={"item": n}))
        offsets[source] = start + len(text) + 1
    return chunks


@pytest.fixture(scope="module")
def tiny():
    from genforge.rag import HybridIndex, Retriever

    embedder = HashEmbedder()
    return Retriever(HybridIndex.build(tiny_chunks(), embedder), embedder)


class FakeGenerator:
    """Deterministic stand-in for a language model: answers by prompt kind, records every prompt."""

    def __init__(self, replies):
        self.replies, self.prompts = replies, []

    def complete(self, prompt, max_tokens=256):
        self.prompts.append(prompt)
        for key, reply in self.replies.items():
            if key in prompt:
                return reply
        return ""


def test_adaptive_cutoff_keeps_hits_near_the_best():
    from genforge.rag.retrieve import adaptive_cutoff

    assert adaptive_cutoff([1.0, 0.9, 0.5, 0.1], 0.8) == 2
    assert adaptive_cutoff([1.0, 0.2, 0.1], 0.5) == 1
    assert adaptive_cutoff([1.0, 0.2, 0.1], 0.5, min_k=2) == 2
    assert adaptive_cutoff([], 0.5) == 0
    with pytest.raises(ValueError, match="ratio"):
        adaptive_cutoff([1.0], 1.5)


def test_search_modes_and_adaptive_k(tiny):
    top = tiny.search("paged attention cache blocks", k=3)
    assert top[0].chunk.source == "paged.md"
    sharp = tiny.search("paged attention cache blocks", k=7, fusion="weighted", min_score_ratio=0.9)
    everything = tiny.search("paged attention cache blocks", k=7, fusion="weighted")
    assert 1 <= len(sharp) < len(everything)
    assert all(h.score >= 0.9 * sharp[0].score for h in sharp)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="fuzzy"), "accepted: dense, sparse, hybrid"),
        (dict(fusion="max"), "accepted: rrf, weighted"),
        (dict(expansion="magic"), "accepted: prf, hyde, multi_query"),
        (dict(expansion="hyde"), "needs a generator"),
        (dict(rerank=True), "needs a re-ranker"),
        (dict(k=0), "k must be positive"),
    ],
)
def test_search_refuses_bad_options_before_work(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny.search("lora adapters", **kwargs)
    with pytest.raises(ValueError, match="empty"):
        tiny.search("   ")


def test_rm3_relevance_model_matches_hand_computation():
    from genforge.rag.expand import relevance_model

    # Feedback docs (after stop words): d1 = [cache, blocks, cache], d2 = [blocks, pages]; doc weights 2:1.
    model = relevance_model(
        "cache", ["the cache and the blocks cache", "blocks pages"], [2.0, 1.0], fb_terms=10, original_weight=0.5
    )
    # P(t|R): cache = 2/3 * 2/3 = 4/9; blocks = 2/3 * 1/3 + 1/3 * 1/2 = 7/18; pages = 1/3 * 1/2 = 1/6 (sum 1)
    assert model == pytest.approx({"cache": 0.5 + 0.5 * 4 / 9, "blocks": 0.5 * 7 / 18, "pages": 0.5 * 1 / 6})
    assert sum(model.values()) == pytest.approx(1.0)


def test_rm3_scores_are_the_weighted_sum_of_term_scores(tiny):
    from genforge.rag.expand import rm3_scores

    bm25 = tiny.index.bm25
    model = {"cache": 0.7, "blocks": 0.3, "neverseen": 0.5}
    want = 0.7 * np.asarray(bm25.get_scores(["cache"])) + 0.3 * np.asarray(bm25.get_scores(["blocks"]))
    got = dict(rm3_scores(bm25, model, depth=10))
    assert got and all(got[i] == pytest.approx(want[i]) for i in got)
    assert set(got) == {i for i in range(len(want)) if want[i] > 0}


def test_prf_finds_a_chunk_that_shares_no_word_with_the_query(tiny):
    # "block table" chunk says nothing about "paged attention"; feedback from the first chunk
    # (cache, blocks) pulls it up in BM25.
    plain = [h.chunk.metadata["item"] for h in tiny.search("paged attention", k=7, mode="sparse")]
    expanded = [h.chunk.metadata["item"] for h in tiny.search("paged attention", k=7, mode="sparse", expansion="prf")]
    assert 1 not in plain and 1 in expanded
    assert expanded[0] == 0


def test_hyde_and_multi_query_use_the_generator(tiny):
    from genforge.rag import Retriever

    generator = FakeGenerator(
        {
            "Passage:": "Low rank adapters are trained beside the frozen weights.",
            "Queries:": "1. low rank adapters\n2. frozen base model adapters\n- low rank adapters",
        }
    )
    retriever = Retriever(tiny.index, tiny.embedder, generator=generator)
    hyde = retriever.search("cheap finetuning", k=2, mode="dense", expansion="hyde")
    assert hyde[0].chunk.source == "lora.md" and "cheap finetuning" in generator.prompts[0]
    from genforge.rag.expand import multi_queries

    assert multi_queries(generator, "cheap finetuning") == [
        "cheap finetuning",
        "low rank adapters",
        "frozen base model adapters",
    ]
    multi = retriever.search("cheap finetuning", k=2, mode="sparse", expansion="multi_query")
    # BM25 finds nothing for the question itself; the generated phrasings find both LoRA chunks.
    assert retriever.search("cheap finetuning", k=2, mode="sparse") == []
    assert {h.chunk.source for h in multi} == {"lora.md"}


def test_multi_hop_rewrites_the_question_from_what_it_found(tiny):
    hits, queries = tiny.multi_hop("paged attention", hops=2, k=4, mode="sparse")
    assert len(queries) == 2 and queries[1].startswith("paged attention ")
    assert any(h.hop == 1 for h in hits)  # the second hop found something the first did not
    from genforge.rag import Retriever

    generator = FakeGenerator({"missing information": "block table"})
    hits, queries = Retriever(tiny.index, tiny.embedder, generator=generator).multi_hop(
        "paged attention", hops=2, k=4, mode="sparse"
    )
    assert queries == ["paged attention", "block table"]
    assert 1 in [h.chunk.metadata["item"] for h in hits]


def test_rerank_replaces_or_fuses_the_first_stage_order(tiny):
    from genforge.rag import Retriever

    class Reverse:  # prefers the first stage's last candidate
        def score(self, query, chunks):
            return np.arange(len(chunks), dtype=np.float32)

    retriever = Retriever(tiny.index, tiny.embedder, reranker=Reverse())
    first = [h.position for h in retriever.search("cache blocks memory", k=4, mode="dense")]
    replaced = retriever.search(
        "cache blocks memory", k=4, mode="dense", rerank=True, rerank_depth=3, rerank_fusion="replace"
    )
    assert [h.position for h in replaced] == [first[2], first[1], first[0], first[3]]
    assert replaced[0].details["rerank"] == 2.0
    fused = retriever.search("cache blocks memory", k=4, mode="dense", rerank=True, rerank_depth=3, rerank_fusion="rrf")
    # RRF of [a, b, c] and [c, b, a]: a and c get 1/61 + 1/63 = 0.032266 each (a first: seen first),
    # b gets 2/62 = 0.032258; the fourth keeps its place below every re-ranked candidate.
    assert [h.position for h in fused] == [first[0], first[2], first[1], first[3]]


def test_duplicate_questions_rank_together():
    from genforge.rag.retrieve import group_duplicate_questions, question_key

    def item(question, n):
        return Chunk(
            f"{question} answer {n}", "faq.txt", 0, 10, title=question, metadata={"item": n, "question": question}
        )

    chunks = [
        item("What is BPE (Byte Pair Encoding)?", 0),
        item("What is LoRA?", 1),
        item("What is Byte Pair Encoding (BPE)?", 2),
        item("What is the KV cache?", 3),
        Chunk("plain text", "notes.md", 0, 10, title="What is LoRA?"),
    ]
    # Order, case, punctuation and filler words do not change the question; content words do.
    assert question_key(chunks[0]) == question_key(chunks[2]) == frozenset({"bpe", "byte", "pair", "encoding"})
    assert question_key(chunks[4]) is None  # not a Q&A item
    ranked = [(1, 0.9), (0, 0.8), (4, 0.7), (3, 0.6)]
    # BPE's twin (2) was not retrieved at all: it is pulled in right after its sibling, with the group's score.
    assert group_duplicate_questions(ranked, chunks) == [(1, 0.9), (0, 0.8), (2, 0.8), (4, 0.7), (3, 0.6)]
    # Twins both retrieved: the lower one moves up next to the higher, keeping its own order in the group.
    assert group_duplicate_questions([(2, 0.9), (3, 0.5), (0, 0.4)], chunks) == [(2, 0.9), (0, 0.9), (3, 0.5)]
    # Past `depth`, groups are not expanded.
    assert group_duplicate_questions([(3, 0.9), (0, 0.4)], chunks, depth=1) == [(3, 0.9), (0, 0.4)]


def test_search_groups_duplicates_by_default(tiny):
    from genforge.rag import HybridIndex, Retriever

    embedder = HashEmbedder()
    chunks = tiny_chunks()
    # Two items asking the same question with differently worded answers; the query matches one.
    chunks.append(
        Chunk(
            "Paged attention keeps cache blocks in a table.",
            "faq.txt",
            0,
            46,
            title="What is paged attention?",
            metadata={"item": 1, "question": "What is paged attention?"},
        )
    )
    chunks.append(
        Chunk(
            "It was introduced by vLLM for serving.",
            "faq.txt",
            47,
            85,
            title="what is PAGED attention",
            metadata={"item": 2, "question": "what is PAGED attention"},
        )
    )
    retriever = Retriever(HybridIndex.build(chunks, embedder), embedder)
    query = "table of cache blocks"
    kept = [h.chunk.metadata["item"] for h in retriever.search(query, k=4, duplicates="keep")]
    grouped = [h.chunk.metadata["item"] for h in retriever.search(query, k=4)]
    assert 1 in kept[:2] and 2 not in kept[:3]
    assert grouped[grouped.index(1) + 1] == 2
    with pytest.raises(ValueError, match="accepted: group, keep"):
        retriever.search(query, duplicates="merge")


def test_inflected_forms_only():
    from genforge.rag.retrieve import inflected_forms

    for a, b in [
        ("cache", "cached"),
        ("caching", "cache"),
        ("key", "keys"),
        ("merges", "merging"),
        ("query", "queries"),
    ]:
        assert inflected_forms(a, b) and inflected_forms(b, a)
    for a, b in [("token", "tokenizer"), ("preferred", "preference"), ("cache", "cache"), ("is", "its")]:
        assert not inflected_forms(a, b)


def test_word_forms_let_bm25_match_another_inflection(tiny):
    # "trained" and "adapter" appear in the corpus only as "trains" / "training" and "adapters".
    query = "trained adapter"
    plain = tiny.index.sparse_search(query, 5)
    forms = tiny.word_form_search(query, 5)
    assert plain == []
    lora = {n for n, c in enumerate(tiny.index.chunks) if c.source == "lora.md"}
    assert {i for i, _ in forms} == lora
    # Each query word scores by its best form: the sum of per-form maxima, computed by hand.
    bm25 = tiny.index.bm25
    for position, score in forms:
        by_hand = sum(
            max(float(bm25.get_scores([f])[position]) for f in group if f in bm25.vocab_dict)
            for group in (["trains", "training"], ["adapters"])
        )
        assert score == pytest.approx(by_hand)
    # Filters apply, and a query with no other forms in the index is plain BM25.
    assert tiny.word_form_search(query, 5, filters={"source": "paged.md"}) == []
    assert tiny.word_form_search("paged attention", 5) == tiny.index.sparse_search("paged attention", 5)
    assert tiny.search(query, k=2, mode="sparse", word_forms=False) == []
    assert {h.position for h in tiny.search(query, k=2, mode="sparse")} == lora
