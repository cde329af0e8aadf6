"""`genforge agent run|replay`, registered by `genforge.cli`.

A view over `genforge.agents`: `run` builds the tools named by --tools, opens the model (a
genforge model directory in process, or an OpenAI-compatible endpoint), runs the ReAct loop
and shows each thought, tool call and result on stderr as it happens; the answer goes to
stdout. `replay` re-runs a trace's recorded replies against the tools and checks that every
tool result comes out the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from rich.markup import escape

from ..chat_models import add_chat_model_arguments, chat_model_from_args
from ..console import console

PREVIEW_CHARS = 400


def _preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit} more characters]"


def print_event(record: dict) -> None:
    """One trace record as console lines: thoughts dim, tool calls and results, errors in red."""
    kind = record.get("type")
    if kind == "start":
        names = ", ".join(t["function"]["name"] for t in record["tools"]) or "none"
        console.print(f"[dim]agent: {escape(record['model'])}, tools: {escape(names)}[/dim]")
    elif kind == "reply":
        message = record["message"]
        tokens = f"{record['completion_tokens']}{'~' if record.get('tokens_estimated') else ''} tokens"
        console.print(f"[bold]step {record['step']}[/bold] [dim]({tokens}, {record['duration_s']:.1f} s)[/dim]")
        if message.get("content", "").strip():
            console.print(f"[italic]{escape(_preview(message['content'], 2000))}[/italic]")
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            console.print(
                f"[cyan]→ {escape(str(function.get('name')))}[/cyan]({escape(str(function.get('arguments')))})"
            )
    elif kind == "tool_result":
        style = "red" if record["is_error"] else "green"
        content = escape(_preview(record["message"]["content"]))
        console.print(
            f"[{style}]← {escape(record['name'])}[/{style}] [dim]({record['duration_s']:.2f} s)[/dim] {content}"
        )
    elif kind == "end":
        reason = record["stop_reason"]
        style = "green" if reason == "answer" else "yellow"
        error = f": {escape(record['error'])}" if record.get("error") else ""
        console.print(
            f"[{style}]stopped: {reason}[/{style}]{error} [dim]({record['steps']} steps, {record['tool_calls']} tool "
            f"calls, {record['completion_tokens']} tokens, {record['duration_s']:.1f} s)[/dim]"
        )


def _tool_options(args) -> dict:
    return dict(
        python_timeout_s=args.python_timeout,
        python_memory_mb=args.python_memory_mb,
        encoder=args.encoder,
        mcp_timeout_s=args.tool_timeout,
    )


def _read_task(task: str) -> str:
    return sys.stdin.read() if task == "-" else task


def cmd_run(args) -> int:
    from .builtin import open_tool_specs, parse_tool_specs
    from .loop import Agent

    task = _read_task(args.task)
    specs = parse_tool_specs(args.tools) if args.tools else []  # checked before any model loads
    tool_choice = args.tool_choice
    if tool_choice not in ("auto", "required", "none"):
        tool_choice = {"type": "function", "function": {"name": tool_choice}}
    with contextlib.ExitStack() as stack:
        if specs:
            with console.status("opening tools"):
                tools = open_tool_specs(specs, stack, **_tool_options(args))
        else:
            tools = []
        agent = Agent(
            chat_model_from_args(args),
            tools,
            system_prompt=args.system,
            max_steps=args.max_steps,
            max_tokens=args.max_tokens,
            max_tokens_per_step=args.max_tokens_per_step,
            tool_choice=tool_choice,
            temperature=args.temperature,
            seed=args.seed,
            on_event=None if args.quiet else print_event,
        )
        result = agent.run(task, trace_path=args.trace)
    if args.trace:
        console.print(f"[dim]trace: {escape(args.trace)}[/dim]")
    if args.json:
        summary = {
            "answer": result.answer,
            "stop_reason": result.stop_reason,
            "error": result.error,
            "steps": len(result.steps),
            "tool_calls": len(result.tool_calls),
            "completion_tokens": result.completion_tokens,
            "duration_s": round(result.duration_s, 3),
            "trace": args.trace,
        }
        print(json.dumps(summary, ensure_ascii=False))
    elif result.answer is not None:
        print(result.answer)
    return 0 if result.stop_reason == "answer" else 1


def cmd_replay(args) -> int:
    from .builtin import open_tool_specs, parse_tool_specs
    from .loop import read_trace, replay

    records = read_trace(args.trace)  # a bad trace is reported before tools start
    specs = parse_tool_specs(args.tools) if args.tools else []
    with contextlib.ExitStack() as stack:
        tools = open_tool_specs(specs, stack, **_tool_options(args)) if specs else []
        report = replay(records, tools)
    calls = len(report.result.tool_calls)
    if report.matches:
        print(f"replay matches: {len(report.result.steps)} replies, {calls} tool results identical")
        return 0
    print(f"replay differs in {len(report.differences)} place(s):")
    for difference in report.differences:
        print(f"  {difference}")
    return 1


def _tool_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tools",
        action="append",
        default=[],
        metavar="SPECS",
        help="comma-separated tools: calculator, python, rag:INDEX_DIR, files:DIR, mcp:'COMMAND ARGS' "
        "(an MCP server over stdio); repeatable",
    )
    parser.add_argument("--python-timeout", type=float, default=10.0, help="seconds per python run (default 10)")
    parser.add_argument("--python-memory-mb", type=int, default=1024, help="memory per python run (default 1024)")
    parser.add_argument("--tool-timeout", type=float, default=30.0, help="seconds per MCP tool call (default 30)")
    parser.add_argument("--encoder", default=None, help="encoder directory for rag: indexes (default: from the index)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge agent ...` to the top-level parser."""
    agent = sub.add_parser(
        "agent",
        help="a ReAct agent over tools (calculator, python, RAG search, files, MCP)",
        description="Run a tool-using agent on a task, or replay a trace (see docs/agents.md).",
    )
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)

    run = agent_sub.add_parser(
        "run",
        help="solve a task with tools, streaming thoughts and tool calls",
        description="Reason, call tools, read their results, repeat until the model answers or a budget "
        "runs out. Thoughts and tool calls go to stderr, the answer to stdout; exit status 1 when the "
        "run ends without an answer.",
    )
    run.add_argument("task", help="the task, in words ('-' reads it from stdin)")
    add_chat_model_arguments(run)
    _tool_flags(run)
    run.add_argument("--trace", default=None, help="write the full trace here (JSON Lines, atomically)")
    run.add_argument("--max-steps", type=int, default=10, help="model calls at most (default 10)")
    run.add_argument("--max-tokens", type=int, default=4096, help="completion tokens over the run (default 4096)")
    run.add_argument("--max-tokens-per-step", type=int, default=512, help="tokens of one reply at most (default 512)")
    run.add_argument(
        "--tool-choice",
        default="auto",
        help="auto (default), required (a tool every step; final_answer ends the run), none, or a tool name",
    )
    run.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    run.add_argument("--seed", type=int, default=None, help="sampling seed")
    run.add_argument("--system", default=None, help="replace the default system prompt")
    run.add_argument("--json", action="store_true", help="print the answer, stop reason and totals as JSON")
    run.add_argument("--quiet", action="store_true", help="do not show the steps as they happen")
    run.set_defaults(func=cmd_run)

    rep = agent_sub.add_parser(
        "replay",
        help="re-run a trace's recorded replies against the tools and compare the results",
        description="Play back the model replies recorded in a trace to the same tools; exit status 0 when "
        "every tool result, the stop reason and the answer come out as recorded.",
    )
    rep.add_argument("trace", help="a trace written by `genforge agent run --trace`")
    _tool_flags(rep)
    rep.set_defaults(func=cmd_replay)
