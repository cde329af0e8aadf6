"""The safety guards in the server: checking prompts, filtering outputs, ``/v1/moderations``.

`ServerGuards` wraps a `safety.guards.Guards` for the API:

- before a request runs, `check_request` scans its prompts (user and tool messages of a chat,
  text prompts of a completion) for prompt injection; a blocked one is a 400 in OpenAI's error
  shape with code ``prompt_injection``; with ``pii_input`` the prompts are redacted first;
- a non-streamed response goes through `filter_choices`: each choice's text is released
  segment by segment, and a choice the output guard stops ends with ``finish_reason:
  "content_filter"`` holding only the text released before the flagged segment;
- a streamed response gets one `OutputFilter` per choice (`StreamGuard`): text is held back
  until checked, and a stopped choice's engine request is aborted at once.

What each guard found and did is reported three ways: the ``x-genforge-guard`` response header
(``input=passed; output=stopped(violence); pii=redacted(EMAIL)``; a stream's header can only
carry the input guard's verdict), a ``guard`` field in the body (in a stream, on the chunk that
stops a choice and on the last chunk), and the ``genforge_guard_events`` Prometheus counter.

The moderation endpoint answers OpenAI's request and response shapes (`moderation.openai_response`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter

from ..safety.guards import GuardConfig, GuardEvent, Guards, OutputFilter
from .errors import OpenAIError, bad
from .schemas import ChatCompletionRequest, CompletionRequest

__all__ = ["ServerGuards", "StreamGuard", "GUARD_HEADER", "moderation_response", "MODERATION_MODELS"]

GUARD_HEADER = "x-genforge-guard"
# Model names a moderation request may give: genforge's, and OpenAI's (answered by genforge's).
MODERATION_MODELS = ("genforge-moderation-minilm", "omni-moderation-latest", "text-moderation-latest")
MAX_MODERATION_INPUTS = 256
_CHECKED_ROLES = ("user", "tool", "function")  # the operator's system/developer messages are trusted


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(getattr(p, "text", None) or "" for p in content if getattr(p, "type", "text") == "text")
    return None


class ServerGuards:
    """The guards of one server, its metrics counter, and a lock so one check runs at a time."""

    def __init__(self, config: GuardConfig, registry=None, **detectors) -> None:
        self.config = config
        self.guards = Guards(config, **detectors)
        self.lock = asyncio.Lock()
        self.events = Counter(
            "genforge_guard_events",
            "Guard checks by guard and action (passed, flagged, blocked, stopped, redacted)",
            ["guard", "action"],
            registry=registry,
        )

    def count(self, events: Sequence[GuardEvent]) -> None:
        for event in events:
            self.events.labels(event.guard, event.action).inc()

    async def _run(self, fn, *args):
        # Embedding is CPU work of tens of milliseconds: off the event loop, one at a time.
        async with self.lock:
            return await asyncio.to_thread(fn, *args)

    async def check_request(self, body: ChatCompletionRequest | CompletionRequest) -> list[GuardEvent]:
        """Input guard (and input redaction) for a request; raises the 400 when it blocks."""
        events: list[GuardEvent] = []
        if self.filters_output and (body.logprobs or getattr(body, "top_logprobs", None)):
            raise bad(
                "logprobs are not available while the output or pii guard is on: they would show the text "
                "the guards withhold or redact",
                "logprobs",
            )
        if isinstance(body, ChatCompletionRequest):
            texts = [t for m in body.messages if m.role in _CHECKED_ROLES and (t := _message_text(m.content))]
        else:
            prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
            texts = [p for p in prompts if isinstance(p, str)]
        if self.config.input:
            event = await self._run(self.guards.check_input, texts)
            events.append(event)
            self.count([event])
            if event.action == "blocked":
                raise OpenAIError(
                    400,
                    f"the request was refused by the input guard: prompt injection detected "
                    f"({', '.join(event.found)}; score {event.score:.2f})",
                    "invalid_request_error",
                    "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                    "prompt_injection",
                    headers={GUARD_HEADER: event.summary()},
                )
        if self.config.pii and self.config.pii_input:
            events += await self._run(self._redact_prompts, body)
        return events

    def _redact_prompts(self, body) -> list[GuardEvent]:
        found: list[str] = []
        if isinstance(body, ChatCompletionRequest):
            for message in body.messages:
                if isinstance(message.content, str):
                    message.content, kinds = self.guards.redact(message.content)
                    found += kinds
                elif isinstance(message.content, list):
                    for part in message.content:
                        if isinstance(getattr(part, "text", None), str):
                            part.text, kinds = self.guards.redact(part.text)
                            found += kinds
        else:
            if isinstance(body.prompt, str):
                body.prompt, found = self.guards.redact(body.prompt)
            elif isinstance(body.prompt, list) and all(isinstance(p, str) for p in body.prompt):
                redacted = [self.guards.redact(p) for p in body.prompt]
                body.prompt = [t for t, _ in redacted]
                found = [k for _, kinds in redacted for k in kinds]
        events = [GuardEvent("pii", "redacted", sorted(set(found)), detail={"where": "prompt"})] if found else []
        self.count(events)
        return events

    @property
    def filters_output(self) -> bool:
        return self.config.output or self.config.pii

    async def filter_choices(self, choices) -> list[GuardEvent]:
        """Output guards over finished choices (non-streamed): text replaced by what is released."""
        events: list[GuardEvent] = []
        for index, choice in enumerate(choices):
            released, these, stopped = await self._run(self.guards.filter_text, choice.text)
            choice.text = released
            if stopped:
                choice.finish_reason = "content_filter"
            events += [dataclasses.replace(e, detail={**e.detail, "choice": index}) for e in these]
        self.count(events)
        return events

    def stream_guard(self, choices: int) -> StreamGuard:
        return StreamGuard(self, choices)


class StreamGuard:
    """One `OutputFilter` per choice of a streamed response."""

    def __init__(self, server: ServerGuards, choices: int) -> None:
        self.server = server
        self.filters: list[OutputFilter] = [server.guards.output_filter() for _ in range(choices)]
        self.reported = [0] * choices

    async def feed(self, index: int, text: str, final: bool) -> tuple[str, bool, list[GuardEvent]]:
        """(text to send, stopped now, new events) for new text of choice ``index``."""
        out = self.filters[index]
        was_stopped = out.stopped
        released = await self.server._run(out.feed, text, final)
        new = out.events[self.reported[index] :]
        self.reported[index] = len(out.events)
        self.server.count(new)
        return released, out.stopped and not was_stopped, new

    def stopped(self, index: int) -> bool:
        return self.filters[index].stopped

    @property
    def events(self) -> list[GuardEvent]:
        return [
            dataclasses.replace(e, detail={**e.detail, "choice": i})
            for i, f in enumerate(self.filters)
            for e in f.events
        ]


def header_value(events: Sequence[GuardEvent]) -> str:
    """The ``x-genforge-guard`` header: one ``guard=action(found)`` per distinct event."""
    return "; ".join(dict.fromkeys(e.summary() for e in events)) or "none"


def report(events: Sequence[GuardEvent]) -> dict:
    return {"events": [e.to_dict() for e in events]}


def moderation_inputs(body: dict) -> list[str]:
    """The texts of a ``/v1/moderations`` body (a string, a list of strings, or a list of
    ``{"type": "text", "text": ...}`` parts), with OpenAI-shaped 400s for anything else."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object with an 'input'")
    extra = sorted(set(body) - {"input", "model"})
    if extra:
        raise bad(f"unrecognized request argument {extra[0]!r}", extra[0])
    if "input" not in body:
        raise bad("missing required argument 'input'", "input")
    model = body.get("model")
    if model is not None and model not in MODERATION_MODELS:
        raise OpenAIError(
            404,
            f"the moderation model {model!r} does not exist; served: {', '.join(MODERATION_MODELS)}",
            "not_found_error",
            "model",
            "model_not_found",
        )
    raw = body["input"]
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise bad("'input' must be a string or a non-empty list of strings or text parts", "input")
    if len(items) > MAX_MODERATION_INPUTS:
        raise bad(f"'input' holds {len(items)} items; at most {MAX_MODERATION_INPUTS} per request", "input")
    texts = []
    for n, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif isinstance(item, dict) and item.get("type") == "image_url":
            raise bad(f"input[{n}] is an image; this server moderates text only", f"input[{n}]")
        else:
            raise bad(f"input[{n}] must be a string or a {{'type': 'text', 'text': ...}} part", f"input[{n}]")
    return texts


async def moderation_response(body: dict, server: ServerGuards | None, moderator_lock: asyncio.Lock) -> dict:
    """Answer a ``/v1/moderations`` body (the moderator loads on first use)."""
    from ..safety.moderation import MODEL_NAME, default_moderator, openai_response

    texts = moderation_inputs(body)
    moderator = server.guards.moderator if server is not None else None
    async with moderator_lock:
        results = await asyncio.to_thread(lambda: (moderator or default_moderator()).moderate_many(texts))
    return openai_response(results, MODEL_NAME)
