"""Canary and A/B routing: one public model name split across served versions by weight.

`genforge serve --route chat=v1:0.9,v2:0.1` serves the name ``chat`` from the served models
``v1`` and ``v2``: each request for ``chat`` goes to one version, drawn by weight. The split is
*sticky*: a request that names its user (OpenAI's ``user`` field) or, where the server checks
API keys, its key, is placed by a hash of that identity, so the same user always meets the
same version (across restarts and replicas: no state is kept), as consistent-hash traffic
splitting in experiment platforms does (Kohavi, Tang & Xu 2020, *Trustworthy Online
Controlled Experiments*, ch. 4). A request with neither is placed at random.

Weights are relative shares and are normalised (``v1:9,v2:1`` is ``v1:0.9,v2:0.1``), as
Envoy's weighted clusters treat them; a weight of 0 keeps a version listed with no traffic.
Each version owns a slice of [0, 1) in the order given, so raising the weight of the last
version listed (the canary) only moves users onto it: nobody flips back and forth as a
rollout ramps up.

This module is the routing itself (specs, slices, the hash); `ops.traffic` puts it in front of
the server, with per-version metrics, the outcome log and ``POST /v1/feedback``.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Route",
    "RouteSpecError",
    "Router",
    "Assignment",
    "parse_route",
    "parse_routes",
    "identity_hash",
    "SPEC_HELP",
]


class RouteSpecError(ValueError):
    """A `--route` value that cannot be served; the message says what is accepted."""


SPEC_HELP = (
    "NAME=VERSION:WEIGHT,VERSION:WEIGHT,... where each VERSION is a served model name (or MODEL:ADAPTER) and "
    "each WEIGHT a number >= 0; weights are relative shares, normalised to sum to 1"
)


@dataclass(frozen=True)
class Route:
    """A public name and its versions with normalised weights (summing to 1)."""

    name: str
    versions: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        # Slice ends in [0, 1]; the last is exactly 1 so that every hash lands in a slice.
        ends, total = [], 0.0
        for weight in self.weights:
            total += weight
            ends.append(total)
        ends[-1] = 1.0
        object.__setattr__(self, "_ends", tuple(ends))

    def pick(self, point: float) -> str:
        """The version whose slice of [0, 1) holds ``point``; zero-weight versions own no slice."""
        for version, weight, end in zip(self.versions, self.weights, self._ends):
            if weight > 0 and point < end:
                return version
        return next(v for v, w in zip(reversed(self.versions), reversed(self.weights)) if w > 0)

    def describe(self) -> str:
        return f"{self.name} -> " + ", ".join(f"{v} {w:.1%}" for v, w in zip(self.versions, self.weights))


def parse_route(spec: str, served: Iterable[str] | None = None) -> Route:
    """``NAME=V1:W1,V2:W2`` -> a `Route`, weights normalised. ``served``: the model names the
    server serves; versions must be among them and NAME must not be one."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise RouteSpecError(f"--route {spec!r}: expected {SPEC_HELP}, e.g. chat=v1:0.9,v2:0.1")
    versions, weights = [], []
    for part in rest.split(","):
        version, colon, weight_text = part.strip().rpartition(":")
        if not colon or not version:
            raise RouteSpecError(
                f"--route {spec!r}: {part.strip()!r} has no weight; expected VERSION:WEIGHT ({SPEC_HELP})"
            )
        try:
            weight = float(weight_text)
        except ValueError:
            raise RouteSpecError(
                f"--route {spec!r}: the weight {weight_text!r} of {version!r} is not a number"
            ) from None
        if not math.isfinite(weight) or weight < 0:
            raise RouteSpecError(
                f"--route {spec!r}: the weight of {version!r} must be a finite number >= 0, got {weight_text}"
            )
        if version in versions:
            raise RouteSpecError(f"--route {spec!r}: the version {version!r} is listed twice")
        versions.append(version)
        weights.append(weight)
    total = sum(weights)
    if total <= 0:
        raise RouteSpecError(f"--route {spec!r}: every weight is 0; at least one version must take traffic")
    if served is not None:
        served = list(served)
        unknown = [v for v in versions if v not in served]
        if unknown:
            raise RouteSpecError(
                f"--route {spec!r}: {', '.join(map(repr, unknown))} is not a served model; served: {', '.join(served)}"
            )
        if name in served:
            raise RouteSpecError(
                f"--route {spec!r}: {name!r} is already the name of a served model; give the route a name of its own"
            )
    return Route(name, tuple(versions), tuple(w / total for w in weights))


def parse_routes(specs: Sequence[str], served: Iterable[str] | None = None) -> dict[str, Route]:
    """Several `--route` values -> {name: Route}, refusing a name given twice."""
    served = None if served is None else list(served)
    routes: dict[str, Route] = {}
    for spec in specs:
        route = parse_route(spec, served)
        if route.name in routes:
            raise RouteSpecError(f"--route: the route {route.name!r} is given twice; give each name once")
        routes[route.name] = route
    return routes


def _unit_interval(text: str) -> float:
    """A uniform point in [0, 1) from a string: the first 8 bytes of its SHA-256."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def identity_hash(identity: str, salt: str = "") -> str:
    """What the log keeps of a user or key: a 16-hex-digit SHA-256 prefix, never the identity."""
    return hashlib.sha256(f"{salt}\x00{identity}".encode()).hexdigest()[:16]


@dataclass
class Assignment:
    """Where one request went and why (``how``: user, key or random)."""

    route: str
    version: str
    how: str
    user_hash: str | None


class Router:
    """Places requests for a route's name on its versions: by a hash of the identity when
    there is one (sticky), else at random (``seed`` makes the random draws repeatable).
    ``salt`` re-draws every user's slice (a new experiment) without changing the weights."""

    def __init__(self, routes: Mapping[str, Route], *, salt: str = "", seed: int | None = None) -> None:
        self.routes = dict(routes)
        self.salt = salt
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def assign(self, route: str, user: str | None = None, key: str | None = None) -> Assignment:
        """The version of ``route`` for a request of ``user`` (OpenAI's ``user`` field) or API
        ``key``; the user wins when both are given."""
        table = self.routes[route]
        if user:
            identity, how = "user:" + user, "user"
        elif key:
            identity, how = "key:" + key, "key"
        else:
            with self._lock:
                point = self._random.random()
            return Assignment(route, table.pick(point), "random", None)
        # The route name is in the hash, so a user's slices in two experiments are independent.
        point = _unit_interval(f"{self.salt}\x00{route}\x00{identity}")
        return Assignment(route, table.pick(point), how, identity_hash(identity, self.salt))
