"""Tools from an MCP server (a small one started by the test over stdio) offered to the agent
like local tools: listing, calls, errors, timeouts, and a scripted agent run through them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from genforge.agents import MCPError, MCPServerTools, ScriptedChatModel, run_agent
from genforge.chat_models import Reply

# Starting a Python MCP server takes a second or more (the SDK's imports).
pytestmark = pytest.mark.slow
SERVER = Path(__file__).with_name("mcp_demo_server.py")


@pytest.fixture(scope="module")
def server():
    with MCPServerTools([sys.executable, str(SERVER)], timeout_s=1.0) as opened:
        yield opened


def test_tools_are_listed_with_their_schemas(server):
    tools = {t.name: t for t in server.tools}
    assert set(tools) == {"multiply", "text_reverse", "fail", "nap"}  # '.' is not allowed in a function name
    multiply = tools["multiply"]
    assert multiply.description == "Multiply two numbers."
    assert multiply.parameters["required"] == ["a", "b"]
    assert multiply.parameters["properties"]["a"]["type"] == "number"
    assert multiply.spec()["function"]["name"] == "multiply"


def test_calls_round_trip_and_errors_come_back_as_results(server):
    tools = {t.name: t for t in server.tools}
    assert json.loads(tools["multiply"]({"a": 6, "b": 7}).content) == 42
    assert tools["text_reverse"]({"text": "agent"}).content == "tnega"  # called by its MCP name
    # Arguments are checked here against the server's schema: no round trip for a bad call.
    bad = tools["multiply"]({"a": "six"})
    assert (
        bad.is_error and "'b' is a required property" in bad.content and "'six' is not of type 'number'" in bad.content
    )
    failed = tools["fail"]({"reason": "test"})
    assert failed.is_error and "fail" in failed.content
    unknown = server.call("no_such_tool", {})
    assert unknown.is_error and "no_such_tool" in unknown.content
    started = time.monotonic()
    slow = tools["nap"]({"seconds": 2.5})
    assert slow.is_error and "did not answer within 1 s" in slow.content
    assert time.monotonic() - started < 2.4
    assert tools["nap"]({"seconds": 0}).content == "slept 0.0 s"  # the session survived the timeout


def test_an_agent_uses_mcp_tools_like_local_ones(server):
    model = ScriptedChatModel(
        [
            Reply(
                tool_calls=[
                    {"id": "m1", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 3, "b": 5}'}}
                ]
            ),
            Reply(content="15"),
        ]
    )
    result = run_agent(model, "3 times 5?", [server])  # the server stands for its tools
    assert result.answer == "15" and json.loads(result.tool_calls[0].result.content) == 15
    assert {t["function"]["name"] for t in model.requests[0]["tools"]} == {"multiply", "text_reverse", "fail", "nap"}


def test_a_server_that_does_not_start_is_reported_with_its_stderr():
    command = [sys.executable, "-c", "import sys; print('cannot start: missing config', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(MCPError, match="could not start or list the MCP server") as caught:
        MCPServerTools(command, connect_timeout_s=20).start()
    assert "cannot start: missing config" in str(caught.value)
    with pytest.raises(MCPError, match="empty"):
        MCPServerTools("")
