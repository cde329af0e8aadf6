"""genforge.evaluate.uncertainty: every measure equals its formula on hand-made distributions,
semantic clustering groups scripted samples, temperature scaling recovers a planted
temperature, and on a tiny model trained for sums the confidences tell right answers from
wrong ones (AUROC well above 0.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from factories import tiny_model
from sklearn.metrics import roc_auc_score
from uncertainty_task import decode, sum_problems, train_sum_model

from genforge.evaluate import calibration_from_confidences
from genforge.evaluate.base import MetricError
from genforge.evaluate.uncertainty import (
    MEASURES,
    agreement_confidence,
    answer_confidences,
    auroc,
    cluster_answers,
    embedding_equivalence,
    entailment_equivalence,
    entropy_confidence,
    exact_match_equivalence,
    fit_confidence_temperature,
    fit_temperature,
    score_completions,
    semantic_entropy,
    sequence_logprob_confidence,
    temperature_scaled_confidence,
    token_entropy,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ the formulas
def test_token_entropy_is_minus_sum_p_log_p():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]])
    logits = torch.log(p)  # -inf for the impossible tokens: they add nothing, not nan
    expected = [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), 0.0]
    assert token_entropy(logits).tolist() == pytest.approx(expected, abs=1e-6)
    assert float(token_entropy(torch.zeros(7))) == pytest.approx(math.log(7))


def test_entropy_and_logprob_confidences_follow_their_formulas():
    entropies = [0.1, 0.7, 0.4]
    assert entropy_confidence(entropies, "mean") == pytest.approx(math.exp(-0.4))
    assert entropy_confidence(entropies, "max") == pytest.approx(math.exp(-0.7))
    logprobs = [math.log(0.5), math.log(0.8), math.log(0.9)]
    assert sequence_logprob_confidence(logprobs, normalise=False) == pytest.approx(0.5 * 0.8 * 0.9)
    assert sequence_logprob_confidence(logprobs, normalise=True) == pytest.approx((0.5 * 0.8 * 0.9) ** (1 / 3))
    with pytest.raises(MetricError, match="log-probabilities, not probabilities"):
        sequence_logprob_confidence([0.5, 0.2])
    with pytest.raises(MetricError, match="accepted: mean, max"):
        entropy_confidence(entropies, "median")


def test_score_completions_matches_a_full_forward_pass():
    model = tiny_model(seed=3).eval()
    prompts, completions = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    scores = score_completions(model, prompts, completions, temperature=2.0)
    for prompt, completion, score in zip(prompts, completions, scores):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0].float() / 2.0
        steps = logits[len(prompt) - 1 : -1]
        logp = torch.log_softmax(steps, -1)
        assert score.logprobs.tolist() == pytest.approx(logp[range(len(completion)), completion].tolist(), abs=1e-5)
        assert score.entropies.tolist() == pytest.approx((-(logp.exp() * logp).sum(-1)).tolist(), abs=1e-5)


def test_agreement_is_the_vote_share_of_the_answer():
    samples = ["12", "12", "13", None, "12", "14"]  # None: unreadable, left out of the shares
    assert agreement_confidence("12", samples) == pytest.approx(3 / 5)
    assert agreement_confidence("14", samples) == pytest.approx(1 / 5)
    assert agreement_confidence("99", samples) == 0.0 and agreement_confidence(None, samples) == 0.0


# -------------------------------------------------------------------- semantic entropy
def test_clusters_by_bidirectional_entailment_on_scripted_samples():
    # "Paris" and "the capital is Paris" entail each other; "France" is entailed by both
    # but entails neither back, so it is a meaning of its own.
    entails = {
        ("Paris", "The capital is Paris."),
        ("The capital is Paris.", "Paris"),
        ("Paris", "France"),
        ("The capital is Paris.", "France"),
    }
    equivalent = entailment_equivalence(lambda premise, hypothesis: (premise, hypothesis) in entails)
    answers = ["Paris", "France", "The capital is Paris.", "Paris", "Lyon"]
    assert cluster_answers(answers, equivalent) == [0, 1, 0, 0, 2]
    p = np.array([3, 1, 1]) / 5
    assert semantic_entropy(answers, equivalent) == pytest.approx(float(-(p * np.log(p)).sum()))


def test_exact_match_and_embedding_clusters():
    assert cluster_answers(["The 12.", "12", "twelve", "13"], exact_match_equivalence()) == [0, 0, 1, 2]
    vectors = {"cat": [1.0, 0.0], "kitten": [0.95, 0.31], "car": [0.0, 1.0]}
    equivalent = embedding_equivalence(lambda texts: torch.tensor([vectors[t] for t in texts]), threshold=0.9)
    assert cluster_answers(["cat", "car", "kitten"], equivalent) == [0, 1, 0]
    assert semantic_entropy(["7", "7", "7"]) == 0.0


def test_likelihood_weighted_semantic_entropy_sums_distinct_sequences():
    answers = ["12", "12", "12", "13"]
    logprobs = [math.log(0.3), math.log(0.3), math.log(0.1), math.log(0.2)]
    # The first two are one sequence drawn twice: counted once. Cluster "12" has 0.3 + 0.1.
    ids = ["a", "a", "b", "c"]
    p = np.array([0.4, 0.2]) / 0.6
    expected = float(-(p * np.log(p)).sum())
    assert semantic_entropy(answers, logprobs=logprobs, sample_ids=ids) == pytest.approx(expected)
    # Without ids the text names the sequence: the three "12" count once (0.3), "13" 0.2.
    p = np.array([0.3, 0.2]) / 0.5
    assert semantic_entropy(answers, logprobs=logprobs) == pytest.approx(float(-(p * np.log(p)).sum()))


# ---------------------------------------------------------------- temperature and AUROC
def test_temperature_scaling_recovers_a_planted_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6000, 5, generator=generator) * 3
    planted = 2.5
    labels = torch.multinomial(torch.softmax(logits / planted, -1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(planted, rel=0.06)


def test_confidence_temperature_recalibrates_overconfident_scores():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 4000)
    correct = rng.random(4000) < 1 / (1 + np.exp(-true_logit))
    overconfident = 1 / (1 + np.exp(-3 * true_logit))  # logits three times too large
    temperature = fit_confidence_temperature(overconfident, correct)
    assert temperature == pytest.approx(3.0, rel=0.1)
    scaled = temperature_scaled_confidence(overconfident, temperature)
    before = calibration_from_confidences(overconfident, correct).ece
    after = calibration_from_confidences(scaled, correct).ece
    assert after < before / 3
    assert auroc(scaled, correct) == pytest.approx(auroc(overconfident, correct))  # monotone: ranking kept


def test_auroc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    conf = rng.integers(0, 6, 300) / 5  # many ties
    correct = rng.random(300) < conf * 0.8
    assert auroc(conf, correct) == pytest.approx(roc_auc_score(correct, conf))
    with pytest.raises(MetricError, match="both right and wrong"):
        auroc([0.2, 0.9], [True, True])


# ------------------------------------------------------------------ the trained sums task
@pytest.fixture(scope="module")
def sums_results():
    problems = sum_problems(99)
    model = train_sum_model(problems[:6000], steps=600)
    held_out = problems[6000:6300]
    results = answer_confidences(
        model, [p.prompt_ids for p in held_out], lambda ids: decode(ids) or None, num_samples=8, max_new_tokens=4
    )
    correct = np.array([r.answer == p.answer for r, p in zip(results, held_out)])
    return results, correct


@pytest.mark.slow
def test_confidence_separates_right_from_wrong_answers_on_sums(sums_results):
    results, correct = sums_results
    # The model gets most but not all unseen sums right (measured: 0.83 of 300).
    assert 0.4 < correct.mean() < 0.97
    scores = {m: auroc([r.confidences[m] for r in results], correct) for m in MEASURES}
    # Measured (seeded, one thread): 0.75-0.87 for every measure; 0.65 leaves a margin.
    assert min(scores.values()) > 0.65, scores
    for result in results:
        assert all(0.0 <= c <= 1.0 for c in result.confidences.values())
