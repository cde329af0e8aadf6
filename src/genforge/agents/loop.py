"""The agent loop: ReAct (Yao et al. 2023, "ReAct: Synergizing Reasoning and Acting in Language
Models") over native tool calls.

Each step the model is sent the conversation and offered the tools; its reply is a thought
(the reply's text) and, usually, actions (its `tool_calls`). Every call is checked and run, and
its result (the observation) goes back as a `tool` message; then the next step. The loop ends
when

- the model replies without calling a tool: the reply is the answer (`stop_reason="answer"`);
  with `final_answer_tool` (on by default under `tool_choice="required"`, where the model
  must call a tool every step), a call to `final_answer` ends it the same way;
- `max_steps` model calls have been made (`"max_steps"`), or the replies' tokens reach
  `max_tokens` (`"max_tokens"`); budgets are checked before each model call, so the tool
  calls of the last reply still run and their results are in the trace. A reply cut at its
  token limit without a tool call also ends the run as `"max_tokens"`: its text is not a
  finished answer (it stays in the trace);
- the model itself fails (`"model_error"`, the error is kept) or replies with nothing
  (`"empty_reply"`); an exception from outside the loop's care (Ctrl-C, a failing `on_event`)
  is recorded as `"interrupted"` in the trace and raised.

Tool failures never end the loop: an unknown tool, arguments that are not JSON or do not
match the schema, an exception and a timeout all come back to the model as tool results
beginning with "error:", so it can correct itself.

Trace. Every event is a JSON record: the start (task, tools, settings), each message, each
reply (with the request's token limit, finish reason, tokens and time) and each tool call
(arguments, result, error flag, time), and the end (stop reason, answer, totals). A record
that adds a message to the conversation carries it under "message", so the conversation is
the trace's messages in order. The trace is written as JSON Lines atomically when the run
ends, however it ends. `replay` re-runs a trace: the recorded replies are played back to the
same tools, and every tool result must come out the same.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..chat_models import ChatModel, ChatModelError, Reply, tool_arguments
from .tools import Tool, ToolDefinitionError, ToolResult, as_tools

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful assistant that solves the user's task step by step. Before each action, think "
    "briefly about what you know and what you need next. Use the tools when they help: read each tool "
    "result before deciding the next step, and fix your call when a result begins with 'error:'."
)
ANSWER_IN_TEXT = " When you have the answer, reply with it in plain text and call no tool."
ANSWER_WITH_TOOL = " When you have the answer, call final_answer with it."
FINAL_ANSWER = "final_answer"
TRACE_VERSION = 1
STOP_REASONS = ("answer", "max_steps", "max_tokens", "model_error", "empty_reply", "interrupted")


class AgentError(ValueError):
    """Agent settings or a trace that cannot be used (said before any model call)."""


def make_final_answer_tool() -> Tool:
    """The tool that ends a run under `tool_choice="required"`: its argument is the answer."""

    def final_answer(answer: str) -> str:
        """Give the final answer to the task. Call this once you know the answer; it ends the work.

        Args:
            answer: the complete answer for the user.
        """
        return answer

    return Tool.from_function(final_answer)


@dataclass
class ToolCallRecord:
    """One action and its observation."""

    id: str
    name: str
    arguments: str  # as the model wrote them (a JSON string)
    result: ToolResult


@dataclass
class AgentStep:
    """One model call: the reply (thought and actions) and the tool calls it made."""

    number: int
    reply: Reply
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    duration_s: float = 0.0


@dataclass
class AgentResult:
    """How a run ended. `answer` is None unless `stop_reason == "answer"`; `messages` is the
    whole conversation; `trace` the records written to the trace file."""

    answer: str | None
    stop_reason: str
    steps: list[AgentStep]
    messages: list[dict[str, Any]]
    completion_tokens: int
    duration_s: float
    trace: list[dict[str, Any]]
    error: str | None = None

    @property
    def tool_calls(self) -> list[ToolCallRecord]:
        return [call for step in self.steps for call in step.tool_calls]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AgentError(f"{name} must be a positive integer, got {value!r}")


def _estimated_tokens(reply: Reply) -> int:
    """Tokens of a reply whose backend reported none (an endpoint without usage): about four
    characters a token, so that the token budget still binds."""
    text = reply.content + "".join(json.dumps(c, ensure_ascii=False) for c in reply.tool_calls)
    return max(1, math.ceil(len(text) / 4)) if text else 0


class Agent:
    """A ReAct agent: a `ChatModel` and tools (see the module docstring).

    tools: `Tool`s or plain functions with type hints (turned into tools).
    max_steps: model calls at most; max_tokens: completion tokens over the whole run;
    max_tokens_per_step: the cap of one reply (lowered to what is left of max_tokens).
    tool_choice: "auto", "required", "none" or {"type": "function", "function": {"name": ...}}.
    final_answer_tool: offer `final_answer` (None: only under tool_choice="required").
    on_event: called with each trace record as it is made (the CLI prints them).
    """

    def __init__(
        self,
        model: ChatModel,
        tools: Sequence[Tool | Callable[..., Any]] = (),
        *,
        system_prompt: str | None = None,
        max_steps: int = 10,
        max_tokens: int = 4096,
        max_tokens_per_step: int = 512,
        tool_choice: str | Mapping[str, Any] = "auto",
        temperature: float = 0.0,
        seed: int | None = None,
        final_answer_tool: bool | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if not callable(getattr(model, "chat", None)):
            raise AgentError(f"the model must be a ChatModel (with a chat method), got {type(model).__name__}")
        _check_positive_int("max_steps", max_steps)
        _check_positive_int("max_tokens", max_tokens)
        _check_positive_int("max_tokens_per_step", max_tokens_per_step)
        if not temperature >= 0:
            raise AgentError(f"temperature must be >= 0, got {temperature!r}")
        try:
            tools = as_tools(tools)
        except ToolDefinitionError as err:
            raise AgentError(str(err)) from None
        if final_answer_tool is None:
            final_answer_tool = tool_choice == "required"
        if final_answer_tool:
            if any(t.name == FINAL_ANSWER for t in tools):
                raise AgentError(f"a tool is already named {FINAL_ANSWER!r}, which the agent uses to end a run")
            tools = [*tools, make_final_answer_tool()]
        names = [t.name for t in tools]
        if isinstance(tool_choice, Mapping):
            chosen = (tool_choice.get("function") or {}).get("name")
            if tool_choice.get("type") != "function" or chosen not in names:
                raise AgentError(
                    f"tool_choice {dict(tool_choice)!r} must be {{'type': 'function', 'function': {{'name': N}}}} "
                    f"with N one of the tools: {', '.join(names) or '(none)'}"
                )
        elif tool_choice not in ("auto", "required", "none"):
            raise AgentError(f"tool_choice must be 'auto', 'required', 'none' or a named function, got {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise AgentError("tool_choice='required' needs at least one tool")
        self.model, self.tools = model, tools
        self.tools_by_name = {t.name: t for t in tools}
        self.final_answer_tool = bool(final_answer_tool)
        if system_prompt is None:
            system_prompt = DEFAULT_SYSTEM_PROMPT + (ANSWER_WITH_TOOL if final_answer_tool else ANSWER_IN_TEXT)
        self.system_prompt = system_prompt
        self.max_steps, self.max_tokens, self.max_tokens_per_step = max_steps, max_tokens, max_tokens_per_step
        self.tool_choice, self.temperature, self.seed = tool_choice, temperature, seed
        self.on_event = on_event

    def settings(self) -> dict[str, Any]:
        """What a replay needs to run the same loop (recorded in the trace's start record)."""
        return {
            "max_steps": self.max_steps,
            "max_tokens": self.max_tokens,
            "max_tokens_per_step": self.max_tokens_per_step,
            "tool_choice": self.tool_choice,
            "temperature": self.temperature,
            "seed": self.seed,
            "final_answer_tool": self.final_answer_tool,
        }

    # -- running ----------------------------------------------------------------------------
    def run(self, task: str, *, trace_path: str | os.PathLike | None = None) -> AgentResult:
        """Solve `task`; the trace is written to `trace_path` (JSONL, atomically) however the run ends."""
        if not isinstance(task, str) or not task.strip():
            raise AgentError("the task is empty; say what the agent should do")
        run = _Run(self, task)
        try:
            run.loop()
        except BaseException as err:  # Ctrl-C or a bug: the trace still says how far it got
            run.finish("interrupted", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            if trace_path is not None:
                write_trace(trace_path, run.records)
        return run.result()


class _Run:
    """The state of one `Agent.run`."""

    def __init__(self, agent: Agent, task: str) -> None:
        self.agent = agent
        self.started = time.monotonic()
        self.records: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []
        self.steps: list[AgentStep] = []
        self.tokens = 0
        self.answer: str | None = None
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.emit(
            {
                "type": "start",
                "version": TRACE_VERSION,
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "task": task,
                "model": _describe_model(agent.model),
                "tools": [t.spec() for t in agent.tools],
                "settings": agent.settings(),
            }
        )
        if agent.system_prompt:
            self.add_message({"role": "system", "content": agent.system_prompt})
        self.add_message({"role": "user", "content": task})

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.agent.on_event is not None:
            self.agent.on_event(record)

    def add_message(self, message: dict[str, Any], **record: Any) -> None:
        self.messages.append(message)
        self.emit({"type": record.pop("type", "message"), **record, "message": message})

    def finish(self, stop_reason: str, answer: str | None = None, error: str | None = None) -> None:
        if self.stop_reason is not None:
            return
        self.stop_reason, self.answer, self.error = stop_reason, answer, error
        self.emit(
            {
                "type": "end",
                "stop_reason": stop_reason,
                "answer": answer,
                "error": error,
                "steps": len(self.steps),
                "tool_calls": sum(len(s.tool_calls) for s in self.steps),
                "completion_tokens": self.tokens,
                "duration_s": round(time.monotonic() - self.started, 6),
            }
        )

    def loop(self) -> None:
        agent = self.agent
        specs = [t.spec() for t in agent.tools] or None
        while self.stop_reason is None:
            if len(self.steps) >= agent.max_steps:
                return self.finish("max_steps")
            left = agent.max_tokens - self.tokens
            if left <= 0:
                return self.finish("max_tokens")
            step_tokens = min(agent.max_tokens_per_step, left)
            started = time.monotonic()
            try:
                reply = agent.model.chat(
                    self.messages,
                    max_tokens=step_tokens,
                    temperature=agent.temperature,
                    seed=agent.seed,
                    tools=specs,
                    tool_choice=agent.tool_choice if specs else None,
                )
            except Exception as err:  # the model or endpoint failed: end the run, keep the trace
                return self.finish("model_error", error=f"{type(err).__name__}: {err}")
            step = AgentStep(len(self.steps) + 1, reply, duration_s=time.monotonic() - started)
            self.steps.append(step)
            tokens, estimated = reply.completion_tokens, False
            if tokens <= 0:
                tokens, estimated = _estimated_tokens(reply), True
            self.tokens += tokens
            calls = [_normalized_call(c, step.number, i) for i, c in enumerate(reply.tool_calls)]
            message: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if calls:
                message["tool_calls"] = calls
            self.add_message(
                message,
                type="reply",
                step=step.number,
                max_tokens=step_tokens,
                finish_reason=reply.finish_reason,
                completion_tokens=tokens,
                tokens_estimated=estimated,
                duration_s=round(step.duration_s, 6),
            )
            if not calls:
                if reply.finish_reason == "length":  # cut off: neither a finished answer nor a call
                    return self.finish("max_tokens", error=f"the reply was cut at its {step_tokens}-token limit")
                if reply.content.strip():
                    return self.finish("answer", answer=reply.content)
                return self.finish("empty_reply")
            for call in calls:
                record = self.act(step, call)
                if record.name == FINAL_ANSWER and agent.final_answer_tool and not record.result.is_error:
                    return self.finish("answer", answer=record.result.content)

    def act(self, step: AgentStep, call: dict[str, Any]) -> ToolCallRecord:
        """Run one tool call (never raises) and add its result to the conversation."""
        function = call.get("function") or {}
        name, raw = function.get("name") or "", function.get("arguments")
        raw_text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
        tool = self.agent.tools_by_name.get(name)
        if tool is None:
            available = ", ".join(self.agent.tools_by_name) or "(none)"
            result = ToolResult(f"error: there is no tool named {name!r}; the tools are: {available}", True)
        else:
            try:
                arguments = tool_arguments(call)
            except ChatModelError as err:
                result = ToolResult(f"error: {err}; send the arguments as one JSON object", True)
            else:
                result = tool(arguments)
        record = ToolCallRecord(call["id"], name, raw_text, result)
        step.tool_calls.append(record)
        self.add_message(
            {"role": "tool", "tool_call_id": call["id"], "name": name, "content": result.content},
            type="tool_result",
            step=step.number,
            id=call["id"],
            name=name,
            arguments=raw_text,
            is_error=result.is_error,
            duration_s=round(result.duration_s, 6),
        )
        return record

    def result(self) -> AgentResult:
        return AgentResult(
            answer=self.answer,
            stop_reason=self.stop_reason or "model_error",
            steps=self.steps,
            messages=self.messages,
            completion_tokens=self.tokens,
            duration_s=time.monotonic() - self.started,
            trace=self.records,
            error=self.error,
        )


def _normalized_call(call: Mapping[str, Any], step: int, index: int) -> dict[str, Any]:
    """A tool call in OpenAI's form with an id (some backends leave it out; the result message needs it)."""
    call = dict(call)
    function = dict(call.get("function") or {})
    if "arguments" not in function or function["arguments"] is None:
        function["arguments"] = "{}"
    call["function"] = function
    call["type"] = call.get("type") or "function"
    call["id"] = call.get("id") or f"call_{step}_{index}"
    return call


def _describe_model(model: Any) -> str:
    name = type(model).__name__
    detail = getattr(model, "model", None)
    return f"{name}({detail})" if isinstance(detail, str) else name


def run_agent(
    model: ChatModel, task: str, tools: Sequence[Tool | Callable[..., Any]] = (), **options: Any
) -> AgentResult:
    """`Agent(model, tools, **options).run(task)`, with `trace_path` passed to run."""
    trace_path = options.pop("trace_path", None)
    return Agent(model, tools, **options).run(task, trace_path=trace_path)


# ---------------------------------------------------------------------------------- traces
def write_trace(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """The records as JSON Lines, written atomically (a crash leaves the old file or the new one)."""
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    atomic_write_text(path, text)


def read_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A trace's records; AgentError when the file is not a genforge agent trace."""
    from ..jsonl import json_objects

    with open(path, encoding="utf-8") as handle:
        records = [record for _, record in json_objects(handle, str(path), AgentError)]
    if not records or records[0].get("type") != "start":
        raise AgentError(f"{path} is not an agent trace: its first record is not a 'start' record")
    if records[0].get("version") != TRACE_VERSION:
        raise AgentError(f"{path} is a version {records[0].get('version')} trace; this genforge reads version 1")
    return records


class ScriptedChatModel:
    """A `ChatModel` that returns pre-set replies in order and records every request; for
    replaying traces and for testing agents exactly. Raises ChatModelError when it runs out."""

    def __init__(self, replies: Sequence[Reply | str | Mapping[str, Any]]) -> None:
        self.replies = [_as_reply(r) for r in replies]
        self.requests: list[dict[str, Any]] = []

    def chat(self, messages, *, max_tokens=256, temperature=0.0, stop=(), seed=None, tools=None, tool_choice=None):
        self.requests.append(
            {
                "messages": json.loads(json.dumps(list(messages), default=str)),
                "max_tokens": max_tokens,
                "tools": tools,
                "tool_choice": tool_choice,
            }
        )
        if len(self.requests) > len(self.replies):
            raise ChatModelError(
                f"the script has {len(self.replies)} replies and a reply {len(self.requests)} was asked for"
            )
        return self.replies[len(self.requests) - 1]

    def sample_replies(self, messages, n, **options):
        return [self.chat(messages, **options) for _ in range(n)]

    def complete(self, prompt, max_tokens=256, **options):
        return self.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens).content


def _as_reply(reply: Reply | str | Mapping[str, Any]) -> Reply:
    if isinstance(reply, Reply):
        return reply
    if isinstance(reply, str):
        return Reply(content=reply)
    return Reply(
        content=reply.get("content") or "",
        tool_calls=list(reply.get("tool_calls") or []),
        finish_reason=reply.get("finish_reason", "stop"),
        completion_tokens=int(reply.get("completion_tokens", 0)),
    )


@dataclass
class ReplayReport:
    """A trace replayed: `matches` when every tool result, the stop reason and the answer came
    out as recorded; `differences` says where they did not."""

    matches: bool
    differences: list[str]
    result: AgentResult


def _recorded_replies(records: Sequence[Mapping[str, Any]]) -> list[Reply]:
    replies = []
    for record in records:
        if record.get("type") == "reply":
            message = record["message"]
            replies.append(
                Reply(
                    content=message.get("content") or "",
                    tool_calls=list(message.get("tool_calls") or []),
                    finish_reason=record.get("finish_reason", "stop"),
                    # An estimate is recomputed the same way on replay: pass 0 again.
                    completion_tokens=0 if record.get("tokens_estimated") else int(record.get("completion_tokens", 0)),
                )
            )
    return replies


def replay(
    trace: str | os.PathLike | Sequence[Mapping[str, Any]], tools: Sequence[Tool | Callable[..., Any]]
) -> ReplayReport:
    """Re-run a trace against its recorded replies with `tools` (the same tools, rebuilt), and
    compare: each tool call's name, arguments, result and error flag, then the stop reason and
    the answer. Timings are not compared."""
    records = read_trace(trace) if isinstance(trace, (str, os.PathLike, Path)) else [dict(r) for r in trace]
    start = records[0]
    settings = dict(start.get("settings") or {})
    offered = {spec["function"]["name"] for spec in start.get("tools") or []}
    given = {t.name for t in as_tools(tools)}
    if settings.get("final_answer_tool"):
        given.add(FINAL_ANSWER)
    missing = sorted(offered - given)
    if missing:
        raise AgentError(f"the trace used tools that were not given for the replay: {', '.join(missing)}")
    system = next(
        (r["message"]["content"] for r in records if r.get("type") == "message" and r["message"]["role"] == "system"),
        "",
    )
    agent = Agent(ScriptedChatModel(_recorded_replies(records)), tools, system_prompt=system, **settings)
    result = agent.run(start["task"])
    differences = []
    recorded = [r for r in records if r.get("type") == "tool_result"]
    replayed = [r for r in result.trace if r.get("type") == "tool_result"]
    for number, (old, new) in enumerate(zip(recorded, replayed), 1):
        for key in ("name", "arguments", "is_error"):
            if old.get(key) != new.get(key):
                differences.append(
                    f"tool call {number} ({old.get('name')}): {key} was {old.get(key)!r}, now {new.get(key)!r}"
                )
        if old["message"]["content"] != new["message"]["content"]:
            differences.append(
                f"tool call {number} ({old.get('name')}): the result was {old['message']['content']!r:.200}, "
                f"now {new['message']['content']!r:.200}"
            )
    if len(recorded) != len(replayed):
        differences.append(f"the trace has {len(recorded)} tool calls, the replay made {len(replayed)}")
    end = next((r for r in reversed(records) if r.get("type") == "end"), None)
    if end is None:
        differences.append("the trace has no end record (the recorded run was cut off)")
    else:
        for key, now in (("stop_reason", result.stop_reason), ("answer", result.answer)):
            if end.get(key) != now:
                differences.append(f"{key} was {end.get(key)!r}, now {now!r}")
    return ReplayReport(not differences, differences, result)


__all__ = [
    "Agent",
    "AgentError",
    "AgentResult",
    "AgentStep",
    "DEFAULT_SYSTEM_PROMPT",
    "ReplayReport",
    "STOP_REASONS",
    "ScriptedChatModel",
    "ToolCallRecord",
    "make_final_answer_tool",
    "read_trace",
    "replay",
    "run_agent",
    "write_trace",
]
