"""Drift detection: has the traffic a model sees (its prompts) or what it answers (its replies)
moved away from a reference window?

Two-sample tests, each asking whether a current window and a reference window come from one
distribution:

- **Kernel two-sample test on embeddings** (Gretton, Borgwardt, Rasch, Schölkopf & Smola
  2012, *A Kernel Two-Sample Test*, JMLR 13): the unbiased estimate of the squared maximum mean
  discrepancy, MMD²_u (their eq. 3), with a Gaussian RBF kernel whose width is the median
  distance between the pooled points (their "median heuristic"), and a permutation test for
  its p-value (the windows' labels shuffled; p = (1 + #{permuted >= observed}) / (1 + B),
  which is exactly level alpha under the null).
- **Two-sample Kolmogorov-Smirnov** (scipy's `ks_2samp`) for each numeric feature: prompt
  length in characters and words, token statistics, reply length, judge scores. On integer
  features with many ties KS is conservative: fewer false alarms than alpha, not more.
- **Population stability index** (PSI = sum over bins of (c - r) ln(c / r), bins the
  reference's deciles), the credit-scoring industry's drift score (Siddiqi 2006, *Credit Risk
  Scorecards*): below 0.1 stable, 0.1-0.25 moderate, above 0.25 a major shift. Small windows
  inflate PSI itself (its null mean is about (bins - 1)(1/m + 1/n); Yurdakul 2018, *Statistical
  Properties of Population Stability Index*), so its p-value comes from a permutation test.
- **Chi-square test of homogeneity** (scipy's `chi2_contingency`) for categorical features
  (the prompts' dominant script, a cheap language signal), and the **two-proportion z-test**
  of `genforge.evaluate.stats` for rates (refusals, guard hits).

Features (`prompt_features`, `reply_features`) are computed per record from a record's
``prompt`` and ``reply`` text and the numbers a server's outcome log holds
(``completion_tokens``, ``guard_hit``, ``judge_score`` / feedback ``score``).
`compare_windows` runs every test that the records allow and gives a `DriftReport`, whose
overall verdict controls the family-wise false-alarm rate over all tests with Holm's
step-down procedure (Holm 1979) over one test per feature (PSI, a second look at a numeric
feature, is reported beside its KS test with its level, outside the family). Permutation
p-values are at least 1/(1 + permutations), so the default 1,000 permutations let a test
survive Holm's correction over up to ~50 tests at alpha 0.05.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DriftTest",
    "DriftReport",
    "DriftError",
    "mmd_squared",
    "mmd_permutation_test",
    "ks_test",
    "psi",
    "psi_test",
    "chi_square_test",
    "rate_test",
    "dominant_script",
    "is_refusal",
    "prompt_features",
    "reply_features",
    "compare_windows",
    "holm_adjust",
    "PSI_MODERATE",
    "PSI_MAJOR",
]

PSI_MODERATE, PSI_MAJOR = 0.1, 0.25
_WORD = re.compile(r"\w+", re.UNICODE)
# Openings of a declined request, in the phrasings chat models use; a reply is a refusal when
# one occurs in its first 200 characters (a refusal comes first, not as an aside).
_REFUSAL = re.compile(
    r"\b(I\s+can(?:no|['’])t|I\s+cannot|I['’]m\s+(?:sorry|unable|not able)|I\s+am\s+(?:sorry|unable|not able)|"
    r"I\s+won['’]t|I\s+will\s+not|as\s+an\s+AI\b|I\s+must\s+decline|I\s+apologi[sz]e)",
    re.IGNORECASE,
)


class DriftError(ValueError):
    """Bad input to a drift test: the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class DriftTest:
    """One test of one feature: current window against reference window."""

    feature: str
    test: str  # mmd, ks, psi, chi2, two_proportion
    statistic: float
    p_value: float
    alpha: float
    n_reference: int
    n_current: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def alert(self) -> bool:
        """Drift at level alpha for this test alone (see `DriftReport.alerts` for the family)."""
        return self.p_value < self.alpha

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "test": self.test,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "alert": self.alert,
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            **({"details": self.details} if self.details else {}),
        }


@dataclass
class DriftReport:
    """Every test run on two windows, the features they ran on, and the family verdict."""

    tests: list[DriftTest]
    alpha: float
    reference_features: dict[str, list]
    current_features: dict[str, list]
    skipped: dict[str, str] = field(default_factory=dict)  # feature -> why it was not tested

    @property
    def adjusted_p_values(self) -> list[float | None]:
        """Holm-adjusted p-values, in the order of `tests`, over the family of one test per
        feature (KS, chi-square, rate, MMD); PSI, which asks KS's question again, is left out
        of the family (None) and read by its level."""
        family = [i for i, t in enumerate(self.tests) if t.test != "psi"]
        adjusted: list[float | None] = [None] * len(self.tests)
        for index, value in zip(family, holm_adjust([self.tests[i].p_value for i in family])):
            adjusted[index] = value
        return adjusted

    @property
    def alerts(self) -> list[DriftTest]:
        """The tests that show drift with the family-wise error rate held at alpha (Holm)."""
        return [t for t, p in zip(self.tests, self.adjusted_p_values) if p is not None and p < self.alpha]

    @property
    def drifted(self) -> bool:
        return bool(self.alerts)

    def test(self, feature: str, test: str) -> DriftTest:
        for candidate in self.tests:
            if candidate.feature == feature and candidate.test == test:
                return candidate
        raise KeyError(f"no {test} test of {feature!r}; run: {[(t.feature, t.test) for t in self.tests]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "drifted": self.drifted,
            "correction": "holm",
            "tests": [
                {**t.to_dict(), "p_value_holm": p, "alert_holm": p is not None and p < self.alpha}
                for t, p in zip(self.tests, self.adjusted_p_values)
            ],
            "skipped": dict(self.skipped),
        }


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): reject where adjusted p < alpha keeps the
    chance of any false alarm among all the tests at most alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise DriftError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


def _numbers(values: Sequence[float], name: str, minimum: int = 2) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise DriftError(f"{name} must be one-dimensional numbers, got shape {array.shape}")
    if array.size < minimum:
        raise DriftError(f"{name} needs at least {minimum} values, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise DriftError(f"{name} holds NaN or infinite values; drop them first")
    return array


# ---------------------------------------------------------------------------------------- MMD
def _squared_distances(points: np.ndarray) -> np.ndarray:
    norms = (points**2).sum(axis=1)
    return np.maximum(norms[:, None] + norms[None, :] - 2 * points @ points.T, 0.0)


def _median_bandwidth(squared: np.ndarray) -> float:
    upper = squared[np.triu_indices_from(squared, k=1)]
    positive = upper[upper > 0]
    return float(np.median(np.sqrt(positive))) if positive.size else 1.0


def _mmd_from_kernel(kernel: np.ndarray, memberships: np.ndarray, m: int, n: int) -> np.ndarray:
    """MMD²_u for each row of ``memberships`` (1: the point is in the first sample), from the
    pooled kernel matrix; the diagonal (k(x, x) = 1 for the RBF kernel) is left out of the
    within-sample sums, which is what makes the estimate unbiased."""
    a = memberships.astype(np.float64)
    b = 1.0 - a
    ka = a @ kernel
    kb = b @ kernel
    within_a = (ka * a).sum(axis=1) - m
    within_b = (kb * b).sum(axis=1) - n
    across = (ka * b).sum(axis=1)
    return within_a / (m * (m - 1)) + within_b / (n * (n - 1)) - 2 * across / (m * n)


def _embedding_matrix(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise DriftError(f"{name} must be a 2-D array (points x dimensions), got shape {array.shape}")
    if array.shape[0] < 2:
        raise DriftError(f"{name} needs at least 2 points, got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise DriftError(f"{name} holds NaN or infinite values")
    return array


def mmd_squared(x, y, bandwidth: float | None = None) -> tuple[float, float]:
    """(MMD²_u of samples ``x`` and ``y`` (rows are points), the RBF width used):
    k(a, b) = exp(-|a - b|² / (2 σ²)), σ the median pooled distance unless given."""
    x, y = _embedding_matrix(x, "x"), _embedding_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise DriftError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    squared = _squared_distances(np.concatenate([x, y]))
    sigma = _median_bandwidth(squared) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise DriftError(f"bandwidth must be > 0, got {bandwidth}")
    kernel = np.exp(-squared / (2 * sigma**2))
    membership = np.r_[np.ones(len(x)), np.zeros(len(y))][None, :]
    return float(_mmd_from_kernel(kernel, membership, len(x), len(y))[0]), sigma


def mmd_permutation_test(
    reference,
    current,
    *,
    permutations: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    bandwidth: float | None = None,
    feature: str = "prompt_embedding",
) -> DriftTest:
    """Kernel two-sample test (Gretton et al. 2012) of embeddings ``current`` against
    ``reference``: MMD²_u with the median-heuristic RBF kernel, p-value from ``permutations``
    shuffles of the window labels (seeded)."""
    _check_alpha(alpha)
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 19:
        raise DriftError(f"permutations must be an integer >= 19 (p-values below 0.05 need them), got {permutations!r}")
    x, y = _embedding_matrix(reference, "reference"), _embedding_matrix(current, "current")
    if x.shape[1] != y.shape[1]:
        raise DriftError(f"reference and current embeddings differ in dimension: {x.shape[1]} and {y.shape[1]}")
    m, n = len(x), len(y)
    squared = _squared_distances(np.concatenate([x, y]))
    sigma = _median_bandwidth(squared) if bandwidth is None else float(bandwidth)
    kernel = np.exp(-squared / (2 * sigma**2))
    observed_membership = np.r_[np.ones(m, dtype=bool), np.zeros(n, dtype=bool)]
    observed = _mmd_from_kernel(kernel, observed_membership[None, :], m, n)[0]
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.tile(observed_membership, (permutations, 1)), axis=1)
    null = _mmd_from_kernel(kernel, shuffled, m, n)
    p_value = (1 + int(np.sum(null >= observed - 1e-12))) / (1 + permutations)
    details = {"bandwidth": sigma, "permutations": permutations, "seed": seed, "kernel": "rbf (median heuristic)"}
    return DriftTest(feature, "mmd", float(observed), float(p_value), alpha, m, n, details)


# ------------------------------------------------------------------------- per-feature tests
def ks_test(
    reference: Sequence[float], current: Sequence[float], *, alpha: float = 0.05, feature: str = ""
) -> DriftTest:
    """Two-sample Kolmogorov-Smirnov test (scipy): the largest gap between the two empirical CDFs."""
    from scipy.stats import ks_2samp

    _check_alpha(alpha)
    a, b = (
        _numbers(reference, f"{feature or 'reference'} (reference)"),
        _numbers(current, f"{feature or 'current'} (current)"),
    )
    result = ks_2samp(b, a)
    details = {"mean_reference": float(a.mean()), "mean_current": float(b.mean())}
    return DriftTest(feature, "ks", float(result.statistic), float(result.pvalue), alpha, a.size, b.size, details)


def _psi_from_counts(reference_counts: np.ndarray, current_counts: np.ndarray, floor: float) -> float:
    r = np.maximum(reference_counts / reference_counts.sum(), floor)
    c = np.maximum(current_counts / current_counts.sum(), floor)
    return float(np.sum((c - r) * np.log(c / r)))


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10, floor: float = 1e-4) -> float:
    """Population stability index over the reference's quantile bins (ties merge bins);
    empty bins count as ``floor`` so that the logarithm stays finite."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise DriftError(f"bins must be an integer >= 2, got {bins!r}")
    return _psi_of(_numbers(reference, "reference"), _numbers(current, "current"), bins, floor)[0]


def _psi_rows(reference: np.ndarray, current: np.ndarray, bins: int, floor: float) -> np.ndarray:
    """PSI of each row pair (reference rows, current rows) over that row's reference quantile
    bins. A bin holds values <= its upper edge, so a discrete feature's mass at an edge stays
    whole; tied quantiles give bins empty in both windows, which add nothing."""
    edges = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1], axis=1).T  # (rows, bins - 1)
    offsets = np.arange(reference.shape[0])[:, None] * bins

    def shares(values: np.ndarray) -> np.ndarray:
        index = (values[:, :, None] > edges[:, None, :]).sum(axis=2) + offsets
        counts = np.bincount(index.ravel(), minlength=values.shape[0] * bins).reshape(values.shape[0], bins)
        return np.maximum(counts / values.shape[1], floor)

    r, c = shares(reference), shares(current)
    return np.sum((c - r) * np.log(c / r), axis=1)


def _psi_of(reference: np.ndarray, current: np.ndarray, bins: int, floor: float) -> tuple[float, int]:
    """(PSI, distinct bins) of two windows."""
    used = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])).size + 1
    return float(_psi_rows(reference[None, :], current[None, :], bins, floor)[0]), used


def psi_test(
    reference: Sequence[float],
    current: Sequence[float],
    *,
    bins: int = 10,
    floor: float = 1e-4,
    alpha: float = 0.05,
    permutations: int = 1000,
    seed: int = 0,
    feature: str = "",
) -> DriftTest:
    """PSI with its verdict by the industry's thresholds (``details["level"]``: stable,
    moderate, major) and a permutation p-value (the windows' labels shuffled ``permutations``
    times, seeded, bins re-cut each time). The chi-square approximation of Yurdakul (2018)
    fails on the small windows a server monitors (an empty bin's floor inflates PSI: 34% false
    alarms at alpha 0.05 with 60 prompts a window), so it is only reported, as ``null_mean``,
    PSI's expected value without drift, (bins - 1)(1/m + 1/n)."""
    _check_alpha(alpha)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise DriftError(f"bins must be an integer >= 2, got {bins!r}")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 19:
        raise DriftError(f"permutations must be an integer >= 19, got {permutations!r}")
    a, b = (
        _numbers(reference, f"{feature or 'reference'} (reference)"),
        _numbers(current, f"{feature or 'current'} (current)"),
    )
    value, used = _psi_of(a, b, bins, floor)
    pooled, m = np.concatenate([a, b]), a.size
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.tile(pooled, (permutations, 1)), axis=1)
    null = _psi_rows(shuffled[:, :m], shuffled[:, m:], bins, floor)
    p_value = (1 + int(np.sum(null >= value - 1e-12))) / (1 + permutations)
    level = "major" if value > PSI_MAJOR else "moderate" if value > PSI_MODERATE else "stable"
    details = {
        "bins": used,
        "level": level,
        "null_mean": (used - 1) * (1 / a.size + 1 / b.size),
        "permutations": permutations,
    }
    return DriftTest(feature, "psi", value, float(p_value), alpha, a.size, b.size, details)


def chi_square_test(
    reference: Sequence[str], current: Sequence[str], *, alpha: float = 0.05, feature: str = "", min_count: int = 5
) -> DriftTest:
    """Chi-square test of homogeneity of a categorical feature (scipy's `chi2_contingency`);
    categories seen fewer than ``min_count`` times in both windows together are pooled into one
    (the chi-square approximation wants expected counts of about 5). PSI over the categories is
    in ``details["psi"]``."""
    from scipy.stats import chi2_contingency

    _check_alpha(alpha)
    if len(reference) < 2 or len(current) < 2:
        raise DriftError(f"{feature}: each window needs at least 2 values, got {len(reference)} and {len(current)}")
    totals = Counter(reference) + Counter(current)
    keep = sorted(c for c, k in totals.items() if k >= min_count)
    pooled_name = "(rare)"

    def counts(values):
        seen = Counter(v if v in keep else pooled_name for v in values)
        return [seen[c] for c in [*keep, pooled_name]]

    table = np.array([counts(reference), counts(current)])
    table = table[:, table.sum(axis=0) > 0]
    details = {"categories": [*keep, pooled_name][: table.shape[1]] if table.shape[1] else []}
    if table.shape[1] < 2:  # one category in both windows: nothing moved
        return DriftTest(feature, "chi2", 0.0, 1.0, alpha, len(reference), len(current), details | {"psi": 0.0})
    statistic, p_value, _, _ = chi2_contingency(table, correction=False)
    details["psi"] = _psi_from_counts(table[0].astype(float), table[1].astype(float), 1e-4)
    details["reference_share"] = dict(zip(details["categories"], (table[0] / table[0].sum()).round(4).tolist()))
    details["current_share"] = dict(zip(details["categories"], (table[1] / table[1].sum()).round(4).tolist()))
    return DriftTest(feature, "chi2", float(statistic), float(p_value), alpha, len(reference), len(current), details)


def rate_test(
    reference: Sequence[bool], current: Sequence[bool], *, alpha: float = 0.05, feature: str = ""
) -> DriftTest:
    """Two-proportion z-test (`genforge.evaluate.stats.two_proportion_ztest`) of a rate:
    refusals, guard hits. The effect is current minus reference."""
    from ..evaluate.stats import two_proportion_ztest

    _check_alpha(alpha)
    a, b = [bool(v) for v in reference], [bool(v) for v in current]
    if not a or not b:
        raise DriftError(f"{feature}: each window needs at least one value")
    result = two_proportion_ztest(sum(a), len(a), sum(b), len(b))
    details = {"rate_reference": result.details["p_a"], "rate_current": result.details["p_b"], "effect": result.effect}
    return DriftTest(feature, "two_proportion", result.statistic, result.p_value, alpha, len(a), len(b), details)


# ----------------------------------------------------------------------------------- features
def _script_of(character: str) -> str | None:
    name = unicodedata.name(character, "")
    if not name:
        return None
    first = name.split(" ", 1)[0]
    if first == "CJK":
        return "HAN"
    if first in ("HIRAGANA", "KATAKANA"):
        return "KANA"
    return first


def dominant_script(text: str) -> str:
    """The Unicode script most of the text's letters are written in (LATIN, CYRILLIC, HAN,
    ARABIC, ...; ``none`` without letters): a cheap language signal that needs no model."""
    scripts = Counter(s for s in (_script_of(c) for c in text if c.isalpha()) if s)
    return scripts.most_common(1)[0][0] if scripts else "none"


def is_refusal(reply: str) -> bool:
    """Whether a reply opens by declining (I can't / I'm sorry / as an AI ...)."""
    return bool(_REFUSAL.search(reply[:200]))


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def prompt_features(
    reference_prompts: Sequence[str],
    current_prompts: Sequence[str],
    tokenize: Callable[[str], Sequence[int]] | None = None,
) -> tuple[dict[str, list], dict[str, list]]:
    """Per-prompt features of both windows: ``prompt_chars``, ``prompt_words``,
    ``prompt_rare_word_rate`` (share of its words that appear in no other reference prompt),
    ``prompt_mean_idf`` (mean inverse document frequency of its words in the reference),
    ``prompt_script`` (categorical) and, given a ``tokenize`` (text -> token ids),
    ``prompt_mean_token_id`` (BPE ids grow with merge order, so rarer pieces have higher ids).

    A reference prompt is measured against the *other* reference prompts (leave one out), so
    that under no drift both windows' word statistics have the same distribution."""
    documents = [set(_words(p)) for p in reference_prompts]
    document_frequency = Counter(w for words in documents for w in words)
    size = len(documents)

    def word_stats(words: list[str], own: set[str] | None) -> tuple[float, float]:
        if not words:
            return 0.0, 0.0
        others = size - (1 if own is not None else 0)
        frequencies = [document_frequency[w] - (1 if own is not None and w in own else 0) for w in words]
        rare = sum(f == 0 for f in frequencies) / len(words)
        idf = float(np.mean([math.log((others + 1) / (f + 0.5)) for f in frequencies]))
        return rare, idf

    def features(prompts: Sequence[str], is_reference: bool) -> dict[str, list]:
        out: dict[str, list] = {
            name: []
            for name in ("prompt_chars", "prompt_words", "prompt_rare_word_rate", "prompt_mean_idf", "prompt_script")
        }
        if tokenize is not None:
            out["prompt_mean_token_id"] = []
        for index, prompt in enumerate(prompts):
            words = _words(prompt)
            rare, idf = word_stats(words, documents[index] if is_reference else None)
            out["prompt_chars"].append(len(prompt))
            out["prompt_words"].append(len(words))
            out["prompt_rare_word_rate"].append(rare)
            out["prompt_mean_idf"].append(idf)
            out["prompt_script"].append(dominant_script(prompt))
            if tokenize is not None:
                ids = list(tokenize(prompt))
                out["prompt_mean_token_id"].append(float(np.mean(ids)) if ids else 0.0)
        return out

    return features(reference_prompts, True), features(current_prompts, False)


def reply_features(records: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Per-record output features, from what the records hold: ``reply_chars`` and
    ``reply_refusal`` (from ``reply``), ``completion_tokens``, ``guard_hit``, and
    ``judge_score`` (a record's ``judge_score``, else its feedback ``score``). A feature is
    kept only where every record has it."""
    out: dict[str, list] = {}
    columns = {
        "reply_chars": lambda r: len(r["reply"]) if isinstance(r.get("reply"), str) else None,
        "reply_refusal": lambda r: is_refusal(r["reply"]) if isinstance(r.get("reply"), str) else None,
        "completion_tokens": lambda r: r.get("completion_tokens"),
        "guard_hit": lambda r: r.get("guard_hit"),
        "judge_score": lambda r: r.get("judge_score", r.get("score")),
    }
    for name, read in columns.items():
        values = [read(r) for r in records]
        if records and all(v is not None for v in values):
            out[name] = values
    return out


# Which test each feature gets: numeric -> KS and PSI, categorical -> chi-square, rates -> z-test.
_CATEGORICAL = {"prompt_script"}
_RATES = {"reply_refusal", "guard_hit"}


def compare_windows(
    reference: Sequence[Mapping[str, Any]],
    current: Sequence[Mapping[str, Any]],
    *,
    alpha: float = 0.05,
    embed: Callable[[Sequence[str]], Any] | None = None,
    permutations: int = 1000,
    seed: int = 0,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    psi_bins: int = 10,
) -> DriftReport:
    """Every drift test the two windows of records allow (see the module docstring).

    Records are dicts with a ``prompt`` and, for output drift, a ``reply`` and the numbers an
    outcome log holds. ``embed``: texts -> (n, d) vectors (e.g. ``EncoderEmbedder().embed``)
    for the MMD test on prompts; None skips it. ``tokenize``: text -> token ids for
    ``prompt_mean_token_id``."""
    _check_alpha(alpha)
    if len(reference) < 2 or len(current) < 2:
        raise DriftError(
            f"each window needs at least 2 records, got {len(reference)} reference and {len(current)} current"
        )
    skipped: dict[str, str] = {}
    reference_prompts = [r.get("prompt") for r in reference]
    current_prompts = [r.get("prompt") for r in current]
    have_prompts = all(isinstance(p, str) for p in reference_prompts + current_prompts)
    ref_features: dict[str, list] = {}
    cur_features: dict[str, list] = {}
    if have_prompts:
        ref_features, cur_features = prompt_features(reference_prompts, current_prompts, tokenize)
    else:
        skipped["prompt"] = "not every record has a prompt text (log with --log-text)"
    ref_out, cur_out = reply_features(reference), reply_features(current)
    for name in sorted(set(ref_out) | set(cur_out)):
        if name in ref_out and name in cur_out:
            ref_features[name], cur_features[name] = ref_out[name], cur_out[name]
        else:
            skipped[name] = "not present in every record of both windows"
    tests: list[DriftTest] = []
    for name in ref_features:
        a, b = ref_features[name], cur_features[name]
        if name in _CATEGORICAL:
            tests.append(chi_square_test(a, b, alpha=alpha, feature=name))
        elif name in _RATES:
            tests.append(rate_test(a, b, alpha=alpha, feature=name))
        else:
            a, b = [float(v) for v in a], [float(v) for v in b]
            tests.append(ks_test(a, b, alpha=alpha, feature=name))
            tests.append(psi_test(a, b, bins=psi_bins, alpha=alpha, permutations=permutations, seed=seed, feature=name))
    if embed is not None and have_prompts:
        vectors = np.asarray(embed(list(reference_prompts) + list(current_prompts)), dtype=np.float64)
        tests.append(
            mmd_permutation_test(
                vectors[: len(reference)], vectors[len(reference) :], permutations=permutations, alpha=alpha, seed=seed
            )
        )
    elif embed is None:
        skipped["prompt_embedding"] = "no embedder given"
    return DriftReport(tests, alpha, ref_features, cur_features, skipped)
