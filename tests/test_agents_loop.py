"""The ReAct loop with a scripted ChatModel: dispatch, errors as tool results, budgets,
stopping, the trace (written atomically) and its replay."""

from __future__ import annotations

import json
import time

import pytest

from genforge.agents import (
    Agent,
    AgentError,
    ScriptedChatModel,
    Tool,
    ToolResult,
    calculator_tool,
    read_trace,
    replay,
    run_agent,
)
from genforge.chat_models import Reply


def call(name, arguments, id=None):
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    out = {"type": "function", "function": {"name": name, "arguments": raw}}
    if id is not None:
        out["id"] = id
    return out


def acting(*calls, content="", tokens=10):
    return Reply(content=content, tool_calls=list(calls), finish_reason="tool_calls", completion_tokens=tokens)


def answer(text, tokens=5):
    return Reply(content=text, completion_tokens=tokens)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b


def explode(reason: str) -> str:
    """Fail on purpose."""
    raise RuntimeError(f"exploded: {reason}")


def test_a_tool_call_then_an_answer():
    model = ScriptedChatModel(
        [acting(call("add", {"a": 2, "b": 3}, id="c1"), content="I will add them."), answer("The sum is 5.")]
    )
    result = run_agent(model, "What is 2 + 3?", [add])
    assert result.stop_reason == "answer" and result.answer == "The sum is 5."
    assert [c.name for c in result.tool_calls] == ["add"] and result.tool_calls[0].result.content == "5"
    assert result.completion_tokens == 15 and len(result.steps) == 2
    # The second request carries the observation, paired with the call's id.
    second = model.requests[1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "tool"]
    assert second[2]["content"] == "I will add them." and second[2]["tool_calls"][0]["id"] == "c1"
    assert second[3] == {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "5"}
    # Tools were offered in OpenAI's form, with the derived schema.
    spec = model.requests[0]["tools"][0]["function"]
    assert spec["name"] == "add" and spec["parameters"]["required"] == ["a", "b"]
    assert model.requests[0]["tool_choice"] == "auto"


def test_tool_errors_come_back_as_results_and_the_loop_goes_on():
    slow = Tool.from_function(sleepy, timeout_s=0.2)
    model = ScriptedChatModel(
        [
            acting(
                call("nonexistent", {}),
                call("add", "{not json"),
                call("add", {"a": "two", "b": 3}),
                call("add", {"a": 1}),
                call("explode", {"reason": "test"}),
                call("sleepy", {"seconds": 5.0}),
                call("add", [1, 2]),
            ),
            answer("done"),
        ]
    )
    started = time.monotonic()
    result = run_agent(model, "try everything", [add, explode, slow])
    assert time.monotonic() - started < 3  # the sleeping tool was abandoned at its timeout
    assert result.stop_reason == "answer" and result.answer == "done"
    results = [c.result for c in result.tool_calls]
    assert all(r.is_error and r.content.startswith("error:") for r in results)
    unknown, not_json, wrong_type, missing, raised, timed_out, not_object = (r.content for r in results)
    assert "no tool named 'nonexistent'" in unknown and "add, explode, sleepy" in unknown
    assert "not JSON" in not_json
    assert "'two' is not of type 'integer'" in wrong_type and '"required": ["a", "b"]' in wrong_type
    assert "'b' is a required property" in missing
    assert "RuntimeError: exploded: test" in raised
    assert "did not finish within its 0.2 s timeout" in timed_out
    assert "not a JSON object" in not_object
    # Ids were filled in where the model left them out, and every call got its result message.
    tool_messages = [m for m in model.requests[1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == [f"call_1_{i}" for i in range(7)]


def sleepy(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "awake"


def test_step_budget_stops_a_model_that_never_answers():
    model = ScriptedChatModel([acting(call("add", {"a": i, "b": 1})) for i in range(10)])
    result = run_agent(model, "loop forever", [add], max_steps=3)
    assert result.stop_reason == "max_steps" and result.answer is None
    assert len(model.requests) == 3 and len(result.tool_calls) == 3  # the last reply's call still ran


def test_token_budget_caps_each_request_and_stops_the_run():
    model = ScriptedChatModel([acting(call("add", {"a": 1, "b": 1}), tokens=40) for _ in range(5)])
    result = run_agent(model, "count", [add], max_tokens=100, max_tokens_per_step=64)
    assert result.stop_reason == "max_tokens" and result.completion_tokens == 120
    # 100 left -> 64, 60 left -> 60, 20 left -> 20: never more than what is left.
    assert [r["max_tokens"] for r in model.requests] == [64, 60, 20]


def test_a_reply_cut_at_its_limit_is_not_an_answer():
    model = ScriptedChatModel([Reply(content="The answer is", finish_reason="length", completion_tokens=64)])
    result = run_agent(model, "explain", [add], max_tokens_per_step=64)
    assert result.stop_reason == "max_tokens" and result.answer is None
    assert "cut at its 64-token limit" in result.error and result.messages[-1]["content"] == "The answer is"


def test_tokens_are_estimated_when_the_backend_reports_none():
    model = ScriptedChatModel([Reply(content="x" * 400), answer("unused")])
    result = run_agent(model, "talk", [], max_tokens=50)
    assert result.stop_reason == "answer" and result.completion_tokens == 100
    assert result.trace[-2]["tokens_estimated"] is True


def test_required_tool_choice_ends_through_final_answer():
    model = ScriptedChatModel(
        [
            acting(call("calculator", {"expression": "6 * 7"})),
            acting(call("final_answer", {"answer": "42"}), call("calculator", {"expression": "1"})),
        ]
    )
    result = run_agent(model, "6 times 7?", [calculator_tool()], tool_choice="required")
    assert result.stop_reason == "answer" and result.answer == "42"
    assert [c.name for c in result.tool_calls] == ["calculator", "final_answer"]  # nothing after final_answer
    assert model.requests[0]["tool_choice"] == "required"
    assert [t["function"]["name"] for t in model.requests[0]["tools"]] == ["calculator", "final_answer"]
    assert "call final_answer" in model.requests[0]["messages"][0]["content"]


def test_model_failures_and_empty_replies_end_the_run_with_a_reason():
    result = run_agent(ScriptedChatModel([]), "anything", [add])
    assert result.stop_reason == "model_error" and "ChatModelError" in result.error
    result = run_agent(ScriptedChatModel([Reply(content="  ")]), "anything", [add])
    assert result.stop_reason == "empty_reply" and result.answer is None


def test_bad_settings_are_refused_before_any_model_call():
    model = ScriptedChatModel([])
    with pytest.raises(AgentError, match="max_steps"):
        Agent(model, [add], max_steps=0)
    with pytest.raises(AgentError, match="tool_choice"):
        Agent(model, [add], tool_choice="sometimes")
    with pytest.raises(AgentError, match="one of the tools: add"):
        Agent(model, [add], tool_choice={"type": "function", "function": {"name": "sub"}})
    with pytest.raises(AgentError, match="two tools are named 'add'"):
        Agent(model, [add, add])
    with pytest.raises(AgentError, match="ChatModel"):
        Agent(object(), [add])
    with pytest.raises(AgentError, match="task is empty"):
        Agent(model, [add]).run("  ")
    assert model.requests == []


def test_the_trace_holds_every_message_and_replays(tmp_path):
    model = ScriptedChatModel(
        [
            acting(call("add", {"a": 20, "b": 22}), call("explode", {"reason": "x"}), content="Two things."),
            answer("42"),
        ]
    )
    events = []
    path = tmp_path / "trace.jsonl"
    result = Agent(model, [add, explode], on_event=events.append).run("sum", trace_path=path)
    records = read_trace(path)
    assert records == json.loads(json.dumps(result.trace)) and events == result.trace
    assert [r["type"] for r in records] == [
        "start",
        "message",
        "message",
        "reply",
        "tool_result",
        "tool_result",
        "reply",
        "end",
    ]
    assert [r["message"] for r in records if "message" in r] == result.messages
    assert records[0]["settings"]["max_steps"] == 10 and records[0]["task"] == "sum"
    assert records[4]["arguments"] == '{"a": 20, "b": 22}' and records[4]["duration_s"] >= 0
    assert records[-1]["stop_reason"] == "answer" and records[-1]["tool_calls"] == 2
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file, renamed into place

    report = replay(path, [add, explode])
    assert report.matches, report.differences

    def wrong_add(a: int, b: int) -> int:  # a changed tool: the replay says where
        """Add, wrongly."""
        return a + b + 1

    report = replay(path, [Tool.from_function(wrong_add, name="add"), explode])
    assert not report.matches
    assert any("tool call 1 (add): the result was '42', now '43'" in d for d in report.differences)
    with pytest.raises(AgentError, match="not given for the replay: explode"):
        replay(path, [add])


def test_a_run_that_raises_still_writes_its_trace(tmp_path):
    def fail_on_tool_result(record):
        if record["type"] == "tool_result":
            raise KeyboardInterrupt

    path = tmp_path / "trace.jsonl"
    agent = Agent(ScriptedChatModel([acting(call("add", {"a": 1, "b": 1}))]), [add], on_event=fail_on_tool_result)
    with pytest.raises(KeyboardInterrupt):
        agent.run("sum", trace_path=path)
    records = read_trace(path)
    assert records[-1]["type"] == "end" and records[-1]["stop_reason"] == "interrupted"


def test_a_tool_may_report_its_own_error():
    def check(value: int) -> ToolResult:
        """Check a value."""
        return ToolResult("too big", True) if value > 3 else ToolResult("fine")

    model = ScriptedChatModel([acting(call("check", {"value": 9})), answer("ok")])
    result = run_agent(model, "check 9", [check])
    assert result.tool_calls[0].result.is_error and result.tool_calls[0].result.content == "too big"
