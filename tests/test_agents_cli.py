"""`genforge agent run|replay` end to end against a scripted OpenAI-compatible endpoint (a
small FastAPI app that returns pre-set replies, served by uvicorn through the openai client)."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from live_server import LiveServer

SCRIPT = [
    {
        "content": "I should compute the product, then check the notes.",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "6 * 7"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'},
            },
        ],
        "tokens": 30,
    },
    {"content": "The answer is 42.", "tokens": 6},
]


def scripted_app(script, seen):
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0, "owned_by": "tests"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        reply = script[min(len(seen), len(script)) - 1]
        message = {"role": "assistant", "content": reply.get("content")}
        if reply.get("tool_calls"):
            message["tool_calls"] = reply["tool_calls"]
        return {
            "id": f"chatcmpl-{len(seen)}",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls" if reply.get("tool_calls") else "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": reply["tokens"], "total_tokens": 10 + reply["tokens"]},
        }

    return app


@pytest.fixture(scope="module")
def endpoint():
    seen = []
    with LiveServer(scripted_app(SCRIPT, seen)) as live:
        live.seen = seen
        yield live


@pytest.fixture
def main(monkeypatch):
    """`genforge.cli.main`, with `agent` registered if genforge.cli does not list it yet."""
    from genforge import cli as top
    from genforge.agents import cli as agents_cli

    if agents_cli not in top.SUBSYSTEMS:
        monkeypatch.setattr(top, "SUBSYSTEMS", (*top.SUBSYSTEMS, agents_cli))
    return top.main


def test_run_streams_steps_prints_the_answer_and_replays(main, endpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("remember: the answer is a product\n")
    trace = tmp_path / "run.jsonl"
    endpoint.seen.clear()
    status = main(
        [
            "agent",
            "run",
            "What is six times seven?",
            "--endpoint",
            endpoint.url + "/v1",
            "--tools",
            f"calculator,files:{tmp_path}",
            "--trace",
            str(trace),
            "--max-tokens",
            "500",
        ]
    )
    out, err = capsys.readouterr()
    assert status == 0 and out == "The answer is 42.\n"
    assert "I should compute the product" in err and "→ calculator" in err and '"6 * 7"' in err
    assert "← calculator" in err and "← read_file" in err and "remember: the answer is a product" in err
    assert "stopped: answer" in err and "2 steps, 2 tool calls, 36 tokens" in err
    # What the endpoint was sent: the tools, the model it serves, the token budget per step.
    first, second = endpoint.seen
    assert first["model"] == "scripted" and first["tool_choice"] == "auto" and first["max_tokens"] == 500
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator", "read_file", "list_files"]
    assert second["max_tokens"] == 470
    tool_messages = [m for m in second["messages"] if m["role"] == "tool"]
    assert [(m["tool_call_id"], m["content"]) for m in tool_messages] == [
        ("call_a", "42"),
        ("call_b", "    1| remember: the answer is a product"),
    ]
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert records[0]["type"] == "start" and records[-1]["stop_reason"] == "answer"

    assert main(["agent", "replay", str(trace), "--tools", f"calculator,files:{tmp_path}"]) == 0
    assert capsys.readouterr().out == "replay matches: 2 replies, 2 tool results identical\n"
    (tmp_path / "notes.txt").write_text("changed\n")
    assert main(["agent", "replay", str(trace), "--tools", f"calculator,files:{tmp_path}"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("replay differs in 1 place(s):") and "tool call 2 (read_file): the result was" in out
    assert main(["agent", "replay", str(trace), "--tools", "calculator"]) == 2
    assert "not given for the replay: list_files, read_file" in capsys.readouterr().err


def test_run_stops_at_the_step_budget_with_status_1(main, endpoint, tmp_path, capsys):
    endpoint.seen.clear()
    status = main(
        [
            "agent",
            "run",
            "task",
            "--endpoint",
            endpoint.url + "/v1",
            "--endpoint-model",
            "scripted",
            "--tools",
            f"calculator,files:{tmp_path}",
            "--max-steps",
            "1",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert status == 1 and summary["stop_reason"] == "max_steps" and summary["answer"] is None
    assert summary["steps"] == 1 and summary["tool_calls"] == 2 and len(endpoint.seen) == 1
    assert "stopped: max_steps" in err


def test_bad_flags_are_refused_before_any_work(main, endpoint, capsys):
    endpoint.seen.clear()
    assert main(["agent", "run", "task", "--endpoint", endpoint.url + "/v1", "--tools", "calculater"]) == 2
    assert "tool spec 'calculater' is not understood" in capsys.readouterr().err
    assert main(["agent", "run", "task", "--tools", "calculator"]) == 2
    assert "either --model DIR" in capsys.readouterr().err
    assert main(["agent", "run", "task", "--endpoint", endpoint.url + "/v1", "--max-steps", "0"]) == 2
    assert "max_steps must be a positive integer" in capsys.readouterr().err
    assert endpoint.seen == []


def test_run_with_an_in_process_model_and_no_tools(main, text_model_dir, tmp_path, capsys):
    trace = tmp_path / "local.jsonl"
    status = main(
        ["agent", "run", "say something", "--model", str(text_model_dir), "--max-tokens", "6", "--json"]
        + ["--trace", str(trace), "--quiet"]
    )
    summary = json.loads(capsys.readouterr().out)
    # A random model rambles: its one reply is cut at the 6-token budget, which ends the run.
    assert status == 1 and summary["stop_reason"] == "max_tokens" and summary["completion_tokens"] == 6
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert records[0]["model"] == "LocalChatModel" and records[0]["tools"] == []
    assert records[-2]["type"] == "reply" and records[-2]["max_tokens"] == 6
