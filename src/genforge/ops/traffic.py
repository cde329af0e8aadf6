"""The server side of `genforge.ops`: one ASGI middleware in front of a `create_app` app.

`install_ops(app, ...)` adds:

- routing (`ops.routing`): a request for a route's name has its body's ``model`` rewritten to
  the version drawn, so the response's ``model`` names the version served, and the headers
  ``x-genforge-route`` and ``x-genforge-version`` say so;
- per-version Prometheus metrics in the app's registry, labelled by route and version:
  ``genforge_route_requests_total{route, version, status}``, ``genforge_route_errors_total``,
  ``genforge_route_request_latency_seconds``, ``genforge_route_tokens_total{kind}``,
  ``genforge_route_feedback_total``;
- one JSONL outcome record per generation request (`OutcomeLog`): id, route, version, how it
  was placed, user hash, status, latency, prompt and completion tokens, finish reason, guard
  hit (and the prompt and reply texts with ``log_text``), read by `genforge monitor ab` and
  `monitor report`;
- ``POST /v1/feedback {"id", "score"}``: a client-reported outcome for a response, logged
  beside it;
- the live drift monitor (`ops.live_monitor.LiveMonitor`) when given.

Token counts and finish reasons come from the engine (`ServerMetrics.finish_listeners`, called
in the request's own context), so they are exact for streamed answers too; the response id and
reply text are read from the bytes sent.
"""

from __future__ import annotations

import contextvars
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Depends, Request

from ..serve.errors import OpenAIError, bad
from .routing import Assignment, Route, Router, RouteSpecError, parse_routes

__all__ = ["install_ops", "OutcomeLog", "OpsHub", "ROUTE_HEADER", "VERSION_HEADER"]

ROUTE_HEADER = "x-genforge-route"
VERSION_HEADER = "x-genforge-version"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"((?:chatcmpl|cmpl)-[0-9a-f]+)"')
_STREAM_ERROR = re.compile(rb'data: \{"error"')
# The body of a non-streamed answer is kept for its id and reply text up to this size.
_MAX_KEPT_BODY = 1 << 20


class OutcomeLog:
    """Appends one JSON object per line to a file, from any thread; each line is flushed, so a
    crash loses at most the line being written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


@dataclass
class _Outcome:
    """What one generation request did, filled in by the middleware and the engine listener."""

    start: float
    path: str
    stream: bool
    model: str | None
    prompt: str | None
    assignment: Assignment | None = None
    status: int = 0
    guard: str | None = None
    response_id: str | None = None
    stream_error: bool = False
    body: bytearray = field(default_factory=bytearray)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    texts: dict[str, list[str]] = field(default_factory=dict)  # engine request id -> text pieces


_current: contextvars.ContextVar[_Outcome | None] = contextvars.ContextVar("genforge_ops_outcome", default=None)


def _on_engine_output(model: str, output) -> None:
    """The engine-side view of a finished sequence (called by `ServerMetrics.observe_finished`
    in the request's own context): exact token counts and finish reasons, even when streamed."""
    outcome = _current.get()
    if outcome is None:
        return
    outcome.prompt_tokens = max(outcome.prompt_tokens, int(output.prompt_tokens))
    outcome.completion_tokens += int(output.completion_tokens)
    outcome.finish_reasons.append(output.finish_reason or "unknown")


def _prompt_text(path: str, body: Mapping[str, Any]) -> str | None:
    """The text that drift monitoring reads: a chat's last user message, or a completion's prompt."""
    if path == "/v1/chat/completions":
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                    return "\n".join(parts)
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return None  # token-id prompts carry no text


def _reply_text(outcome: _Outcome) -> str | None:
    """The first choice's text, from the response body (non-streamed) or the stream's deltas."""
    if not outcome.body:
        return None
    if outcome.stream:
        pieces = []
        for line in bytes(outcome.body).split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            try:
                chunk = json.loads(line[6:])
            except ValueError:
                continue
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) == 0:
                    delta = choice.get("delta") or {}
                    pieces.append(delta.get("content") or choice.get("text") or "")
        return "".join(pieces)
    try:
        answer = json.loads(bytes(outcome.body))
        choice = answer["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if "message" in choice:
        return (choice["message"] or {}).get("content") or ""
    return choice.get("text")


class _RouteMetrics:
    """Per-version Prometheus metrics, labelled by route and version, in the app's registry."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "genforge_route_requests",
            "Routed requests by route, version and status",
            ["route", "version", "status"],
            registry=registry,
        )
        self.errors = Counter(
            "genforge_route_errors",
            "Routed requests that ended in an error (status >= 400 or an in-stream error)",
            ["route", "version"],
            registry=registry,
        )
        self.latency = Histogram(
            "genforge_route_request_latency_seconds",
            "Routed requests, arrival to the last byte",
            ["route", "version"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
            registry=registry,
        )
        self.tokens = Counter(
            "genforge_route_tokens",
            "Tokens of routed requests by kind (prompt, completion)",
            ["route", "version", "kind"],
            registry=registry,
        )
        self.feedback = Counter(
            "genforge_route_feedback",
            "Client feedback received for routed responses",
            ["route", "version"],
            registry=registry,
        )


class OpsHub:
    """What `install_ops` wires into one app: the router, the log, the metrics, the monitor and
    the ids of recent responses (for feedback)."""

    def __init__(
        self,
        app,
        router: Router | None,
        outcome_log: OutcomeLog | None,
        monitor: Any,
        log_text: bool,
        remember: int,
        clock: Callable[[], float],
    ) -> None:
        self.state = app.state.server
        self.router = router
        self.outcome_log = outcome_log
        self.monitor = monitor
        self.log_text = log_text
        self.clock = clock
        self.metrics = _RouteMetrics(self.state.metrics.registry) if router is not None else None
        self.recent: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()
        self.remember = remember
        self._lock = threading.Lock()

    def key_of(self, headers: Mapping[str, str]) -> str | None:
        """The caller's API key, only where the server checks keys: without keys every client
        sends a placeholder, which would put them all in one slice."""
        if not self.state.keys.enabled:
            return None
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def finish(self, outcome: _Outcome) -> None:
        failed = outcome.status >= 400 or outcome.stream_error
        latency = self.clock() - outcome.start
        routed = outcome.assignment
        if routed is not None and self.metrics is not None:
            self.metrics.requests.labels(routed.route, routed.version, str(outcome.status)).inc()
            self.metrics.latency.labels(routed.route, routed.version).observe(latency)
            if failed:
                self.metrics.errors.labels(routed.route, routed.version).inc()
            self.metrics.tokens.labels(routed.route, routed.version, "prompt").inc(outcome.prompt_tokens)
            self.metrics.tokens.labels(routed.route, routed.version, "completion").inc(outcome.completion_tokens)
        if outcome.response_id is not None:
            with self._lock:
                self.recent[outcome.response_id] = (
                    routed.route if routed else None,
                    routed.version if routed else outcome.model,
                )
                while len(self.recent) > self.remember:
                    self.recent.popitem(last=False)
        needs_reply = self.log_text or self.monitor is not None
        reply = _reply_text(outcome) if needs_reply and not failed else None
        finish = outcome.finish_reasons[0] if outcome.finish_reasons else None
        record = {
            "type": "request",
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "id": outcome.response_id,
            "endpoint": outcome.path,
            "model": routed.version if routed else outcome.model,
            "route": routed.route if routed else None,
            "version": routed.version if routed else outcome.model,
            "assignment": routed.how if routed else None,
            "user_hash": routed.user_hash if routed else None,
            "status": outcome.status,
            "error": failed,
            "stream": outcome.stream,
            "latency_s": round(latency, 6),
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "finish_reason": finish,
            "guard_hit": outcome.guard not in (None, "", "none"),
        }
        if self.log_text:
            record["prompt"] = outcome.prompt
            record["reply"] = reply
        if self.outcome_log is not None:
            self.outcome_log.write(record)
        if self.monitor is not None and not failed:
            self.monitor.observe({**record, "prompt": outcome.prompt, "reply": reply})

    def feedback(self, response_id: str, score: float, extra: Mapping[str, Any]) -> dict:
        with self._lock:
            known = self.recent.get(response_id)
        if known is None:
            return {}
        route, version = known
        record = {
            "type": "feedback",
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "id": response_id,
            "route": route,
            "version": version,
            "score": score,
            **dict(extra),
        }
        if self.outcome_log is not None:
            self.outcome_log.write(record)
        if self.metrics is not None and route is not None:
            self.metrics.feedback.labels(route, version).inc()
        if self.monitor is not None:
            self.monitor.observe_feedback(record)
        return record


class OpsMiddleware:
    """The ASGI middleware `install_ops` puts in front of the app (see the module docstring)."""

    def __init__(self, app, hub: OpsHub) -> None:
        self.app = app
        self.hub = hub

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        hub = self.hub
        start = hub.clock()
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # the app answers with its own 400
            return await self.app(scope, _replay(raw, receive), send)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        outcome = _Outcome(start, scope["path"], bool(body.get("stream")), model, _prompt_text(scope["path"], body))
        if hub.router is not None and model in hub.router.routes:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            user = body.get("user") if isinstance(body.get("user"), str) else None
            outcome.assignment = hub.router.assign(model, user=user, key=hub.key_of(headers))
            body["model"] = outcome.assignment.version
            raw = json.dumps(body).encode()
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"] + [
                (b"content-length", str(len(raw)).encode())
            ]

        keep_body = hub.log_text or hub.monitor is not None  # the reply text is wanted

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                outcome.status = message["status"]
                headers = list(message.get("headers", []))
                for key, value in headers:
                    if key.lower() == b"x-genforge-guard":
                        outcome.guard = value.decode("latin-1")
                if outcome.assignment is not None:
                    headers += [
                        (ROUTE_HEADER.encode(), outcome.assignment.route.encode()),
                        (VERSION_HEADER.encode(), outcome.assignment.version.encode()),
                    ]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                piece = message.get("body", b"")
                if outcome.response_id is None:
                    found = _RESPONSE_ID.search(piece)
                    if found:
                        outcome.response_id = found.group(1).decode()
                if _STREAM_ERROR.search(piece):
                    outcome.stream_error = True
                if keep_body and len(outcome.body) + len(piece) <= _MAX_KEPT_BODY:
                    outcome.body += piece
            await send(message)

        token = _current.set(outcome)
        try:
            await self.app(scope, _replay(raw, receive), send_and_watch)
        except BaseException:
            outcome.status = outcome.status or 500
            raise
        finally:
            _current.reset(token)
            hub.finish(outcome)


def _replay(raw: bytes, receive):
    """A `receive` that hands the (rewritten) body over once, then the connection's own
    messages (the disconnect the app watches for)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


def install_ops(
    app,
    *,
    routes: Mapping[str, Route] | Sequence[str] | None = None,
    outcome_log: str | Path | OutcomeLog | None = None,
    monitor: Any = None,
    log_text: bool = False,
    salt: str = "",
    seed: int | None = None,
    remember: int = 100_000,
    clock: Callable[[], float] = time.monotonic,
) -> OpsHub:
    """Add routing, outcome logging, ``POST /v1/feedback`` and live monitoring to an app built
    by `genforge.serve.api.create_app` (before it starts serving).

    ``routes``: `Route`s or ``--route`` strings (checked against the app's models).
    ``outcome_log``: a JSONL file (or `OutcomeLog`) that gets one record per generation request
    and one per feedback. ``log_text``: also log each prompt and reply text (off by default:
    they may hold personal data). ``monitor``: an `ops.live_monitor.LiveMonitor` (it is given
    the app's Prometheus registry). ``remember``: response ids kept for feedback.
    """
    state = app.state.server
    served = list(state.all_models)
    if routes is not None and not isinstance(routes, Mapping):
        routes = parse_routes(list(routes), served)
    elif routes:
        for route in routes.values():
            unknown = [v for v in route.versions if v not in served]
            if unknown:
                raise RouteSpecError(f"route {route.name!r}: {unknown} not served; served: {', '.join(served)}")
    router = Router(routes, salt=salt, seed=seed) if routes else None
    if isinstance(outcome_log, (str, Path)):
        outcome_log = OutcomeLog(outcome_log)
    if remember < 1:
        raise ValueError(f"remember must be >= 1 response id, got {remember}")
    hub = OpsHub(app, router, outcome_log, monitor, log_text, remember, clock)
    if monitor is not None:
        monitor.bind(state.metrics.registry)
    state.metrics.finish_listeners.append(_on_engine_output)
    _add_feedback_route(app, hub)
    app.add_middleware(OpsMiddleware, hub=hub)
    app.state.ops = hub
    return hub


def _add_feedback_route(app, hub: OpsHub) -> None:
    state = hub.state

    async def admit(request: Request) -> str:
        return state.admit(request)

    @app.post("/v1/feedback")
    async def feedback(request: Request, _: str = Depends(admit)):
        """A client's outcome for a response: ``{"id": "chatcmpl-...", "score": 1}`` (a number:
        1/0 for thumbs up/down, or a rating); extra string fields ``label``/``comment`` kept."""
        try:
            body = await request.json()
        except ValueError:
            raise bad('the request body is not valid JSON; send {"id": RESPONSE_ID, "score": NUMBER}') from None
        if not isinstance(body, dict):
            raise bad('send a JSON object: {"id": RESPONSE_ID, "score": NUMBER}')
        response_id, score = body.get("id"), body.get("score")
        if not isinstance(response_id, str) or not response_id:
            raise bad("'id' must be the id of a response of this server (chatcmpl-... or cmpl-...)", "id")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise bad(f"'score' must be a finite number (1/0 for thumbs up/down, or a rating), got {score!r}", "score")
        extra = {k: body[k] for k in ("label", "comment") if isinstance(body.get(k), str)}
        record = hub.feedback(response_id, float(score), extra)
        if not record:
            raise OpenAIError(
                404,
                f"no recent response has the id {response_id!r} (this server remembers its last {hub.remember} ids)",
                "not_found_error",
                "id",
                "response_not_found",
            )
        state.metrics.http_requests.labels("/v1/feedback", "200").inc()
        return {"object": "feedback", "id": response_id, "route": record["route"], "version": record["version"]}
