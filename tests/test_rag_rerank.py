"""Re-rankers: MaxSim against a direct computation, token vectors against sentence-transformers,
and a cross-encoder (a tiny random one saved here) against transformers' own forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genforge.rag.chunking import Chunk
from genforge.rag.rerank import (
    CrossEncoderReranker,
    LateInteractionReranker,
    TokenEmbedder,
    maxsim,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def chunk(text, n=0):
    return Chunk(text, "doc.md", 0, len(text), metadata={"item": n})


def test_maxsim_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    docs = [rng.normal(size=(n, 8)).astype(np.float32) for n in (3, 7, 1)]
    want = [sum(max(float(q[i] @ d[j]) for j in range(len(d))) for i in range(len(q))) for d in docs]
    assert maxsim(q, docs) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        maxsim(q, [np.zeros((0, 8), np.float32)])
    with pytest.raises(ValueError, match="8-dim|4-dim"):
        maxsim(q, [np.zeros((2, 4), np.float32)])


@pytest.fixture(scope="module")
def tokens():
    return TokenEmbedder(max_tokens=64)


def test_token_vectors_match_sentence_transformers(tokens):
    from sentence_transformers import SentenceTransformer

    from genforge.encoder import default_encoder_path

    texts = ["Paged attention keeps the KV cache in blocks.", "short"]
    reference = SentenceTransformer(str(default_encoder_path()), device="cpu")
    want = reference.encode(texts, output_value="token_embeddings", convert_to_numpy=False)
    got = tokens.encode(texts)
    for g, w in zip(got, want):
        w = torch.nn.functional.normalize(w.float(), dim=-1)[1:-1].numpy()  # [CLS] and [SEP] dropped
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=2e-4)


def test_passage_token_vectors_are_cached_by_content(tokens, tmp_path):
    before = tokens.misses
    first = tokens.documents(["alpha beta gamma", "delta epsilon"])
    again = tokens.documents(["delta epsilon", "alpha beta gamma"])
    assert tokens.misses - before == 2
    np.testing.assert_array_equal(first[0], again[1])
    tokens.save_cache(tmp_path / "tokens.npz")
    fresh = TokenEmbedder(tokens.encoder, max_tokens=64)
    fresh.load_cache(tmp_path / "tokens.npz")
    np.testing.assert_array_equal(fresh.documents(["alpha beta gamma"])[0], first[0])
    assert fresh.misses == 0
    with pytest.raises(ValueError, match="64-token"):
        TokenEmbedder(tokens.encoder, max_tokens=32).load_cache(tmp_path / "tokens.npz")


def test_late_interaction_scores_are_maxsim_per_query_token(tokens):
    reranker = LateInteractionReranker(tokens)
    chunks = [
        chunk("Bake the bread in a hot oven for forty minutes."),
        chunk("The KV cache stores keys and values of earlier tokens.", 1),
    ]
    scores = reranker.score("what does the key value cache store", chunks)
    q = tokens.encode(["what does the key value cache store"])[0]
    want = maxsim(q, tokens.documents([c.text for c in chunks])) / len(q)
    assert scores == pytest.approx(want, rel=1e-5)
    assert scores[1] > scores[0]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from genforge.encoder import default_encoder_path

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    model = BertForSequenceClassification(config).eval()
    directory = tmp_path_factory.mktemp("cross-encoder")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(default_encoder_path()).save_pretrained(directory)
    return model, directory


def test_cross_encoder_scores_match_the_model(cross_encoder_dir):
    from transformers import AutoTokenizer

    model, directory = cross_encoder_dir
    reranker = CrossEncoderReranker(directory, max_length=128)
    chunks = [
        chunk("LoRA adds low rank adapters."),
        chunk("Bread needs an hour to rise.", 1),
        chunk("BM25 ranks by terms.", 2),
    ]
    got = reranker.score("how does lora work", chunks)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(
        ["how does lora work"] * 3,
        [c.text for c in chunks],
        padding=True,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**batch).logits[:, 0]
    # sentence-transformers applies a sigmoid to single-label outputs: same order, (0, 1) scale.
    assert got == pytest.approx(torch.sigmoid(logits).numpy(), abs=1e-5) or got == pytest.approx(
        logits.numpy(), abs=1e-5
    )
    assert list(np.argsort(-got)) == list(np.argsort(-logits.numpy()))


def test_cross_encoder_in_a_retriever(cross_encoder_dir):
    import hashlib

    from genforge.rag import HybridIndex, Retriever

    class Bow:
        name, dimension = "bow-16", 16

        def embed(self, texts):
            out = np.zeros((len(texts), 16), np.float32) + 1e-3
            for r, t in enumerate(texts):
                for w in t.lower().split():
                    out[r, int(hashlib.md5(w.encode()).hexdigest(), 16) % 16] += 1
            return out

    chunks = [chunk(t, n) for n, t in enumerate(["lora adapters are small", "lora rank sixteen", "bread and butter"])]
    reranker = CrossEncoderReranker(cross_encoder_dir[1], max_length=128)
    retriever = Retriever(HybridIndex.build(chunks, Bow()), Bow(), reranker=reranker)
    hits = retriever.search("lora", k=3, mode="dense", rerank=True)
    direct = reranker.score("lora", [h.chunk for h in hits])
    assert [h.score for h in hits] == pytest.approx(sorted(direct, reverse=True))


def test_cross_encoder_needs_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="not a cross-encoder directory"):
        CrossEncoderReranker(tmp_path)
