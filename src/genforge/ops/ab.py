"""A/B significance from a server's outcome log: is a route's canary version better or worse
than its baseline?

For each route in the log (`genforge serve --route ... --outcome-log FILE`), each version is
compared with the baseline (``--baseline``, default the version with the most requests: the
incumbent of a canary rollout) with the tests of `genforge.evaluate.stats`, effect = version
minus baseline:

- error rate (status >= 400 or an error in the stream): two-proportion z-test;
- client feedback (``POST /v1/feedback``): two-proportion z-test when every score is 0 or 1
  (thumbs), else Welch's t-test on the scores;
- latency and completion tokens: Welch's t-test on the means;
- truncation rate (finish reason ``length``): two-proportion z-test.

A test needs a few outcomes on both sides (two per arm for Welch, one request per arm for a
rate); one with too few is reported as skipped with the reason. The p-values are per test, not
corrected for the number of tests: decide in advance which metric decides the rollout (the
overall evaluation criterion, Kohavi et al. 2020) and read the others as guardrails.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..evaluate.base import MetricError
from ..evaluate.stats import HypothesisTestResult, two_proportion_ztest, welch_t_test

__all__ = ["ABComparison", "ab_compare", "ab_markdown"]


@dataclass
class ABComparison:
    """One metric of one version against the route's baseline."""

    route: str
    baseline: str
    version: str
    metric: str
    n_baseline: int
    n_version: int
    baseline_value: float | None
    version_value: float | None
    result: HypothesisTestResult | None = None
    skipped: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, alpha: float) -> dict[str, Any]:
        out = {
            "route": self.route,
            "baseline": self.baseline,
            "version": self.version,
            "metric": self.metric,
            "n_baseline": self.n_baseline,
            "n_version": self.n_version,
            "baseline_value": self.baseline_value,
            "version_value": self.version_value,
        }
        if self.result is not None:
            out |= {
                "test": self.result.name,
                "effect": self.result.effect,
                "confidence_interval": list(self.result.confidence_interval),
                "p_value": self.result.p_value,
                "significant": self.result.significant(alpha),
            }
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def _compared(route, baseline, version, metric, a: Sequence[float], b: Sequence[float]) -> ABComparison:
    """The comparison's counts and means, before its test is run."""
    return ABComparison(route, baseline, version, metric, len(a), len(b), _average(a), _average(b))


def _average(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rate(route, baseline, version, metric, a: Sequence[bool], b: Sequence[bool]) -> ABComparison:
    comparison = _compared(route, baseline, version, metric, a, b)
    if not a or not b:
        comparison.skipped = "no outcomes on one side"
        return comparison
    comparison.result = two_proportion_ztest(sum(a), len(a), sum(b), len(b))
    return comparison


def _mean(route, baseline, version, metric, a: Sequence[float], b: Sequence[float]) -> ABComparison:
    comparison = _compared(route, baseline, version, metric, a, b)
    try:
        comparison.result = welch_t_test(a, b)
    except MetricError as err:  # too few values, or both constant
        comparison.skipped = str(err).split(": ", 1)[-1]
    return comparison


def ab_compare(
    records: Sequence[Mapping[str, Any]], *, baseline: str | None = None, route: str | None = None
) -> list[ABComparison]:
    """Every version of every routed route in ``records`` (an outcome log, feedback joined as
    ``score`` by `ops.records.read_records`) against its baseline."""
    routed = [r for r in records if r.get("route") and r.get("version")]
    if route is not None:
        routed = [r for r in routed if r["route"] == route]
    if not routed:
        where = f" for the route {route!r}" if route else ""
        raise ValueError(f"the log holds no routed requests{where}; serve with --route and --outcome-log")
    comparisons: list[ABComparison] = []
    for name in dict.fromkeys(r["route"] for r in routed):
        rows = [r for r in routed if r["route"] == name]
        counts = Counter(r["version"] for r in rows)
        base = baseline if baseline is not None else counts.most_common(1)[0][0]
        if base not in counts:
            raise ValueError(
                f"--baseline {base!r} served no request of the route {name!r}; versions: {', '.join(counts)}"
            )
        by_version = {v: [r for r in rows if r["version"] == v] for v in counts}
        a = by_version[base]
        ok_a = [r for r in a if not r.get("error")]
        for version, b in by_version.items():
            if version == base:
                continue
            ok_b = [r for r in b if not r.get("error")]
            comparisons.append(
                _rate(
                    name,
                    base,
                    version,
                    "error_rate",
                    [bool(r.get("error")) for r in a],
                    [bool(r.get("error")) for r in b],
                )
            )
            scores_a = [float(r["score"]) for r in a if isinstance(r.get("score"), (int, float))]
            scores_b = [float(r["score"]) for r in b if isinstance(r.get("score"), (int, float))]
            if scores_a or scores_b:
                if set(scores_a + scores_b) <= {0.0, 1.0}:
                    comparisons.append(
                        _rate(
                            name,
                            base,
                            version,
                            "feedback_positive_rate",
                            [s == 1 for s in scores_a],
                            [s == 1 for s in scores_b],
                        )
                    )
                else:
                    comparisons.append(_mean(name, base, version, "feedback_score", scores_a, scores_b))
            comparisons.append(
                _mean(
                    name,
                    base,
                    version,
                    "latency_s",
                    [float(r["latency_s"]) for r in ok_a],
                    [float(r["latency_s"]) for r in ok_b],
                )
            )
            comparisons.append(
                _mean(
                    name,
                    base,
                    version,
                    "completion_tokens",
                    [float(r.get("completion_tokens", 0)) for r in ok_a],
                    [float(r.get("completion_tokens", 0)) for r in ok_b],
                )
            )
            comparisons.append(
                _rate(
                    name,
                    base,
                    version,
                    "truncation_rate",
                    [r.get("finish_reason") == "length" for r in ok_a],
                    [r.get("finish_reason") == "length" for r in ok_b],
                )
            )
    return comparisons


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def ab_markdown(comparisons: Sequence[ABComparison], alpha: float = 0.05) -> str:
    """A Markdown table: one row per metric and version against the baseline."""
    lines = [
        f"A/B comparison against each route's baseline (alpha {alpha}; effect = version - baseline)",
        "",
        "| route | baseline | version | metric | n (base / version) | baseline | version | effect | 95% CI | p-value | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        if c.result is None:
            tail = f"- | - | - | skipped: {c.skipped} |"
        else:
            low, high = c.result.confidence_interval
            verdict = "**significant**" if c.result.significant(alpha) else "not significant"
            tail = f"{c.result.effect:+.4g} | [{low:.4g}, {high:.4g}] | {c.result.p_value:.3g} | {verdict} |"
        lines.append(
            f"| {c.route} | {c.baseline} | {c.version} | {c.metric} | {c.n_baseline} / {c.n_version} | "
            f"{_number(c.baseline_value)} | {_number(c.version_value)} | {tail}"
        )
    return "\n".join(lines) + "\n"
