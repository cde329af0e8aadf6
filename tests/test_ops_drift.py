"""Drift detection (`genforge.ops.drift`) on synthetic shifts: each planted shift is found at
alpha 0.05 with the power measured over repetitions, and with no shift each test's false-alarm
rate over 200 seeded null repetitions lies within a binomial tolerance of alpha. The MMD
estimate is checked against its definition computed term by term, and the per-feature tests
against scipy on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, ks_2samp

from genforge.ops.drift import (
    DriftError,
    chi_square_test,
    compare_windows,
    dominant_script,
    holm_adjust,
    is_refusal,
    ks_test,
    mmd_permutation_test,
    mmd_squared,
    prompt_features,
    psi,
    psi_test,
    rate_test,
)

ALPHA = 0.05
NULL_REPETITIONS = 200

TOPICS = {
    "code": "python function list dict loop error import class method variable string return value".split(),
    "cooking": "recipe oven flour sugar butter bake minutes salt pepper onion garlic simmer".split(),
}
CYRILLIC = "как сделать список словарь функция ошибка импорт класс метод строка значение".split()
FILLER = "how do I make the a with in for my please what is why".split()


def _prompts(rng, n, topic="code", words=(6, 14), cyrillic_share=0.0):
    out = []
    for _ in range(n):
        length = int(rng.integers(*words))
        bank = CYRILLIC if rng.random() < cyrillic_share else TOPICS[topic] + FILLER
        out.append(" ".join(rng.choice(bank, size=length)) + "?")
    return out


def _hashed_bag_of_words(texts, dimension=32):
    """A cheap deterministic embedder for tests: a normalised bag of words hashed into buckets."""
    import zlib

    vectors = np.zeros((len(texts), dimension))
    for row, text in enumerate(texts):
        for word in text.lower().split():
            vectors[row, zlib.crc32(word.encode()) % dimension] += 1
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


# ------------------------------------------------------------------------------- definitions
def test_mmd_matches_its_definition_term_by_term():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1, size=(5, 3))
    value, sigma = mmd_squared(x, y)
    pooled = np.concatenate([x, y])
    distances = [np.linalg.norm(a - b) for i, a in enumerate(pooled) for b in pooled[i + 1 :]]
    assert sigma == pytest.approx(np.median(distances))

    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    assert value == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_ks_and_psi_agree_with_their_formulas():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(0.3, 1, size=200)
    result = ks_test(a, b, feature="x")
    reference = ks_2samp(b, a)
    assert result.statistic == pytest.approx(reference.statistic) and result.p_value == pytest.approx(reference.pvalue)
    edges = np.quantile(a, np.linspace(0, 1, 11)[1:-1])
    r = np.bincount(np.searchsorted(edges, a), minlength=10) / a.size
    c = np.bincount(np.searchsorted(edges, b), minlength=10) / b.size
    assert psi(a, b) == pytest.approx(np.sum((c - r) * np.log(c / r)))
    assert psi(a, a) == pytest.approx(0.0, abs=1e-12)
    assert psi_test(a, rng.normal(2, 1, size=200)).details["level"] == "major"


def test_holm_adjustment_and_bad_input():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    with pytest.raises(DriftError, match="at least 2"):
        ks_test([1.0], [1.0, 2.0])
    with pytest.raises(DriftError, match="NaN"):
        ks_test([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(DriftError, match="permutations"):
        mmd_permutation_test(np.ones((3, 2)), np.ones((3, 2)), permutations=5)
    with pytest.raises(DriftError, match="dimension"):
        mmd_permutation_test(np.ones((3, 2)), np.ones((3, 4)))
    with pytest.raises(DriftError, match="alpha"):
        compare_windows([{"prompt": "a"}] * 3, [{"prompt": "b"}] * 3, alpha=5)


def test_script_refusal_and_leave_one_out_word_statistics():
    assert dominant_script("Hello there") == "LATIN" and dominant_script("Привет мир") == "CYRILLIC"
    assert dominant_script("你好世界 ok") == "HAN" and dominant_script("1234 ?") == "none"
    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("I cannot do this")
    assert not is_refusal("Sure! Here is the function you asked for.")
    reference, current = prompt_features(["a b", "b c", "c d"], ["a z"])
    # "a" and "d" appear in one reference prompt only: rare within the reference (left out).
    assert reference["prompt_rare_word_rate"] == [0.5, 0.0, 0.5]
    assert current["prompt_rare_word_rate"] == [0.5]  # "z" unseen, "a" seen


# ----------------------------------------------------------------------------- false alarms
def _within_nominal(alarms: int, two_sided: bool = True) -> bool:
    """A false-alarm count over NULL_REPETITIONS that is consistent with rate alpha (two-sided
    binomial test at 0.01), or for conservative tests (ties) not above it."""
    alternative = "two-sided" if two_sided else "greater"
    return binomtest(alarms, NULL_REPETITIONS, ALPHA, alternative=alternative).pvalue > 0.01


@pytest.mark.slow
def test_false_alarm_rates_are_near_alpha_without_drift():
    rng = np.random.default_rng(2026)
    alarms = {"ks": 0, "psi": 0, "chi2": 0, "two_proportion": 0, "mmd": 0}
    for rep in range(NULL_REPETITIONS):
        a, b = rng.normal(size=120), rng.normal(size=80)
        alarms["ks"] += ks_test(a, b).alert
        alarms["psi"] += psi_test(a, b, permutations=99, seed=rep).alert
        scripts = ["LATIN", "CYRILLIC", "HAN"]
        alarms["chi2"] += chi_square_test(
            rng.choice(scripts, 120, p=[0.7, 0.2, 0.1]).tolist(), rng.choice(scripts, 80, p=[0.7, 0.2, 0.1]).tolist()
        ).alert
        alarms["two_proportion"] += rate_test(rng.random(120) < 0.2, rng.random(80) < 0.2).alert
        x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
        alarms["mmd"] += mmd_permutation_test(x, y, permutations=99, seed=rep).alert
    print({k: v / NULL_REPETITIONS for k, v in alarms.items()})
    for test, count in alarms.items():
        assert _within_nominal(count), (test, count / NULL_REPETITIONS)


@pytest.mark.slow
def test_full_comparison_on_prompts_keeps_its_family_false_alarm_rate():
    """No drift in generated prompts and replies: the Holm-corrected verdict raises at most
    about alpha of the time (word-count features have ties, so their KS is conservative)."""
    rng = np.random.default_rng(7)
    alarms = 0
    for rep in range(NULL_REPETITIONS // 4):

        def window(n):
            prompts = _prompts(rng, n)
            return [
                {
                    "prompt": p,
                    "reply": "I'm sorry, no." if rng.random() < 0.1 else "Sure: " + p,
                    "completion_tokens": int(rng.integers(5, 50)),
                }
                for p in prompts
            ]

        alarms += compare_windows(window(60), window(60), seed=rep, permutations=99).drifted
    assert binomtest(alarms, NULL_REPETITIONS // 4, ALPHA, alternative="greater").pvalue > 0.01, alarms


# -------------------------------------------------------------------------------------- power
@pytest.mark.slow
def test_planted_shifts_are_detected_with_measured_power():
    rng = np.random.default_rng(11)
    repetitions = 40
    found = {"length": 0, "script": 0, "topic_mmd": 0, "refusals": 0}
    for rep in range(repetitions):
        reference = _prompts(rng, 80)
        longer = compare_windows(
            [{"prompt": p} for p in reference],
            [{"prompt": p} for p in _prompts(rng, 80, words=(10, 20))],
            permutations=99,
        )
        found["length"] += longer.test("prompt_words", "ks").alert
        russian = compare_windows(
            [{"prompt": p} for p in reference],
            [{"prompt": p} for p in _prompts(rng, 80, cyrillic_share=0.2)],
            permutations=99,
        )
        found["script"] += russian.test("prompt_script", "chi2").alert
        topic = mmd_permutation_test(
            _hashed_bag_of_words(reference[:40]),
            _hashed_bag_of_words(_prompts(rng, 40, topic="cooking")),
            permutations=99,
            seed=rep,
        )
        found["topic_mmd"] += topic.alert
        found["refusals"] += rate_test(rng.random(200) < 0.05, rng.random(200) < 0.15).alert
    power = {k: v / repetitions for k, v in found.items()}
    print("power at alpha 0.05:", power)
    assert power["length"] >= 0.95 and power["script"] >= 0.9 and power["topic_mmd"] >= 0.95
    assert power["refusals"] >= 0.6  # 5% -> 15% with 200 per window: about 0.85 by the normal approximation
