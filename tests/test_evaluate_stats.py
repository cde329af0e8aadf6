"""A/B statistics against scipy and the textbook formulas."""

import math

import numpy as np
import pytest
from scipy import stats

from genforge.evaluate import (
    MetricError,
    bootstrap_ci,
    bootstrap_difference_ci,
    power_two_proportions,
    sample_size_two_proportions,
    two_proportion_ztest,
    welch_t_test,
)

# Standard normal quantiles as printed in tables, for the textbook checks.
Z_975, Z_95, Z_80 = 1.959964, 1.644854, 0.841621

RNG = np.random.default_rng(42)
A = RNG.normal(0.0, 1.0, 35)
B = RNG.normal(0.6, 2.5, 50)  # different spread and size: where Welch differs from Student


# --------------------------------------------------------------------------------- Welch
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_welch_equals_scipy(alternative):
    ours = welch_t_test(A, B, alternative=alternative, confidence=0.9)
    reference = stats.ttest_ind(B, A, equal_var=False, alternative=alternative)
    assert ours.statistic == pytest.approx(reference.statistic, rel=1e-12)
    assert ours.p_value == pytest.approx(reference.pvalue, rel=1e-10)
    assert ours.details["df"] == pytest.approx(reference.df, rel=1e-12)
    low, high = reference.confidence_interval(confidence_level=0.9)
    assert ours.confidence_interval == pytest.approx((low, high), rel=1e-10)
    assert ours.effect == pytest.approx(B.mean() - A.mean())


def test_welch_bad_input():
    with pytest.raises(MetricError, match="a needs at least 2 values, got 1"):
        welch_t_test([1.0], [1.0, 2.0])
    with pytest.raises(MetricError, match="both samples are constant"):
        welch_t_test([1.0, 1.0], [2.0, 2.0])
    with pytest.raises(MetricError, match="NaN or infinite"):
        welch_t_test([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(MetricError, match="alternative 'bigger' is unknown"):
        welch_t_test([1.0, 2.0], [1.0, 3.0], alternative="bigger")


# ------------------------------------------------------------------------- two proportions
def test_two_proportion_ztest_hand_computed_and_chi_square():
    result = two_proportion_ztest(45, 100, 60, 100)
    pooled = 105 / 200
    z = 0.15 / math.sqrt(pooled * (1 - pooled) * (2 / 100))
    assert result.statistic == pytest.approx(z)
    assert result.effect == pytest.approx(0.15)
    chi2, p, _, _ = stats.chi2_contingency([[45, 55], [60, 40]], correction=False)
    assert result.statistic**2 == pytest.approx(chi2)  # two-sided z-test = Pearson chi-square
    assert result.p_value == pytest.approx(p)
    wald = math.sqrt(0.45 * 0.55 / 100 + 0.6 * 0.4 / 100)
    assert result.confidence_interval == pytest.approx((0.15 - Z_975 * wald, 0.15 + Z_975 * wald), rel=1e-6)
    greater = two_proportion_ztest(45, 100, 60, 100, alternative="greater")
    assert greater.p_value == pytest.approx(p / 2)
    assert greater.confidence_interval[1] == math.inf
    assert result.significant(0.05) and not result.significant(0.01)


def test_two_proportion_ztest_edge_and_bad_input():
    same = two_proportion_ztest(0, 50, 0, 80)
    assert same.statistic == 0.0 and same.p_value == 1.0 and "same outcome" in same.settings["note"]
    with pytest.raises(MetricError, match="successes exceed trials"):
        two_proportion_ztest(11, 10, 3, 10)
    with pytest.raises(MetricError, match="each arm needs at least one trial"):
        two_proportion_ztest(0, 0, 3, 10)
    with pytest.raises(MetricError, match="n_b must be a non-negative integer"):
        two_proportion_ztest(1, 10, 3, 10.0)


# ------------------------------------------------------------------------------- bootstrap
def test_bootstrap_matches_scipy_percentile():
    ours = bootstrap_ci(A, np.mean, rounds=20_000, seed=3)
    reference = stats.bootstrap(
        (A,), np.mean, method="percentile", n_resamples=20_000, rng=np.random.default_rng(11)
    ).confidence_interval
    width = reference.high - reference.low
    assert ours.low == pytest.approx(reference.low, abs=0.03 * width)
    assert ours.high == pytest.approx(reference.high, abs=0.03 * width)
    assert ours.estimate == pytest.approx(A.mean())
    assert ours.settings["method"] == "percentile" and ours.settings["seed"] == 3


def test_bootstrap_is_seeded_and_loops_give_the_same_draws():
    vectorized = bootstrap_ci(A, np.median, rounds=500, seed=9)
    looped = bootstrap_ci(A, np.median, rounds=500, seed=9, vectorized=False)
    assert (vectorized.low, vectorized.high) == pytest.approx((looped.low, looped.high), abs=1e-12)
    other_seed = bootstrap_ci(A, np.median, rounds=500, seed=10)
    assert (other_seed.low, other_seed.high) != (vectorized.low, vectorized.high)
    # a statistic without an axis argument runs in a loop
    custom = bootstrap_ci(A, lambda x: float(np.percentile(x, 90)), rounds=300)
    assert custom.low < custom.estimate < custom.high


def test_bootstrap_difference_matches_scipy():
    ours = bootstrap_difference_ci(A, B, rounds=20_000, seed=1)
    reference = stats.bootstrap(
        (A, B),
        lambda a, b, axis: np.mean(b, axis=axis) - np.mean(a, axis=axis),
        method="percentile",
        n_resamples=20_000,
        rng=np.random.default_rng(5),
    ).confidence_interval
    width = reference.high - reference.low
    assert ours.low == pytest.approx(reference.low, abs=0.03 * width)
    assert ours.high == pytest.approx(reference.high, abs=0.03 * width)
    assert ours.estimate == pytest.approx(B.mean() - A.mean())


def test_bootstrap_bad_input():
    with pytest.raises(MetricError, match="rounds must be an integer >= 100"):
        bootstrap_ci(A, rounds=10)
    with pytest.raises(MetricError, match="confidence must lie strictly between 0 and 1"):
        bootstrap_ci(A, confidence=95)
    with pytest.raises(MetricError, match="sample must be one-dimensional"):
        bootstrap_ci(np.ones((3, 3)))


# ----------------------------------------------------------------------------- sample size
def test_sample_size_textbook_examples():
    # 50% -> 60%, alpha 0.05 two-sided, power 0.8: the pooled formula gives 387.3 -> 388 per
    # arm, the unpooled one 384.6 -> 385.
    pooled = sample_size_two_proportions(0.5, 0.6)
    expected = (Z_975 * math.sqrt(2 * 0.55 * 0.45) + Z_80 * math.sqrt(0.25 + 0.24)) ** 2 / 0.1**2
    assert pooled.settings["unrounded"] == pytest.approx(expected, rel=1e-5)
    assert pooled.n_per_arm == 388 and pooled.total == 776
    assert sample_size_two_proportions(0.5, 0.6, pooled=False).n_per_arm == 385
    # Response rates 65% vs 85% with the unpooled two-sample formula for equality of Chow, Shao
    # & Wang ("Sample Size Calculations in Clinical Research"),
    # (z_{a/2} + z_b)^2 (p1 q1 + p2 q2) / delta^2: 69.7 -> 70 per arm.
    unpooled = sample_size_two_proportions(0.65, 0.85, pooled=False)
    assert unpooled.settings["unrounded"] == pytest.approx(
        (Z_975 + Z_80) ** 2 * (0.65 * 0.35 + 0.85 * 0.15) / 0.04, rel=1e-5
    )
    assert unpooled.n_per_arm == 70
    one_sided = sample_size_two_proportions(0.5, 0.6, alternative="greater")
    assert one_sided.settings["unrounded"] == pytest.approx(
        (Z_95 * math.sqrt(2 * 0.55 * 0.45) + Z_80 * math.sqrt(0.49)) ** 2 / 0.01, rel=1e-5
    )
    assert one_sided.n_per_arm < pooled.n_per_arm


def test_power_is_the_inverse_of_sample_size():
    for p_a, p_b, power in [(0.5, 0.6, 0.8), (0.1, 0.15, 0.9), (0.65, 0.85, 0.8)]:
        n = sample_size_two_proportions(p_a, p_b, power=power).n_per_arm
        assert power_two_proportions(p_a, p_b, n) >= power > power_two_proportions(p_a, p_b, n - 1)


def test_sample_size_bad_input():
    with pytest.raises(MetricError, match="p_a and p_b are equal"):
        sample_size_two_proportions(0.3, 0.3)
    with pytest.raises(MetricError, match="power must lie strictly between 0 and 1"):
        sample_size_two_proportions(0.3, 0.4, power=80)
    with pytest.raises(MetricError, match="alternative='greater' tests p_b > p_a, but p_b=0.3"):
        sample_size_two_proportions(0.4, 0.3, alternative="greater")
