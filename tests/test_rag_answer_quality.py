"""Answer-level metrics: claim splitting, judge and generator plumbing with scripted models, and
the metrics' order on a labelled set (tests/data/rag_answer_eval.json: faithful, unfaithful and
off-topic answers written for these tests) with the offline MiniLM encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_rag_retrieve import FakeGenerator, HashEmbedder

from genforge.rag.answer_quality import (
    AnswerEvaluator,
    JudgeClaimChecker,
    SupportClaimChecker,
    answer_relevance,
    faithfulness,
    split_claims,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LABELLED = json.loads((Path(__file__).parent / "data" / "rag_answer_eval.json").read_text())["items"]
KINDS = ("faithful", "unfaithful", "off_topic")


def test_claims_are_sentences_cut_at_clause_boundaries():
    text = "Plants need light [1]. They make glucose, and they release oxygen; roots take up water [2]. Red, and blue."
    assert split_claims(text) == [
        "Plants need light.",
        "They make glucose",
        "and they release oxygen",
        "roots take up water.",
        "Red, and blue.",  # too little on either side to be two claims
    ]
    assert split_claims("  [1] ") == []


def test_a_generator_lists_the_claims():
    generator = FakeGenerator({"Claims:": "1. Plants need light.\n- They release oxygen.\n\n"})
    assert split_claims("Plants need light and release oxygen.", generator) == [
        "Plants need light.",
        "They release oxygen.",
    ]
    assert "Answer: Plants need light and release oxygen." in generator.prompts[0]
    # A model that lists nothing falls back to the rule.
    assert split_claims("Plants need light.", FakeGenerator({})) == ["Plants need light."]


def test_judge_verdicts_are_parsed_and_unclear_replies_count_against():
    replies = iter(["Yes.", "no", "Maybe, it depends"])

    class Judge:
        prompts = []

        def complete(self, prompt, max_tokens=256):
            self.prompts.append(prompt)
            return next(replies)

    judge = Judge()
    result = faithfulness(
        "The sky is blue. Grass is red. Water is wet.", ["The sky is blue.", "Water is wet."], JudgeClaimChecker(judge)
    )
    assert result.method == "judge" and result.score == pytest.approx(1 / 3)
    assert [c.supported for c in result.claims] == [True, False, False]
    assert result.claims[1].reason == "judge: no" and "unclear judge reply" in result.claims[2].reason
    assert (
        "[1] The sky is blue.\n\n[2] Water is wet." in judge.prompts[0]
        and "Claim: The sky is blue." in judge.prompts[0]
    )
    with pytest.raises(TypeError, match="complete"):
        JudgeClaimChecker(object())


def test_relevance_from_generated_questions_is_their_mean_cosine():
    embedder = HashEmbedder()
    generator = FakeGenerator({"Questions:": "1. how are blocks stored\n2. what maps sequences to blocks\n3. extra\n"})
    result = answer_relevance("how are cache blocks stored", "Blocks hold the cache [1].", embedder, generator, 2)
    assert result.method == "generated_questions"
    assert result.questions == ["how are blocks stored", "what maps sequences to blocks"]
    assert "Write 2 different questions" in generator.prompts[0] and "[1]" not in generator.prompts[0]
    v = embedder.embed(["how are cache blocks stored", *result.questions]).astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert result.score == pytest.approx(float((v[1:] @ v[0]).mean()))
    # No generator, or one that writes nothing: the embedding-only fallback, and it says so.
    for fallback in (None, FakeGenerator({})):
        plain = answer_relevance("how are cache blocks stored", "Blocks hold the cache.", embedder, fallback)
        assert plain.method == "embedding" and plain.questions == []
    with pytest.raises(ValueError, match="non-empty"):
        answer_relevance("q", " ", embedder)


def test_a_number_the_passage_does_not_state_is_unsupported():
    checker = SupportClaimChecker(HashEmbedder())
    passage = ["The Moon is about 384,400 kilometres from Earth."]
    assert faithfulness("The Moon is about 384400 kilometres from Earth.", passage, checker).score == 1.0
    wrong = faithfulness("The Moon is about 380,000 kilometres from Earth.", passage, checker)
    assert wrong.score == 0.0 and wrong.claims[0].reason == "number not in the passage: 380000"
    with pytest.raises(ValueError, match="no claims"):
        faithfulness("", passage, checker)


@pytest.fixture(scope="module")
def minilm():
    from genforge.rag import EncoderEmbedder

    return EncoderEmbedder(max_tokens=128)


@pytest.fixture(scope="module")
def labelled_scores(minilm):
    evaluator = AnswerEvaluator(minilm)
    return {
        item["id"]: {k: evaluator.evaluate(item["question"], item["answers"][k], item["passages"]) for k in KINDS}
        for item in LABELLED
    }


def test_labelled_set_faithfulness_orders_faithful_above_unfaithful(labelled_scores, capsys):
    means = {
        k: {
            m: np.mean([s[k][m] for s in labelled_scores.values()])
            for m in ("faithfulness", "mean_support", "answer_relevance")
        }
        for k in KINDS
    }
    with capsys.disabled():
        print("\nlabelled answers (MiniLM, support checker, embedding relevance):")
        for k, row in means.items():
            print(f"  {k:10s} " + "  ".join(f"{m}={v:.3f}" for m, v in row.items()))
    assert all(s["faithful"]["faithfulness_method"] == "support_checker" for s in labelled_scores.values())
    for item, s in labelled_scores.items():
        # Every claim of a faithful answer is supported.
        assert s["faithful"]["faithfulness"] == 1.0, (item, s["faithful"]["unsupported_claims"])
        # Continuous support orders every item; the share of supported claims never inverts the
        # order, and ties only where a claim contradicts the passage with the passage's own words.
        assert s["faithful"]["mean_support"] > s["unfaithful"]["mean_support"], item
        assert s["faithful"]["faithfulness"] >= s["unfaithful"]["faithfulness"], item
        assert s["off_topic"]["faithfulness"] == 0.0, item
    strictly = sum(s["faithful"]["faithfulness"] > s["unfaithful"]["faithfulness"] for s in labelled_scores.values())
    assert strictly >= 6 and means["unfaithful"]["faithfulness"] < 0.5


def test_labelled_set_relevance_orders_on_topic_above_off_topic(labelled_scores):
    for item, s in labelled_scores.items():
        assert s["faithful"]["relevance_method"] == "embedding"
        for on_topic in ("faithful", "unfaithful"):
            assert s[on_topic]["answer_relevance"] > s["off_topic"]["answer_relevance"] + 0.3, (item, on_topic)


def test_labelled_set_relevance_through_generated_questions(minilm):
    """The generator path on the same set: a scripted model returns the questions written for each
    answer (tests/data), and the question-to-questions cosine orders them as the fallback does."""
    for item in LABELLED:
        scores = {}
        for kind in ("faithful", "off_topic"):
            generator = FakeGenerator({"Questions:": "\n".join(item["questions_from"][kind])})
            result = answer_relevance(item["question"], item["answers"][kind], minilm, generator)
            assert result.method == "generated_questions" and len(result.questions) == 2
            scores[kind] = result.score
        assert scores["faithful"] > scores["off_topic"] + 0.3, item["id"]


def test_evaluating_genforge_answers_checks_claims_against_their_cited_passages():
    from test_rag_answer import mixed_answerer
    from test_rag_retrieve import tiny_chunks

    from genforge.rag import HybridIndex, Retriever

    embedder = HashEmbedder()
    retriever = Retriever(HybridIndex.build(tiny_chunks(), embedder), embedder)
    answer = mixed_answerer(retriever, "flag").ask("how does paged attention store the key value cache")
    chunks = {c.chunk_id: c for c in retriever.index.chunks}
    result = AnswerEvaluator(embedder).evaluate_answers([answer], chunks)
    assert result["claim_faithfulness"] == 0.5  # the paged-attention claim, not the dough one
    assert 0.0 < result["answer_relevance"] <= 1.0
    with pytest.raises(ValueError, match="no answered"):
        AnswerEvaluator(embedder).evaluate_answers([], chunks)
