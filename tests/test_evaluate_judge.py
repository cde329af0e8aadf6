"""LLM-as-judge aggregation: the position-swap rule, Bradley-Terry and Elo ratings (hand cases,
the likelihood equations, a synthetic tournament), and Cohen's kappa against scikit-learn."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.metrics import cohen_kappa_score

from genforge.evaluate import (
    Battle,
    MetricError,
    bradley_terry,
    cohen_kappa,
    combine_orders,
    elo_ratings,
    judge_all,
    judge_pair,
    pairwise_prompt,
    parse_verdict,
)

ELO_POINTS_PER_LN = 400 / math.log(10)


# ------------------------------------------------------------------------------ position swap
@pytest.mark.parametrize(
    "forward, swapped, verdict, consistent",
    [
        ("A", "B", "A", True),  # A first: A wins; B first: the second answer (original A) wins
        ("B", "A", "B", True),
        ("tie", "tie", "tie", True),
        ("A", "A", "tie", False),  # always the first answer: pure position bias
        ("B", "B", "tie", False),
        ("A", "tie", "tie", False),  # a win in one order and a tie in the other is not a win
        ("tie", "B", "tie", False),
    ],
)
def test_position_swap_rule(forward, swapped, verdict, consistent):
    assert combine_orders(forward, swapped) == verdict
    calls = iter([forward, swapped])
    judgment = judge_pair(lambda q, a, b: next(calls), "q", "first answer", "second answer")
    assert judgment.verdict == verdict and judgment.consistent is consistent
    assert (judgment.forward, judgment.swapped) == (forward, swapped)


def test_judge_pair_shows_both_orders_to_the_judge():
    seen = []

    def judge(question, answer_a, answer_b):
        seen.append((answer_a, answer_b))
        return "A" if answer_a == "good" else "B"  # a fair judge that prefers "good"

    assert judge_pair(judge, "q", "good", "bad").verdict == "A"
    assert judge_pair(judge, "q", "bad", "good").verdict == "B"
    assert seen[:2] == [("good", "bad"), ("bad", "good")]


def test_verdicts_are_checked_and_parsed():
    with pytest.raises(MetricError, match="the judge returned 'first'; a judge must return 'A', 'B' or 'tie'"):
        judge_pair(lambda q, a, b: "first", "q", "x", "y")
    assert judge_pair(lambda q, a, b: " Tie ", "q", "x", "y").verdict == "tie"  # case and spaces forgiven
    assert parse_verdict("Answer B is more accurate.\n[[B]]") == "B"
    assert parse_verdict("First I thought [[A]], but on reflection [[tie]]") == "tie"  # the last mark counts
    assert parse_verdict("a") == "A"
    with pytest.raises(MetricError, match="no verdict in the reply"):
        parse_verdict("Both answers have merit.")


def test_pairwise_prompt_contains_the_pieces():
    prompt = pairwise_prompt("What is 2+2?", "4", "5", criteria="correctness")
    assert "What is 2+2?" in prompt and "### Answer A\n4\n" in prompt and "### Answer B\n5\n" in prompt
    assert "[[A]]" in prompt and "[[B]]" in prompt and "[[tie]]" in prompt and "correctness" in prompt
    assert parse_verdict(prompt.replace("[[tie]]", "").replace("[[A]]", "")) == "B"  # marks are parseable
    with pytest.raises(MetricError, match="answer_b must be a string"):
        pairwise_prompt("q", "a", None)


# ----------------------------------------------------------------------------- Bradley-Terry
def test_bradley_terry_two_models_with_a_tie():
    # A: 2 wins + 1 tie = 2.5 points, B: 1 win + 1 tie = 1.5 points, 4 games: p_A / p_B = 2.5 / 1.5.
    battles = [("A", "B", "A"), ("A", "B", "A"), ("B", "A", "A"), ("A", "B", "tie")]
    ratings = bradley_terry(battles).ratings
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(2.5 / 1.5), abs=1e-6)
    assert (ratings["A"] + ratings["B"]) / 2 == pytest.approx(1000.0)


def test_bradley_terry_chain_hand_computed():
    # On a tree of comparisons each pair's odds are free: A beat B 2-1, B beat C 2-1, A and C
    # never met, so p_A/p_B = p_B/p_C = 2 and the ratings sit 400 log10(2) apart around 1000.
    battles = [("A", "B", "A"), ("A", "B", "A"), ("A", "B", "B"), ("B", "C", "A"), ("C", "B", "B"), ("B", "C", "B")]
    result = bradley_terry(battles)
    step = 400 * math.log10(2)
    assert result.ratings["A"] == pytest.approx(1000 + step, abs=1e-6)
    assert result.ratings["B"] == pytest.approx(1000, abs=1e-6)
    assert result.ratings["C"] == pytest.approx(1000 - step, abs=1e-6)
    assert result.ranking() == ["A", "B", "C"]
    assert result.expected_score("A", "C") == pytest.approx(4 / 5)
    assert result.settings["ties"] == "half a win each" and result.num_battles == 6


def random_battles(strengths, count, seed, tie_rate=0.1):
    """Battles drawn from a Bradley-Terry model with `strengths` on the Elo scale."""
    rng = np.random.default_rng(seed)
    names = list(strengths)
    battles = []
    for _ in range(count):
        a, b = rng.choice(len(names), 2, replace=False)
        a, b = names[a], names[b]
        p_a = 1 / (1 + 10 ** ((strengths[b] - strengths[a]) / 400))
        u = rng.random()
        battles.append(Battle(a, b, "tie" if u < tie_rate else "A" if u < tie_rate + (1 - tie_rate) * p_a else "B"))
    return battles


def test_bradley_terry_is_the_likelihood_maximum():
    battles = random_battles({"w": 0, "x": 80, "y": 200, "z": 260}, 300, seed=3)
    result = bradley_terry(battles)
    names = sorted(result.ratings)
    index = {n: i for i, n in enumerate(names)}

    def negative_log_likelihood(theta):  # ties as half a win and half a loss
        total = 0.0
        for a, b, winner in battles:
            s = {"A": 1.0, "B": 0.0, "tie": 0.5}[winner]
            d = theta[index[a]] - theta[index[b]]
            total -= s * -np.logaddexp(0, -d) + (1 - s) * -np.logaddexp(0, d)
        return total

    found = minimize(negative_log_likelihood, np.zeros(len(names)), method="BFGS", options={"gtol": 1e-9}).x
    found -= found.mean()
    ours = np.array([result.ratings[n] - 1000 for n in names]) / ELO_POINTS_PER_LN
    np.testing.assert_allclose(ours, found, atol=1e-4)


def test_bradley_terry_needs_a_finite_maximum():
    with pytest.raises(MetricError, match="models \\['B', 'C'\\] never beat or tied the others.*prior=1"):
        bradley_terry([("A", "B", "A"), ("B", "C", "A")])
    with pytest.raises(MetricError, match="never met .* the group of 'A'"):
        bradley_terry([("A", "B", "A"), ("B", "A", "A"), ("C", "D", "tie")], prior=1)
    shrunk = bradley_terry([("A", "B", "A"), ("B", "C", "A")], prior=1)
    assert shrunk.ranking() == ["A", "B", "C"] and shrunk.settings["prior"] == 1
    with pytest.raises(MetricError, match="battle 0 is 'AB'"):
        bradley_terry(["AB"])
    with pytest.raises(MetricError, match="battle 0 pits 'A' against itself"):
        bradley_terry([("A", "A", "tie")])


# -------------------------------------------------------------------------------------- Elo
def test_elo_hand_computed():
    result = elo_ratings([("A", "B", "A"), ("A", "B", "B")], k=32)
    # Battle 1: both expected 0.5, A +16. Battle 2: B (984) expected 1 / (1 + 10^(32/400)).
    expected_b = 1 / (1 + 10 ** (32 / 400))
    b = 984 + 32 * (1 - expected_b)
    assert result.ratings["B"] == pytest.approx(b)
    assert result.ratings["A"] == pytest.approx(2000 - b)  # Elo conserves the rating sum
    assert result.settings["k"] == 32


def test_elo_bootstrap_is_seeded_and_brackets_the_ratings():
    battles = random_battles({"a": 0, "b": 100, "c": 200}, 400, seed=5)
    first = elo_ratings(battles, k=8, bootstrap=200, seed=1)
    again = elo_ratings(battles, k=8, bootstrap=200, seed=1)
    assert first.intervals == again.intervals
    for model, (low, high) in first.intervals.items():
        assert low < high and low - 30 < first.ratings[model] < high + 30
    shuffled = elo_ratings(battles, k=8, bootstrap=200, bootstrap_method="shuffle")
    assert shuffled.settings["bootstrap_method"] == "shuffle"
    with pytest.raises(MetricError, match="bootstrap_method 'jackknife' is unknown"):
        elo_ratings(battles, bootstrap=10, bootstrap_method="jackknife")


# --------------------------------------------------------------------- synthetic tournament
def test_synthetic_tournament_recovers_the_order():
    strengths = {"small": 0.0, "medium": 150.0, "large": 300.0, "huge": 450.0}
    questions = [f"question {i}" for i in range(40)]
    answers = {model: [f"{model}|{q}" for q in questions] for model in strengths}
    rng = np.random.default_rng(0)

    def judge(question, answer_a, answer_b):
        # Prefers the first answer 20% of the time whatever it says (position bias), else
        # follows Bradley-Terry odds between the true strengths.
        if rng.random() < 0.2:
            return "A"
        a, b = answer_a.split("|")[0], answer_b.split("|")[0]
        p_a = 1 / (1 + 10 ** ((strengths[b] - strengths[a]) / 400))
        return "A" if rng.random() < p_a else "B"

    judged = judge_all(judge, questions, answers)
    assert len(judged.battles) == 6 * 40 and len(judged.judgments) == 240
    assert 0.3 < judged.consistency < 0.9
    truth = sorted(strengths, key=strengths.get, reverse=True)
    bt = bradley_terry(judged.battles, bootstrap=100)
    assert bt.ranking() == truth
    assert bt.intervals["huge"][0] > bt.intervals["small"][1]
    elo = elo_ratings(judged.battles, k=16)
    assert elo.ranking() == truth


def test_judge_all_bad_input():
    with pytest.raises(MetricError, match="model 'b' has 1 answer\\(s\\) for 2 questions"):
        judge_all(lambda *a: "A", ["q1", "q2"], {"a": ["x", "y"], "b": ["x"]})
    with pytest.raises(MetricError, match="pairs name model\\(s\\) without answers"):
        judge_all(lambda *a: "A", ["q1"], {"a": ["x"], "b": ["y"]}, pairs=[("a", "c")])


# ------------------------------------------------------------------------------------ kappa
@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_kappa_equals_scikit_learn(weights):
    rng = np.random.default_rng(7)
    human = rng.integers(1, 6, 200)
    judge = np.clip(human + rng.integers(-1, 2, 200) * (rng.random(200) < 0.4), 1, 5)
    ours = cohen_kappa(judge.tolist(), human.tolist(), weights=weights)
    assert ours.score == pytest.approx(cohen_kappa_score(judge, human, weights=weights), abs=1e-12)


def test_kappa_on_verdicts_equals_scikit_learn():
    judge = ["A", "B", "tie", "A", "A", "B", "tie", "B", "A", "A"]
    human = ["A", "B", "B", "A", "tie", "B", "tie", "A", "A", "B"]
    result = cohen_kappa(judge, human)
    assert result.score == pytest.approx(cohen_kappa_score(judge, human), abs=1e-12)
    assert result["observed_agreement"] == pytest.approx(0.6)
    # hand: marginals judge A5 B3 tie2, human A4 B4 tie2: p_e = (20 + 12 + 4) / 100
    assert result["expected_agreement"] == pytest.approx(0.36)
    assert result.score == pytest.approx((0.6 - 0.36) / (1 - 0.36))


def test_kappa_bad_input():
    with pytest.raises(MetricError, match="rater_a labelled 2 items but rater_b 3"):
        cohen_kappa(["A", "B"], ["A", "B", "A"])
    with pytest.raises(MetricError, match="undefined when chance agreement is 1"):
        cohen_kappa(["A", "A"], ["A", "A"])
    with pytest.raises(MetricError, match="label\\(s\\) 'C' are not in labels"):
        cohen_kappa(["A", "C"], ["A", "B"], labels=["A", "B"])
    with pytest.raises(MetricError, match="weights 'cubic' is unknown"):
        cohen_kappa(["A"], ["B"], weights="cubic")
