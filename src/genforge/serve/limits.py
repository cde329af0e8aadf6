"""Admission control for the HTTP server: API keys, per-key rate limits and a bounded queue.

- API keys are compared in constant time (``hmac.compare_digest``) so that response timing
  does not reveal how much of a guessed key was right.
- Rate limiting is a token bucket per key (Turner 1986; the algorithm most API gateways
  use): a bucket of ``burst`` tokens refills at ``rate`` tokens per second and each request
  takes one. A request that finds the bucket empty is refused with the time until the
  next token, which the server sends as ``Retry-After``.
- The admission queue bounds the sequences in flight (running in the engine or waiting
  for it). Refusing at the door with a 429 keeps latency bounded for the requests already
  admitted, where an unbounded queue would let every request time out together.
"""

from __future__ import annotations

import hmac
import math
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["RateLimit", "TokenBucketLimiter", "AdmissionQueue", "KeyChecker", "parse_rate_limit"]

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True)
class RateLimit:
    """``requests`` per ``per_seconds`` for each key, with bursts of up to ``burst`` at once
    (default: ``requests``, one window's worth)."""

    requests: float
    per_seconds: float = 60.0
    burst: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.requests, (int, float)) and math.isfinite(self.requests) and self.requests > 0):
            raise ValueError(f"rate limit requests must be a finite number > 0, got {self.requests!r}")
        if not (
            isinstance(self.per_seconds, (int, float)) and math.isfinite(self.per_seconds) and self.per_seconds > 0
        ):
            raise ValueError(f"rate limit window must be a finite number of seconds > 0, got {self.per_seconds!r}")
        if self.burst is not None and (not isinstance(self.burst, int) or self.burst < 1):
            raise ValueError(f"rate limit burst must be an integer >= 1, got {self.burst!r}")

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self.requests / self.per_seconds

    @property
    def capacity(self) -> float:
        return float(self.burst if self.burst is not None else max(1, math.floor(self.requests)))


def parse_rate_limit(text: str, burst: int | None = None) -> RateLimit:
    """``"60/min"``, ``"5/s"``, ``"1000/hour"`` or a bare number (per minute) -> :class:`RateLimit`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:/\s*([a-z]+))?\s*", text.lower())
    if not match or (match.group(2) and match.group(2) not in _UNITS):
        raise ValueError(f"rate limit {text!r} is not understood; write N/s, N/min or N/hour (a bare N is per minute)")
    return RateLimit(float(match.group(1)), _UNITS[match.group(2) or "min"], burst)


class TokenBucketLimiter:
    """One token bucket per key; thread-safe. ``clock`` is injectable for tests."""

    def __init__(self, limit: RateLimit, clock=time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of last refill)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take a token for ``key``: 0.0 if granted, else the seconds until one is available."""
        now = self._clock()
        capacity, rate = self.limit.capacity, self.limit.rate
        with self._lock:
            tokens, last = self._buckets.get(key, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate


class AdmissionQueue:
    """Counts sequences in flight and refuses those past ``capacity`` (None: unbounded)."""

    def __init__(self, capacity: int | None) -> None:
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"max_queue must be an integer >= 1 or None, got {capacity!r}")
        self.capacity = capacity
        self.in_flight = 0
        self._lock = threading.Lock()

    def try_enter(self, count: int = 1) -> bool:
        with self._lock:
            if self.capacity is not None and self.in_flight + count > self.capacity:
                return False
            self.in_flight += count
            return True

    def leave(self, count: int = 1) -> None:
        with self._lock:
            self.in_flight -= count


class KeyChecker:
    """Bearer-token check against a fixed set of keys (none: every request is let in)."""

    def __init__(self, keys: Iterable[str] | None) -> None:
        self.keys = [k for k in (keys or []) if k]
        bad = [k for k in self.keys if not isinstance(k, str) or k != k.strip()]
        if bad:
            raise ValueError("API keys must be strings without surrounding whitespace")

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None) -> str | None:
        """The matching key for an ``Authorization`` header value, or None if it matches none."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        token = token.strip()
        found = None
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(key.encode(), token.encode()):
                found = key
        return found
