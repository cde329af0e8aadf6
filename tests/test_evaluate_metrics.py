"""Text metrics against the libraries they wrap (sacrebleu, rouge-score), called directly on
the same inputs, and SQuAD EM/F1 and distinct-n against hand-checked values."""

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from genforge.evaluate import (
    METRICS,
    MetricError,
    bleu,
    chrf,
    compute,
    distinct_n,
    exact_match_score,
    normalize_answer,
    rouge,
    self_bleu,
    squad,
    token_f1_score,
)

PREDICTIONS = [
    "The cat sat quietly on the warm mat.",
    "A quick brown fox jumps over the lazy dog",
    "Rain is expected in the north by Tuesday evening.",
    "He bought three apples, two pears and a melon.",
    "The committee approved the budget after a long debate.",
    "Trains were running late because of the storm.",
]
REFERENCES = [
    "The cat was sitting on the warm mat.",
    "The quick brown fox jumped over a lazy dog.",
    "Showers are expected in northern areas on Tuesday evening.",
    "He purchased three apples, two pears and one melon.",
    "After a lengthy debate the committee passed the budget.",
    "The storm made the trains run late.",
]
# A variable number of references per prediction.
MULTI_REFERENCES = [
    ["The cat was sitting on the warm mat.", "A cat sat on a warm mat."],
    ["The quick brown fox jumped over a lazy dog."],
    [
        "Showers are expected in northern areas on Tuesday evening.",
        "Rain is likely in the north on Tuesday.",
        "Expect rain up north Tuesday night.",
    ],
    ["He purchased three apples, two pears and one melon."],
    ["After a lengthy debate the committee passed the budget.", "The budget was approved by the committee."],
    ["The storm made the trains run late."],
]


def _streams(grouped):
    width = max(len(g) for g in grouped)
    return [[g[k] if k < len(g) else None for g in grouped] for k in range(width)]


# --------------------------------------------------------------------------------- sacrebleu
@pytest.mark.parametrize("references", [REFERENCES, MULTI_REFERENCES], ids=["one-ref", "variable-refs"])
@pytest.mark.parametrize("settings", [{}, {"lowercase": True, "tokenize": "intl"}, {"smooth_method": "floor"}])
def test_bleu_equals_sacrebleu(references, settings):
    grouped = [[r] if isinstance(r, str) else r for r in references]
    metric = BLEU(**settings)
    expected = metric.corpus_score(PREDICTIONS, _streams(grouped))
    result = bleu(PREDICTIONS, references, **settings)
    assert result.score == pytest.approx(expected.score, abs=1e-9)
    assert result.score > 5  # a real overlap, not a degenerate 0 that any bug would also give
    assert [result[f"precision_{n}"] for n in range(1, 5)] == pytest.approx(expected.precisions)
    assert result["brevity_penalty"] == pytest.approx(expected.bp)
    assert result.settings["signature"] == str(metric.get_signature())


def test_bleu_signature_records_variable_references():
    assert "nrefs:var" in bleu(PREDICTIONS, MULTI_REFERENCES).settings["signature"]
    assert "nrefs:1" in bleu(PREDICTIONS, REFERENCES).settings["signature"]


@pytest.mark.parametrize("references", [REFERENCES, MULTI_REFERENCES], ids=["one-ref", "variable-refs"])
@pytest.mark.parametrize("word_order", [0, 2], ids=["chrF", "chrF++"])
def test_chrf_equals_sacrebleu(references, word_order):
    grouped = [[r] if isinstance(r, str) else r for r in references]
    metric = CHRF(word_order=word_order)
    expected = metric.corpus_score(PREDICTIONS, _streams(grouped))
    result = chrf(PREDICTIONS, references, word_order=word_order)
    assert result.score == pytest.approx(expected.score, abs=1e-9)
    assert result.settings["signature"] == str(metric.get_signature())
    assert result.name == ("chrf++" if word_order == 2 else "chrf")


# ------------------------------------------------------------------------------ rouge-score
@pytest.mark.parametrize("use_stemmer", [False, True])
@pytest.mark.parametrize("references", [REFERENCES, MULTI_REFERENCES], ids=["one-ref", "multi-ref"])
def test_rouge_equals_rouge_score_mean(references, use_stemmer):
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
    per_example = [
        scorer.score_multi(refs, p) if isinstance(refs, list) else scorer.score(refs, p)
        for p, refs in zip(PREDICTIONS, references)
    ]
    result = rouge(PREDICTIONS, references, use_stemmer=use_stemmer)
    for kind in types:
        mean = lambda attr, kind=kind: sum(getattr(s[kind], attr) for s in per_example) / len(per_example)  # noqa: E731
        assert result[kind] == pytest.approx(mean("fmeasure"))
        assert result[f"{kind}_precision"] == pytest.approx(mean("precision"))
        assert result[f"{kind}_recall"] == pytest.approx(mean("recall"))
    assert result.score == result["rouge1"]
    assert result.settings["use_stemmer"] is use_stemmer


def test_stemming_changes_rouge():
    prediction, reference = ["the cats were running"], ["the cat was run"]
    assert rouge(prediction, reference, use_stemmer=True)["rouge1"] > rouge(prediction, reference)["rouge1"]


def test_rouge_lsum_splits_sentences_on_newlines():
    # Two sentences in swapped order: LCS over the whole text sees one sentence, the
    # summary-level LCS (per newline-separated sentence) sees both.
    prediction = ["the storm closed the bridge\nschools stayed open all week"]
    reference = ["schools stayed open all week\nthe storm closed the bridge"]
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"])
    expected = scorer.score(reference[0], prediction[0])
    result = rouge(prediction, reference, rouge_types=["rougeL", "rougeLsum"])
    assert result["rougeLsum"] == pytest.approx(expected["rougeLsum"].fmeasure) == pytest.approx(1.0)
    assert result["rougeL"] == pytest.approx(expected["rougeL"].fmeasure)
    assert result["rougeL"] < 0.7


# ------------------------------------------------------------------------------------ SQuAD
# (prediction, gold answers, exact match, F1), each checked by hand against the official rules.
SQUAD_CASES = [
    ("The Eiffel Tower", ["Eiffel Tower"], 1, 1.0),  # article dropped
    ("eiffel tower!", ["The Eiffel Tower."], 1, 1.0),  # case and punctuation
    ("  Paris \t  France ", ["Paris, France"], 1, 1.0),  # whitespace collapsed, comma dropped
    ("U.S.A.", ["USA"], 1, 1.0),  # punctuation removed, not replaced by a space
    ("an apple a day", ["apple day"], 1, 1.0),
    ("in Paris", ["Paris"], 0, 2 / 3),  # P 1/2, R 1
    ("New York New York", ["New York"], 0, 2 / 3),  # shared counts clipped: P 2/4, R 2/2
    ("London", ["Paris"], 0, 0.0),
    ("Paris", ["London", "paris"], 1, 1.0),  # best gold counts
    ("the red car", ["a blue car", "red truck"], 0, 0.5),  # each gold: P 1/2, R 1/2
    ("Theater", ["the ater"], 0, 0.0),  # "the" is dropped only as a whole word
    ("state-of-the-art", ["state of the art"], 0, 0.0),  # "stateoftheart" vs "state of art"
    ("the", ["Paris"], 0, 0.0),  # a prediction that normalises to nothing
    ("", [""], 1, 1.0),  # unanswerable, answered as such (SQuAD v2.0 rule)
    ("", ["", "Paris"], 0, 0.0),  # empty golds are dropped when there are others
    ("Paris", ["", "Paris"], 1, 1.0),
]


@pytest.mark.parametrize("prediction, golds, em, f1", SQUAD_CASES)
def test_squad_exact_match_and_f1(prediction, golds, em, f1):
    result = squad([prediction], [golds])
    assert result["exact_match"] == pytest.approx(100.0 * em)
    assert result["f1"] == pytest.approx(100.0 * f1)


def test_squad_corpus_is_the_mean_of_the_cases():
    result = squad([c[0] for c in SQUAD_CASES], [c[1] for c in SQUAD_CASES])
    assert result["exact_match"] == pytest.approx(100 * sum(c[2] for c in SQUAD_CASES) / len(SQUAD_CASES))
    assert result["f1"] == pytest.approx(100 * sum(c[3] for c in SQUAD_CASES) / len(SQUAD_CASES))
    assert result.score == result["f1"]


def test_squad_pairwise_helpers():
    assert normalize_answer("  The  QUICK, brown fox!  ") == "quick brown fox"
    assert exact_match_score("A Dog.", "dog") == 1.0
    assert token_f1_score("big red dog", "red dog") == pytest.approx(0.8)  # P 2/3, R 1


# -------------------------------------------------------------------------------- diversity
def test_distinct_n_hand_computed():
    predictions = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique of 7; bigrams: ab ba ab ab bc -> 3 unique of 5;
    # trigrams: aba bab abc -> 3 of 3.
    result = distinct_n(predictions, orders=(1, 2, 3))
    assert result["distinct-1"] == pytest.approx(3 / 7)
    assert result["distinct-2"] == pytest.approx(3 / 5)
    assert result["distinct-3"] == pytest.approx(1.0)
    assert result.score == result["distinct-1"]


def test_distinct_n_does_not_join_predictions_and_handles_short_ones():
    # "x y" + "z": a bigram across predictions ("y z") must not be counted.
    assert distinct_n(["x y", "z"], orders=(2,)).score == pytest.approx(1.0)
    assert distinct_n(["x", "y"], orders=(2,)).score == 0.0  # no bigram at all
    assert distinct_n(["The the"], orders=(1,), lowercase=True).score == pytest.approx(0.5)


def test_self_bleu_equals_sacrebleu_sentence_bleu():
    metric = BLEU(effective_order=True)
    others = [PREDICTIONS[:i] + PREDICTIONS[i + 1 :] for i in range(len(PREDICTIONS))]
    expected = [metric.sentence_score(p, refs).score for p, refs in zip(PREDICTIONS, others)]
    result = self_bleu(PREDICTIONS)
    assert result.score == pytest.approx(sum(expected) / len(expected))
    assert result.settings["signature"] == str(metric.get_signature())


def test_self_bleu_is_high_for_copies_and_low_for_varied_text():
    copies = ["the same sentence is here"] * 3
    assert self_bleu(copies).score == pytest.approx(100.0)
    assert self_bleu(PREDICTIONS).score < 20


# ------------------------------------------------------------------------------- dispatcher
def test_compute_runs_each_named_metric_with_defaults():
    results = compute(["bleu", "rouge", "squad", "distinct_n", "self_bleu", "chrf"], PREDICTIONS, REFERENCES)
    assert set(results) == {"bleu", "rouge", "squad", "distinct_n", "self_bleu", "chrf"}
    assert results["bleu"].score == pytest.approx(bleu(PREDICTIONS, REFERENCES).score)
    assert results["rouge"].details == pytest.approx(rouge(PREDICTIONS, REFERENCES).details)
    assert results["distinct_n"].score == pytest.approx(distinct_n(PREDICTIONS).score)


def test_reference_free_metrics_need_no_references():
    results = compute(["distinct_n", "self_bleu"], PREDICTIONS)
    assert results["self_bleu"].score == pytest.approx(self_bleu(PREDICTIONS).score)


# -------------------------------------------------------------------------------- bad input
def test_unknown_metric_name_lists_the_accepted_ones():
    with pytest.raises(MetricError, match="unknown metric.*'blue'.*accepted: bleu, chrf, rouge, meteor, squad"):
        compute(["bleu", "blue"], PREDICTIONS, REFERENCES)
    assert set(METRICS) == {"bleu", "chrf", "rouge", "meteor", "squad", "distinct_n", "self_bleu"}


@pytest.mark.parametrize("function", [bleu, chrf, rouge, squad])
def test_length_mismatch_is_refused(function):
    with pytest.raises(MetricError, match="6 predictions but 5 references"):
        function(PREDICTIONS, REFERENCES[:5])


@pytest.mark.parametrize("function", [bleu, chrf, rouge, squad])
def test_empty_predictions_are_refused(function):
    with pytest.raises(MetricError, match="prediction list is empty"):
        function([], [])


def test_other_bad_inputs():
    with pytest.raises(MetricError, match="single string"):
        bleu("a sentence", ["a sentence"])
    with pytest.raises(MetricError, match="empty list of references"):
        bleu(["a"], [[]])
    with pytest.raises(MetricError, match="compares against references"):
        compute("bleu", PREDICTIONS)
    with pytest.raises(MetricError, match="prediction 1 is a int"):
        squad(["a", 3], ["a", "b"])
    with pytest.raises(MetricError, match="unknown rouge type"):
        rouge(PREDICTIONS, REFERENCES, rouge_types=["rouge1", "rougeW"])
    with pytest.raises(MetricError, match="at least 2 predictions"):
        self_bleu(["only one"])
    with pytest.raises(MetricError, match="smooth_method 'laplace' is unknown; accepted"):
        bleu(PREDICTIONS, REFERENCES, smooth_method="laplace")
    with pytest.raises(MetricError, match="positive integers"):
        distinct_n(PREDICTIONS, orders=(0,))
