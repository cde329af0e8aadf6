"""Live drift monitoring in `genforge serve`: a sliding window of recent requests tested
against a reference window, with the results as Prometheus gauges to alert on.

The reference is a file of records (`ops.records.read_records`: an outcome log written with
``--log-text``, or any JSONL of ``{"prompt": ...}``) or, without one, the first requests the
server answers. Every ``every`` requests (once the window holds ``min_window``), the tests of
`ops.drift.compare_windows` run in a background thread (the event loop is never held up) and
set, per feature and test:

- ``genforge_drift_p_value{feature, test}`` and ``genforge_drift_statistic{feature, test}``;
- ``genforge_drift_alert{feature, test}``: 1 where the Holm-adjusted p-value is below alpha,
  so that alerting on any of them keeps the false-alarm rate of one check at alpha (PSI has
  no alert gauge: its statistic is read against 0.1 / 0.25);
- ``genforge_drift_detected``: 1 when any test alerts; ``genforge_drift_window_requests``,
  ``genforge_drift_reference_requests``, ``genforge_drift_checks_total`` and
  ``genforge_drift_last_check_timestamp_seconds``.

A Prometheus rule such as ``max_over_time(genforge_drift_detected[30m]) == 1`` pages on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .drift import DriftError, DriftReport, compare_windows

__all__ = ["LiveMonitor"]

log = logging.getLogger(__name__)


class _EmbeddingMemo:
    """Embeds each distinct text once (the reference is embedded at the first check only)."""

    def __init__(self, embed: Callable[[Sequence[str]], Any]) -> None:
        self.embed = embed
        self.vectors: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if missing:
            for text, vector in zip(missing, np.asarray(self.embed(missing), dtype=np.float64)):
                self.vectors[text] = vector
        wanted = set(texts)
        self.vectors = {t: v for t, v in self.vectors.items() if t in wanted}
        return np.stack([self.vectors[t] for t in texts])


class LiveMonitor:
    """Sliding-window drift checks over a server's requests (see the module docstring).

    ``reference``: records, or None to take the first ``reference_size`` requests (default:
    ``window``). ``window``: recent requests compared. ``every``: requests between checks.
    ``min_window``: requests the window needs before the first check. ``embed``: texts ->
    vectors for the MMD test (None: no embedding test). ``background``: run checks in a
    thread (False: inline, for tests)."""

    def __init__(
        self,
        reference: Sequence[Mapping[str, Any]] | None = None,
        *,
        window: int = 200,
        reference_size: int | None = None,
        every: int = 50,
        min_window: int = 30,
        alpha: float = 0.05,
        embed: Callable[[Sequence[str]], Any] | None = None,
        permutations: int = 1000,
        seed: int = 0,
        tokenize: Callable[[str], Sequence[int]] | None = None,
        background: bool = True,
    ) -> None:
        for name, value, least in (("window", window, 2), ("every", every, 1), ("min_window", min_window, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DriftError(f"{name} must be an integer >= {least}, got {value!r}")
        if not 0 < alpha < 1:
            raise DriftError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
        if reference is not None and len(reference) < 2:
            raise DriftError(f"the reference needs at least 2 records, got {len(reference)}")
        self.reference: list[dict] = [dict(r) for r in reference] if reference is not None else []
        self.reference_fixed = reference is not None
        self.reference_size = reference_size or window
        self.recent: deque[dict] = deque(maxlen=window)
        self.by_id: OrderedDict[str, dict] = OrderedDict()
        self.every, self.min_window, self.alpha = every, min(min_window, window), alpha
        self.embed = _EmbeddingMemo(embed) if embed is not None else None
        self.permutations, self.seed, self.tokenize = permutations, seed, tokenize
        self.background = background
        self.last_report: DriftReport | None = None
        self._since_check = 0
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None
        self._gauges: dict[str, Any] | None = None

    def bind(self, registry) -> None:
        """Create the gauges in a Prometheus registry (`install_ops` passes the app's)."""
        from prometheus_client import Counter, Gauge

        self._gauges = {
            "p_value": Gauge(
                "genforge_drift_p_value",
                "Drift test p-value, current window vs reference",
                ["feature", "test"],
                registry=registry,
            ),
            "statistic": Gauge(
                "genforge_drift_statistic",
                "Drift test statistic (KS D, PSI, chi2, z, MMD^2)",
                ["feature", "test"],
                registry=registry,
            ),
            "alert": Gauge(
                "genforge_drift_alert",
                "1 where the Holm-adjusted p-value is below alpha",
                ["feature", "test"],
                registry=registry,
            ),
            "detected": Gauge("genforge_drift_detected", "1 when any drift test alerts", registry=registry),
            "window": Gauge("genforge_drift_window_requests", "Requests in the current window", registry=registry),
            "reference": Gauge(
                "genforge_drift_reference_requests", "Requests in the reference window", registry=registry
            ),
            "checks": Counter("genforge_drift_checks", "Drift checks run", registry=registry),
            "last": Gauge(
                "genforge_drift_last_check_timestamp_seconds", "Unix time of the last drift check", registry=registry
            ),
        }
        self._gauges["reference"].set(len(self.reference))

    def observe(self, record: Mapping[str, Any]) -> None:
        """Add one answered request (``prompt``, ``reply`` and the outcome log's numbers)."""
        record = dict(record)
        with self._lock:
            if not self.reference_fixed:
                self.reference.append(record)
                self.reference_fixed = len(self.reference) >= self.reference_size
                if self._gauges is not None:
                    self._gauges["reference"].set(len(self.reference))
                return
            self.recent.append(record)
            if record.get("id"):
                self.by_id[record["id"]] = record
                while len(self.by_id) > self.recent.maxlen:
                    self.by_id.popitem(last=False)
            self._since_check += 1
            due = self._since_check >= self.every and len(self.recent) >= self.min_window
            busy = self._running is not None and self._running.is_alive()
            if not due or busy:
                return
            self._since_check = 0
            reference, current = list(self.reference), list(self.recent)
        if self._gauges is not None:
            self._gauges["window"].set(len(current))
        if self.background:
            self._running = threading.Thread(target=self._check_logged, args=(reference, current), daemon=True)
            self._running.start()
        else:
            self.check(reference, current)

    def observe_feedback(self, record: Mapping[str, Any]) -> None:
        """A client's score for a request still in the window becomes its ``score``."""
        with self._lock:
            target = self.by_id.get(record.get("id"))
            if target is not None:
                target["score"] = record.get("score")

    def _check_logged(self, reference, current) -> None:
        try:
            self.check(reference, current)
        except Exception:  # a monitoring fault must never take the server down
            log.exception("drift check failed")

    def check(
        self, reference: Sequence[Mapping] | None = None, current: Sequence[Mapping] | None = None
    ) -> DriftReport:
        """Run the drift tests now (on the monitor's own windows unless given) and set the gauges."""
        if reference is None or current is None:
            with self._lock:
                reference, current = list(self.reference), list(self.recent)
        report = compare_windows(
            reference,
            current,
            alpha=self.alpha,
            embed=self.embed,
            permutations=self.permutations,
            seed=self.seed,
            tokenize=self.tokenize,
        )
        self.last_report = report
        if self._gauges is not None:
            gauges = self._gauges
            for test, adjusted in zip(report.tests, report.adjusted_p_values):
                gauges["p_value"].labels(test.feature, test.test).set(test.p_value)
                gauges["statistic"].labels(test.feature, test.test).set(test.statistic)
                if adjusted is not None:  # PSI is outside the family: read its statistic
                    gauges["alert"].labels(test.feature, test.test).set(1.0 if adjusted < self.alpha else 0.0)
            gauges["detected"].set(1.0 if report.drifted else 0.0)
            gauges["checks"].inc()
            gauges["last"].set(time.time())
        return report

    def wait(self, timeout: float = 60.0) -> None:
        """Wait for a background check in flight (tests, shutdown)."""
        running = self._running
        if running is not None:
            running.join(timeout)
