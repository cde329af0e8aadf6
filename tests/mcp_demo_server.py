"""A small MCP server for the agent tests, served over stdio with the SDK's MCPServer (FastMCP
in mcp 1.x): `python tests/mcp_demo_server.py`."""

from __future__ import annotations

import time

from mcp.server.mcpserver import MCPServer

server = MCPServer("genforge-test")


@server.tool()
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


@server.tool(name="text.reverse")
def reverse(text: str) -> str:
    """Reverse a piece of text."""
    return text[::-1]


@server.tool()
def fail(reason: str) -> str:
    """Always fail, saying why."""
    raise ValueError(f"failed on purpose: {reason}")


@server.tool()
def nap(seconds: float) -> str:
    """Sleep, then say so."""
    time.sleep(seconds)
    return f"slept {seconds} s"


if __name__ == "__main__":
    server.run("stdio")
