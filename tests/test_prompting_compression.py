"""Prompt compression: marked regions, the budget, word-level dropping by surprisal, and the LM scorer."""

from __future__ import annotations

import re

import pytest
import torch
from factories import tiny_model

from genforge.prompting import (
    CausalLMScorer,
    CompressionError,
    RandomScorer,
    Segment,
    compress_prompt,
    split_marked,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds overhead


class WordScorer:
    """One token per word, with the surprisal given per word (5.0 for any other): exact tests."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def token_surprisals(self, text: str):
        return [(m.start(), m.end(), self.scores.get(m.group(), 5.0)) for m in re.finditer(r"\S+", text)]


SCORES = {"the": 0.1, "cat": 3.0, "sat": 1.0, "on": 0.2, "mat": 2.0, "near": 0.5, "Zanzibar": 9.0}
PROMPT = "<keep>Answer briefly.</keep>\nthe cat sat on the mat near Zanzibar\n<keep>Question: where?</keep>"


def test_split_marked_regions():
    assert split_marked(PROMPT) == [
        Segment("Answer briefly.", keep=True),
        Segment("\nthe cat sat on the mat near Zanzibar\n"),
        Segment("Question: where?", keep=True),
    ]
    for bad, message in [
        ("a <keep>b", "never closed"),
        ("a </keep> b", "closes no <keep>"),
        ("<keep>a <keep>b</keep></keep>", "do not nest"),
    ]:
        with pytest.raises(CompressionError, match=message):
            split_marked(bad)


def test_drops_the_least_surprising_words_until_the_budget_fits():
    result = compress_prompt(PROMPT, WordScorer(SCORES), budget=8)
    # 12 words; the four least surprising go ("the", "the", "on", "near"); the line break of
    # the dropped "\nthe" moves to "cat"; the kept regions are untouched.
    assert result.text == "Answer briefly.\ncat sat mat Zanzibar\nQuestion: where?"
    assert result.original_tokens == 12 and result.compressed_tokens == 8 and result.ratio == 1.5
    assert result.dropped_words == ["the", "on", "the", "near"]
    joined = "".join(s.text for s in split_marked(PROMPT))
    assert [joined[a:b].strip() for a, b in result.dropped_spans] == result.dropped_words
    tighter = compress_prompt(PROMPT, WordScorer(SCORES), budget=5)
    assert tighter.text == "Answer briefly.\nZanzibar\nQuestion: where?"


def test_a_prompt_within_budget_is_unchanged_and_a_budget_under_the_kept_regions_is_refused():
    assert compress_prompt(PROMPT, WordScorer(SCORES), budget=12).text == "".join(s.text for s in split_marked(PROMPT))
    with pytest.raises(CompressionError, match="kept regions alone are 4 tokens, over the budget of 3"):
        compress_prompt(PROMPT, WordScorer(SCORES), budget=3)
    with pytest.raises(CompressionError, match="positive number of tokens"):
        compress_prompt(PROMPT, WordScorer(SCORES), budget=0)


def test_random_dropping_is_seeded(bpe_tokenizer):
    text = "<keep>Q:</keep> " + " ".join(f"word{i}" for i in range(40))
    first = compress_prompt(text, RandomScorer(bpe_tokenizer, seed=1), budget=30)
    again = compress_prompt(text, RandomScorer(bpe_tokenizer, seed=1), budget=30)
    other = compress_prompt(text, RandomScorer(bpe_tokenizer, seed=2), budget=30)
    assert first.text == again.text != other.text
    assert first.compressed_tokens <= 30 and first.text.startswith("Q:")


def _reference_surprisal(model, ids):
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(-log_probs[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_causal_lm_surprisal_matches_the_models_log_probabilities(bpe_tokenizer):
    model = tiny_model(vocab_size=448, max_position_embeddings=32).eval()
    scorer = CausalLMScorer(model, bpe_tokenizer)
    text = "import json\ndef load(path):\n    return json.loads(path)\n" * 3  # longer than 32 tokens
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 40
    spans = scorer.token_surprisals(text)
    assert len(spans) == len(ids) and all(s[2] == s[2] and s[2] >= 0 for s in spans)
    sequence = [bpe_tokenizer.bos_token_id, *ids]
    # Inside the first window every token is scored after BOS and the tokens before it.
    expected = _reference_surprisal(model, sequence[:32])
    assert [s for _, _, s in spans[:31]] == pytest.approx(expected, abs=1e-4)
    # Later tokens are scored in strided windows with at least half a context before them.
    # Token 31 is sequence position 32: the second window, sequence[16:48], scores it after 16 tokens.
    assert spans[31][2] == pytest.approx(_reference_surprisal(model, sequence[16:48])[15], abs=1e-4)


def test_compression_with_a_causal_lm_keeps_the_marked_regions(bpe_tokenizer):
    model = tiny_model(vocab_size=448, max_position_embeddings=64).eval()
    scorer = CausalLMScorer(model, bpe_tokenizer)
    context = "The json module encodes and decodes JSON data. It maps objects to dicts and arrays to lists. "
    result = compress_prompt(
        [
            Segment("Instruction: answer from the context.\n", keep=True),
            Segment(context * 2),
            Segment("Q: what?", keep=True),
        ],
        scorer,
        budget=60,
    )
    assert result.compressed_tokens <= 60 < result.original_tokens
    assert result.text.startswith("Instruction: answer from the context.\n") and result.text.endswith("Q: what?")
    assert result.compressed_tokens == len(bpe_tokenizer.encode(result.text, add_special_tokens=False))
