"""OpenAI's response payloads: choices, usage, logprobs, and the server-sent events of a stream.

Everything here is a pure function of what the engine produced (`Choice`, one per sequence)
and the prepared request, so each payload can be checked without a server. Chat and legacy
completions differ in shape (``message``/``delta`` against ``text``; a ``content`` list of
token entries against parallel lists), and the ``kind`` argument (``"chat.completion"`` or
``"text_completion"``) picks one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..generate.tool_calls import ArgumentsDelta, ContentDelta, ToolCallParser, ToolCallStart, parse_tool_calls
from .engine import RequestOutput
from .errors import OpenAIError
from .preparation import Prepared

__all__ = [
    "Choice",
    "StreamChunks",
    "sse",
    "usage",
    "token_text",
    "logprobs_payload",
    "prompt_logprobs_payload",
    "full_response",
    "tool_call_deltas",
    "CHAT",
    "COMPLETION",
    "DONE_EVENT",
]

CHAT = "chat.completion"
COMPLETION = "text_completion"
DONE_EVENT = "data: [DONE]\n\n"


@dataclass
class Choice:
    """What one sequence has produced so far."""

    prompt_index: int
    prompt_logprobs: list[Any] | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, output: RequestOutput, score_only: bool = False) -> RequestOutput:
        """Take in one engine output; returns it as the client should see it. ``score_only``:
        the token generated only to run the prompt (``max_tokens`` 0 with ``echo``) is not shown."""
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        if output.finished:
            self.finish_reason = output.finish_reason
        if score_only:
            reason = output.finish_reason if output.finish_reason == "abort" else "length"
            output = dataclasses.replace(
                output,
                token_ids=[],
                text="",
                logprobs=None,
                completion_tokens=0,
                finish_reason=reason if output.finished else None,
            )
            self.finish_reason = output.finish_reason
        self.text += output.text
        self.token_ids.extend(output.token_ids)
        if output.logprobs:
            self.logprobs.extend(output.logprobs)
        self.prompt_tokens, self.completion_tokens = output.prompt_tokens, output.completion_tokens
        self.cached_tokens = output.cached_prompt_tokens
        return output


def sse(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prepared: Prepared, choices: Sequence[Choice]) -> dict:
    # OpenAI counts each prompt once, however many choices it has.
    prompt = sum(len(p) for p in prepared.prompts)
    cached = sum(choices[i * prepared.n].cached_tokens for i in range(len(prepared.prompts)))
    completion = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def token_text(tokenizer, token_id: int) -> str:
    # Logprobs are of the raw model distribution, whose rows can outnumber the tokenizer's
    # vocabulary (padded embedding tables): such a row has no text, so it is named by its id.
    if token_id >= len(tokenizer):
        return f"<|token_id:{token_id}|>"
    return tokenizer.decode([token_id])


def _finite(value: float) -> float:
    # JSON has no -Infinity; OpenAI reports impossible tokens as -9999.0.
    return float(value) if math.isfinite(value) else -9999.0


def _alternatives(top, tokenizer) -> dict[str, float]:
    # Two ids can decode to the same text; keep the likelier one (the first, as ranked).
    alternatives: dict[str, float] = {}
    for tid, lp in top:
        alternatives.setdefault(token_text(tokenizer, tid), _finite(lp))
    return alternatives


def logprobs_payload(kind: str, entries, tokenizer, text_offset: int = 0) -> dict:
    """OpenAI's logprobs object for some tokens: the chat shape (``content``) or the legacy
    completions shape (parallel lists)."""
    if kind == CHAT:
        content = []
        for e in entries:
            token = token_text(tokenizer, e.token_id)
            content.append(
                {
                    "token": token,
                    "logprob": _finite(e.logprob),
                    "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [
                        {
                            "token": (t := token_text(tokenizer, tid)),
                            "logprob": _finite(lp),
                            "bytes": list(t.encode("utf-8")),
                        }
                        for tid, lp in e.top
                    ],
                }
            )
        return {"content": content}
    tokens, offsets, position = [], [], text_offset
    for e in entries:
        token = token_text(tokenizer, e.token_id)
        tokens.append(token)
        offsets.append(position)
        position += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(e.logprob) for e in entries],
        "top_logprobs": [_alternatives(e.top, tokenizer) for e in entries],
        "text_offset": offsets,
    }


def prompt_logprobs_payload(prompt_ids: Sequence[int], entries, tokenizer) -> dict:
    """The completions logprobs lists for an echoed prompt: its first token has no logprob
    (nothing comes before it), as in OpenAI's responses. ``entries`` None: tokens only."""
    tokens = [token_text(tokenizer, t) for t in prompt_ids]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    token_logprobs: list[float | None] = [None] * len(tokens)
    top: list[dict | None] = [None] * len(tokens)
    for i, entry in enumerate(entries or []):
        if entry is not None and i < len(tokens):
            token_logprobs[i] = _finite(entry.logprob)
            top[i] = _alternatives(entry.top, tokenizer)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def full_response(kind: str, request_id: str, prepared: Prepared, choices: Sequence[Choice], tokenizer) -> dict:
    """The whole (non-streamed) response body, every choice finished."""
    out = []
    for index, choice in enumerate(choices):
        lp = None
        prompt_text = prepared.prompt_texts[choice.prompt_index]
        if prepared.logprobs is not None:
            lp = logprobs_payload(kind, choice.logprobs, tokenizer, len(prompt_text))
            if prepared.echo:
                head = prompt_logprobs_payload(prepared.prompts[choice.prompt_index], choice.prompt_logprobs, tokenizer)
                lp = {key: head[key] + lp[key] for key in lp}
        text = prompt_text + choice.text if prepared.echo else choice.text
        if kind == CHAT:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            finish_reason = choice.finish_reason
            if prepared.tool_format is not None:
                parsed = parse_tool_calls(text, prepared.tool_format)
                message["content"] = parsed.content
                if parsed.tool_calls:
                    message["tool_calls"] = parsed.tool_calls
                    finish_reason = _with_calls(finish_reason)
            out.append({"index": index, "message": message, "logprobs": lp, "finish_reason": finish_reason})
        else:
            out.append({"index": index, "text": text, "logprobs": lp, "finish_reason": choice.finish_reason})
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": prepared.model,
        "system_fingerprint": None,
        "choices": out,
        "usage": usage(prepared, choices),
    }


def _with_calls(finish_reason: str | None) -> str | None:
    # A reply that ends by itself after making calls ends for them (OpenAI's "tool_calls");
    # one cut by max_tokens stays "length".
    return "tool_calls" if finish_reason == "stop" else finish_reason


def tool_call_deltas(events) -> dict[str, Any]:
    """A chat ``delta`` from tool-call parser events: ``content`` text, and ``tool_calls``
    entries by ``index``, the first of each call with its ``id``, ``type`` and ``function.name``,
    the others with ``function.arguments`` pieces (how the `openai` client joins them)."""
    delta: dict[str, Any] = {}
    calls: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, ContentDelta):
            delta["content"] = delta.get("content", "") + event.text
        elif isinstance(event, ToolCallStart):
            calls.append(
                {
                    "index": event.index,
                    "id": event.id,
                    "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                }
            )
        elif isinstance(event, ArgumentsDelta):
            if calls and calls[-1]["index"] == event.index:
                calls[-1]["function"]["arguments"] += event.text
            else:
                calls.append({"index": event.index, "function": {"arguments": event.text}})
    if calls:
        delta["tool_calls"] = calls
    return delta


class StreamChunks:
    """The server-sent events of one streamed response, chunk by chunk.

    Chat streams open every choice with a chunk holding only the role, as OpenAI does; an
    echoed prompt comes as its choice's first chunk, with the prompt's logprobs; with
    ``include_usage`` every chunk carries ``"usage": null`` and a last one the usage.
    """

    def __init__(self, kind: str, request_id: str, prepared: Prepared, choices: Sequence[Choice], tokenizer) -> None:
        self.kind, self.request_id, self.prepared, self.choices = kind, request_id, prepared, choices
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.chunk_type = "chat.completion.chunk" if kind == CHAT else "text_completion"
        self.offsets = [len(prepared.prompt_texts[c.prompt_index]) for c in choices]  # text_offset of the next token
        self.echoed: set[int] = set()
        # With tools, each choice's text goes through its own parser into content and calls.
        self.parsers = (
            [ToolCallParser(prepared.tool_format) for _ in choices]
            if kind == CHAT and prepared.tool_format is not None
            else None
        )

    def _chunk(self, choice_list: list[dict], extra: dict | None = None) -> str:
        usage_field = {"usage": None} if self.prepared.include_usage else {}
        return sse(
            {
                "id": self.request_id,
                "object": self.chunk_type,
                "created": self.created,
                "model": self.prepared.model,
                "system_fingerprint": None,
                "choices": choice_list,
                **usage_field,
                **(extra or {}),
            }
        )

    def opening(self) -> Iterator[str]:
        """What is sent before any output: each chat choice's role."""
        if self.kind == CHAT:
            for k in range(len(self.choices)):
                yield self._chunk(
                    [
                        {
                            "index": k,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )

    def output(self, index: int, output: RequestOutput, extra: dict | None = None) -> Iterator[str]:
        """The events for one engine output of choice ``index`` (as `Choice.add` returned it);
        an output the server aborted raises a 503 `OpenAIError` instead. ``extra``: top-level
        fields for the chunk carrying this output (the guards' report)."""
        prepared = self.prepared
        if prepared.echo and index not in self.echoed:
            # The prompt first, with its logprobs, which come with a choice's first output.
            self.echoed.add(index)
            choice = self.choices[index]
            lp = None
            if prepared.logprobs is not None:
                lp = prompt_logprobs_payload(
                    prepared.prompts[choice.prompt_index], choice.prompt_logprobs, self.tokenizer
                )
            yield self._chunk(
                [
                    {
                        "index": index,
                        "text": prepared.prompt_texts[choice.prompt_index],
                        "logprobs": lp,
                        "finish_reason": None,
                    }
                ]
            )
        if not (output.text or output.finished or output.logprobs):
            return
        if output.finished and output.finish_reason == "abort":
            raise OpenAIError(503, "the request was aborted by the server (shutting down)", "server_error")
        entry: dict[str, Any] = {"index": index, "finish_reason": output.finish_reason if output.finished else None}
        lp = (
            logprobs_payload(self.kind, output.logprobs, self.tokenizer, self.offsets[index])
            if output.logprobs
            else None
        )
        if output.logprobs and self.kind != CHAT:
            self.offsets[index] += sum(len(t) for t in lp["tokens"])
        if self.kind == CHAT and self.parsers is not None:
            parser = self.parsers[index]
            events = parser.feed(output.text) + (parser.finish() if output.finished else [])
            entry["delta"] = tool_call_deltas(events)
            if output.finished and parser.calls:
                entry["finish_reason"] = _with_calls(entry["finish_reason"])
            if not (entry["delta"] or output.finished or output.logprobs):
                return  # everything new is held back until the parser can tell what it is
        elif self.kind == CHAT:
            entry["delta"] = {"content": output.text} if output.text else {}
        else:
            entry["text"] = output.text
        entry["logprobs"] = lp
        yield self._chunk([entry], extra)

    def closing(self) -> Iterator[str]:
        """The usage chunk, when asked for (``stream_options.include_usage``)."""
        if self.prepared.include_usage:
            yield sse(
                {
                    "id": self.request_id,
                    "object": self.chunk_type,
                    "created": self.created,
                    "model": self.prepared.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage(self.prepared, self.choices),
                }
            )
