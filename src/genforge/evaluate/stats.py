"""Statistics for comparing two systems (A/B tests): is B's score different from A's, by how
much, and how many samples are needed to tell.

- Two-proportion z-test: are two success rates (pass rates, win rates, accuracies on
  different items) different? Pooled standard error under the null, normal approximation.
- Welch's t-test (Welch 1947): are two means different, without assuming equal variances,
  with the Welch-Satterthwaite degrees of freedom.
- Bootstrap percentile confidence intervals (Efron 1979; Efron & Tibshirani 1993) for any
  statistic of one sample, or for the difference of a statistic between two samples.
- Sample size for a two-proportion test at a given significance level, power and pair of
  rates (Fleiss, Levin & Paik 2003, pooled-variance formula), and the power of a given size.

Every effect is B minus A (the new system minus the baseline), so positive means B is higher,
and `alternative="greater"` tests whether B is higher. The distributions come from scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import MetricError

ALTERNATIVES = ("two-sided", "greater", "less")


@dataclass(frozen=True)
class HypothesisTestResult:
    """A test of B against A: the statistic, its p-value, the effect (B - A) and a confidence
    interval for the effect (one-sided, with an infinite end, for one-sided alternatives)."""

    name: str
    statistic: float
    p_value: float
    effect: float
    confidence_interval: tuple[float, float]
    details: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether p < alpha."""
        return self.p_value < alpha


@dataclass(frozen=True)
class ConfidenceInterval:
    """A bootstrap interval: the statistic on the data, and the (low, high) bounds."""

    estimate: float
    low: float
    high: float
    confidence: float
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleSize:
    """Samples needed per arm (and in all) for a two-proportion test."""

    n_per_arm: int
    total: int
    settings: dict[str, Any] = field(default_factory=dict)


def _check_alternative(alternative: str, where: str) -> None:
    if alternative not in ALTERNATIVES:
        raise MetricError(
            f"{where}: alternative {alternative!r} is unknown; accepted: {', '.join(ALTERNATIVES)} "
            "(greater: B is higher than A)"
        )


def _check_level(value: float, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise MetricError(f"{where}: {name} must lie strictly between 0 and 1, got {value!r}")


def _normal_test(
    effect: float, null_se: float, interval_se: float, alternative: str, confidence: float
) -> tuple[float, float, tuple[float, float]]:
    """(z, p-value, interval) for an effect whose standard error is `null_se` under the null
    and `interval_se` around the estimate."""
    from scipy.stats import norm

    z = effect / null_se
    p = {"two-sided": 2 * norm.sf(abs(z)), "greater": norm.sf(z), "less": norm.cdf(z)}[alternative]
    return z, float(p), _interval(effect, interval_se, alternative, confidence, norm.ppf)


def _interval(
    effect: float, se: float, alternative: str, confidence: float, quantile: Callable[[float], float]
) -> tuple[float, float]:
    if alternative == "two-sided":
        half = quantile(0.5 + confidence / 2) * se
        return float(effect - half), float(effect + half)
    margin = quantile(confidence) * se
    return (float(effect - margin), math.inf) if alternative == "greater" else (-math.inf, float(effect + margin))


# -------------------------------------------------------------------------------- proportions
def two_proportion_ztest(
    successes_a: int,
    n_a: int,
    successes_b: int,
    n_b: int,
    *,
    alternative: str = "two-sided",
    confidence: float = 0.95,
) -> HypothesisTestResult:
    """Two-proportion z-test of rate B = successes_b / n_b against rate A.

    z = (p_b - p_a) / sqrt(p (1 - p) (1/n_a + 1/n_b)), p the pooled rate, which is the
    standard error when the null (equal rates) holds; two-sided, z^2 is Pearson's chi-square
    on the 2x2 table without continuity correction. The interval for p_b - p_a is the Wald
    interval (unpooled standard error), which is too narrow for small samples or rates near
    0 or 1. The normal approximation wants roughly 10 successes and 10 failures per arm.
    When every trial in both arms has the same outcome, the rates are identical and
    z = 0, p = 1.
    """
    where = "two_proportion_ztest"
    for name, value in (("successes_a", successes_a), ("n_a", n_a), ("successes_b", successes_b), ("n_b", n_b)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise MetricError(f"{where}: {name} must be a non-negative integer count, got {value!r}")
    if n_a == 0 or n_b == 0:
        raise MetricError(f"{where}: each arm needs at least one trial, got n_a={n_a}, n_b={n_b}")
    if successes_a > n_a or successes_b > n_b:
        raise MetricError(f"{where}: successes exceed trials (A: {successes_a}/{n_a}, B: {successes_b}/{n_b})")
    _check_alternative(alternative, where)
    _check_level(confidence, "confidence", where)
    p_a, p_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    null_se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    wald_se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    effect = p_b - p_a
    settings = {
        "alternative": alternative,
        "confidence": confidence,
        "null_standard_error": "pooled",
        "interval": "wald (unpooled)",
        "effect": "p_b - p_a",
    }
    details = {"p_a": p_a, "p_b": p_b, "pooled": pooled, "n_a": n_a, "n_b": n_b}
    if null_se == 0:  # all successes or all failures in both arms
        note = "every trial had the same outcome: no evidence of a difference"
        return HypothesisTestResult(
            "two_proportion_ztest", 0.0, 1.0, effect, (effect, effect), details, settings | {"note": note}
        )
    z, p, interval = _normal_test(effect, null_se, wald_se, alternative, confidence)
    return HypothesisTestResult("two_proportion_ztest", float(z), p, effect, interval, details, settings)


# ------------------------------------------------------------------------------------- means
def _sample(values: Sequence[float], name: str, where: str, minimum: int) -> np.ndarray:
    if isinstance(values, (str, bytes)):
        raise MetricError(f"{where}: {name} must be a list of numbers, got a string")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise MetricError(f"{where}: {name} must be a list of numbers: {err}") from err
    if array.ndim != 1:
        raise MetricError(f"{where}: {name} must be one-dimensional, got shape {array.shape}")
    if array.size < minimum:
        raise MetricError(f"{where}: {name} needs at least {minimum} values, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise MetricError(f"{where}: {name} contains NaN or infinite values; drop or fix them first")
    return array


def welch_t_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    alternative: str = "two-sided",
    confidence: float = 0.95,
) -> HypothesisTestResult:
    """Welch's unequal-variance t-test of mean(b) against mean(a) (Welch 1947).

    t = (mean_b - mean_a) / sqrt(s_a^2 / n_a + s_b^2 / n_b) with sample variances (ddof 1),
    and Welch-Satterthwaite degrees of freedom
    (s_a^2/n_a + s_b^2/n_b)^2 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)).
    Equals `scipy.stats.ttest_ind(b, a, equal_var=False)` (note the order: B first gives
    B - A). For per-item scores of two systems on the same items, a paired test (on the
    differences) is more powerful than this one.
    """
    where = "welch_t_test"
    xa, xb = _sample(a, "a", where, 2), _sample(b, "b", where, 2)
    _check_alternative(alternative, where)
    _check_level(confidence, "confidence", where)
    from scipy.stats import t as student_t

    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    se = math.sqrt(va + vb)
    if se == 0:
        raise MetricError(f"{where}: both samples are constant (zero variance); the t statistic is undefined")
    effect = float(xb.mean() - xa.mean())
    df = (va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))
    t = effect / se
    distribution = student_t(df)
    p = {"two-sided": 2 * distribution.sf(abs(t)), "greater": distribution.sf(t), "less": distribution.cdf(t)}
    interval = _interval(effect, se, alternative, confidence, distribution.ppf)
    details = {
        "mean_a": float(xa.mean()),
        "mean_b": float(xb.mean()),
        "df": float(df),
        "standard_error": se,
        "n_a": xa.size,
        "n_b": xb.size,
    }
    settings = {
        "alternative": alternative,
        "confidence": confidence,
        "variances": "unequal (welch)",
        "effect": "mean_b - mean_a",
    }
    return HypothesisTestResult("welch_t_test", float(t), float(p[alternative]), effect, interval, details, settings)


# ---------------------------------------------------------------------------------- bootstrap
_BATCH_VALUES = 1 << 22  # resampled values held at once (32 MiB of float64)


def _bootstrap_distribution(
    samples: list[np.ndarray], statistic: Callable, rounds: int, rng: np.random.Generator, vectorized: bool
) -> np.ndarray:
    """The statistic over `rounds` resamples, each sample resampled independently with
    replacement; done in batches so that memory stays bounded for large samples."""
    batch = max(1, _BATCH_VALUES // max(s.size for s in samples))
    out = []
    for start in range(0, rounds, batch):
        size = min(batch, rounds - start)
        drawn = [s[rng.integers(0, s.size, size=(size, s.size))] for s in samples]
        if vectorized:
            out.append(np.asarray(statistic(*drawn, axis=-1), dtype=np.float64).reshape(size))
        else:
            out.append(np.array([statistic(*(d[i] for d in drawn)) for i in range(size)], dtype=np.float64))
    return np.concatenate(out)


def _is_vectorized(statistic: Callable, samples: list[np.ndarray]) -> bool:
    """Whether `statistic(*samples, axis=-1)` works on a stack of resamples (np.mean does)."""
    try:
        value = statistic(*(s[None, :2] for s in samples), axis=-1)
    except TypeError:
        return False
    return np.shape(value) == (1,)


def _bootstrap(
    samples: list[np.ndarray],
    statistic: Callable,
    confidence: float,
    rounds: int,
    seed: int,
    vectorized: bool | None,
    where: str,
    estimate: float,
) -> ConfidenceInterval:
    _check_level(confidence, "confidence", where)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 100:
        raise MetricError(
            f"{where}: rounds must be an integer >= 100 (percentile ends need many resamples; "
            f"10,000 is usual), got {rounds!r}"
        )
    if vectorized is None:
        vectorized = _is_vectorized(statistic, samples)
    rng = np.random.default_rng(seed)
    distribution = _bootstrap_distribution(samples, statistic, rounds, rng, vectorized)
    if not np.all(np.isfinite(distribution)):
        raise MetricError(f"{where}: the statistic gave NaN or infinite values on some resamples")
    low, high = np.percentile(distribution, [50 * (1 - confidence), 50 * (1 + confidence)])
    settings = {
        "method": "percentile",
        "rounds": rounds,
        "seed": seed,
        "resampling": "each sample independently",
        "statistic": getattr(statistic, "__name__", "custom"),
        "standard_error": float(distribution.std(ddof=1)),
    }
    return ConfidenceInterval(float(estimate), float(low), float(high), confidence, settings)


def bootstrap_ci(
    sample: Sequence[float],
    statistic: Callable[..., float] = np.mean,
    *,
    confidence: float = 0.95,
    rounds: int = 10_000,
    seed: int = 0,
    vectorized: bool | None = None,
) -> ConfidenceInterval:
    """Bootstrap percentile interval for `statistic(sample)` (Efron 1979).

    Draw `rounds` resamples of the same size with replacement, compute the statistic on each,
    and take the (1 - confidence)/2 and (1 + confidence)/2 percentiles. `seed` makes it
    reproducible. statistic: any function of a 1-D array; when it takes `axis` (np.mean,
    np.median) all resamples of a batch are computed at once (`vectorized`, detected unless
    given). Percentile intervals can undercover for small samples or skewed statistics.
    """
    where = "bootstrap_ci"
    x = _sample(sample, "sample", where, 2)
    return _bootstrap([x], statistic, confidence, rounds, seed, vectorized, where, statistic(x))


def bootstrap_difference_ci(
    a: Sequence[float],
    b: Sequence[float],
    statistic: Callable[..., float] = np.mean,
    *,
    confidence: float = 0.95,
    rounds: int = 10_000,
    seed: int = 0,
) -> ConfidenceInterval:
    """Bootstrap percentile interval for statistic(b) - statistic(a), resampling the two
    samples independently (for two systems scored on different items). For two systems on
    the same items, bootstrap the per-item differences with `bootstrap_ci` instead."""
    where = "bootstrap_difference_ci"
    xa, xb = _sample(a, "a", where, 2), _sample(b, "b", where, 2)

    def difference(sample_a, sample_b, axis=None):
        if axis is None:
            return statistic(sample_b) - statistic(sample_a)
        return statistic(sample_b, axis=axis) - statistic(sample_a, axis=axis)

    name = getattr(statistic, "__name__", "statistic")
    difference.__name__ = f"{name}(b) - {name}(a)"
    vectorized = _is_vectorized(statistic, [xa])
    return _bootstrap([xa, xb], difference, confidence, rounds, seed, vectorized, where, difference(xa, xb))


# -------------------------------------------------------------------------------- sample size
def _check_rates(p_a: float, p_b: float, alternative: str, where: str) -> None:
    for name, value in (("p_a", p_a), ("p_b", p_b)):
        _check_level(value, name, where)
    if p_a == p_b:
        raise MetricError(f"{where}: p_a and p_b are equal ({p_a}); give the smallest difference worth detecting")
    _check_alternative(alternative, where)
    if (alternative == "greater" and p_b < p_a) or (alternative == "less" and p_b > p_a):
        raise MetricError(
            f"{where}: alternative={alternative!r} tests p_b {'>' if alternative == 'greater' else '<'} "
            f"p_a, but p_b={p_b} is on the other side of p_a={p_a}; swap them or use 'two-sided'"
        )


def _z_alpha(alpha: float, alternative: str) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / 2 if alternative == "two-sided" else 1 - alpha))


def sample_size_two_proportions(
    p_a: float,
    p_b: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    alternative: str = "two-sided",
    pooled: bool = True,
) -> SampleSize:
    """Samples per arm for a two-proportion z-test to detect rates p_a vs p_b.

    With pooled=True (default, the formula for the pooled z-test above; Fleiss, Levin &
    Paik 2003, without continuity correction):
        n = (z_a sqrt(2 pbar (1 - pbar)) + z_b sqrt(p_a (1 - p_a) + p_b (1 - p_b)))^2 / (p_a - p_b)^2,
    pbar = (p_a + p_b) / 2, z_a = z_{1-alpha/2} (two-sided) or z_{1-alpha}, z_b = z_{power}.
    pooled=False uses the unpooled variance for both terms:
        n = (z_a + z_b)^2 (p_a (1 - p_a) + p_b (1 - p_b)) / (p_a - p_b)^2.
    n is rounded up. A one-sided alternative needs fewer samples, but only detects a change in
    the direction chosen in advance.
    """
    where = "sample_size_two_proportions"
    _check_rates(p_a, p_b, alternative, where)
    _check_level(alpha, "alpha", where)
    _check_level(power, "power", where)
    from scipy.stats import norm

    z_a, z_b = _z_alpha(alpha, alternative), float(norm.ppf(power))
    spread = p_a * (1 - p_a) + p_b * (1 - p_b)
    if pooled:
        mean = (p_a + p_b) / 2
        root_n = z_a * math.sqrt(2 * mean * (1 - mean)) + z_b * math.sqrt(spread)
    else:
        root_n = (z_a + z_b) * math.sqrt(spread)
    exact = root_n**2 / (p_a - p_b) ** 2
    # Round up, but not past an integer that floating-point error nudged just above.
    n = math.ceil(exact - 1e-9)
    settings = {
        "p_a": p_a,
        "p_b": p_b,
        "alpha": alpha,
        "power": power,
        "alternative": alternative,
        "variance": "pooled under the null" if pooled else "unpooled",
        "continuity_correction": False,
        "unrounded": exact,
    }
    return SampleSize(n, 2 * n, settings)


def power_two_proportions(
    p_a: float,
    p_b: float,
    n_per_arm: int,
    *,
    alpha: float = 0.05,
    alternative: str = "two-sided",
    pooled: bool = True,
) -> float:
    """Power of the two-proportion z-test with `n_per_arm` samples per arm when the true rates
    are p_a and p_b: the inverse of `sample_size_two_proportions` (same formulas; for
    two-sided tests the far tail, which adds almost nothing, is ignored)."""
    where = "power_two_proportions"
    _check_rates(p_a, p_b, alternative, where)
    _check_level(alpha, "alpha", where)
    if isinstance(n_per_arm, bool) or not isinstance(n_per_arm, (int, np.integer)) or n_per_arm < 1:
        raise MetricError(f"{where}: n_per_arm must be a positive integer, got {n_per_arm!r}")
    from scipy.stats import norm

    spread = p_a * (1 - p_a) + p_b * (1 - p_b)
    mean = (p_a + p_b) / 2
    null_sd = math.sqrt(2 * mean * (1 - mean)) if pooled else math.sqrt(spread)
    z_b = (abs(p_a - p_b) * math.sqrt(n_per_arm) - _z_alpha(alpha, alternative) * null_sd) / math.sqrt(spread)
    return float(norm.cdf(z_b))


__all__ = [
    "ALTERNATIVES",
    "ConfidenceInterval",
    "HypothesisTestResult",
    "SampleSize",
    "bootstrap_ci",
    "bootstrap_difference_ci",
    "power_two_proportions",
    "sample_size_two_proportions",
    "two_proportion_ztest",
    "welch_t_test",
]
