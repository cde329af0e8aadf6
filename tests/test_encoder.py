"""genforge's BERT on real all-MiniLM-L6-v2 weights against sentence-transformers."""

import pytest
import torch

from genforge.encoder import SentenceEncoder, default_encoder_path, pool

TEXTS = [
    "How does paged attention manage the KV cache?",
    "A short one.",
    "Grouped-query attention shares key and value heads between groups of query heads, cutting cache memory.",
    "Ünïcödé, emoji 🚀 and CJK 汉字 all go through the WordPiece tokenizer.",
    "",
]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


def test_embeddings_equal_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(default_encoder_path()), device="cpu")
    expected = torch.tensor(reference.encode(TEXTS, batch_size=2))
    got = encoder.encode(TEXTS, batch_size=2)
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min() >= 0.9999
    assert (got - expected).abs().max() < 1e-4


def test_semantic_search_ranks_the_paraphrase_first(encoder):
    docs = ["The cat sat on the mat.", "Key/value caching makes autoregressive decoding fast.", "Paris is in France."]
    query = encoder.encode(["why is generating tokens quicker with a kv cache?"])
    scores = encoder.encode(docs) @ query.T
    assert scores.argmax().item() == 1


def test_long_text_is_cut_with_a_warning(encoder, caplog):
    text = "word " * 600
    with caplog.at_level("WARNING"):
        vector = encoder.encode([text])
    assert vector.shape == (1, 384)
    assert "truncated" in caplog.text


def test_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pool(hidden, mask, "max"), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="accepted: mean, cls, max"):
        pool(hidden, mask, "median")


def test_single_string_is_refused(encoder):
    with pytest.raises(TypeError, match="list of texts"):
        encoder.encode("not a list")
