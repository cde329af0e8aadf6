"""Tools served by a Model Context Protocol server, offered to an agent like local tools.

The Model Context Protocol (MCP, modelcontextprotocol.io) lets a separate process serve tools
(a name, a description and a JSON-schema `inputSchema` each) over JSON-RPC. `MCPServerTools`
starts a server as a subprocess, talks to it over stdio through the `mcp` package's client,
lists its tools and wraps each one as a `genforge.agents.Tool`: arguments are validated
against the server's schema here first (so a bad call costs no round trip), then sent as a
`tools/call` request with a timeout, and the reply's text content becomes the tool result
(`isError` results become error results).

The agent loop is synchronous and the MCP client is async: the client lives on an asyncio
event loop in a background thread for as long as the server is open, and each call is a
coroutine submitted to that loop. Close the server (`close()`, or use it as a context manager)
to stop the subprocess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import shlex
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .tools import NAME_PATTERN, Tool, ToolDefinitionError, ToolResult

DEFAULT_CONNECT_TIMEOUT_S = 60.0


class MCPError(ConnectionError):
    """An MCP server that could not be started, reached or listed."""


def _exception_text(error: BaseException) -> str:
    """The innermost useful message: anyio task groups wrap failures in ExceptionGroups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_exception_text(e) for e in error.exceptions)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _content_text(result: Any) -> str:
    """The text of a `CallToolResult`: text blocks as they are, other blocks named."""
    parts = []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} content, {block.mime_type}, not shown]")
        elif kind == "resource":
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if text is not None else f"[binary resource {resource.uri}, not shown]")
        elif kind == "resource_link":
            parts.append(f"[resource link: {block.uri}]")
        else:
            parts.append(f"[{kind or 'unknown'} content, not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    return "\n".join(parts)


def _local_name(name: str, prefix: str) -> str:
    # MCP allows dots and slashes in tool names; OpenAI-style function names do not.
    local = re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}{name}")[:64]
    if not NAME_PATTERN.match(local):
        raise ToolDefinitionError(f"the MCP tool name {name!r} cannot be turned into a function name")
    return local


class MCPServerTools:
    """An MCP server run as a subprocess over stdio, and its tools as `Tool`s.

    command: the server command, as one string ("python server.py --flag") split like a shell
        would, or as a list of arguments.
    env: extra environment variables for the server (merged over the MCP client's safe
        defaults: HOME, PATH, ...); cwd: its working directory.
    prefix: put before every tool name (to keep two servers' tools apart).
    timeout_s: the limit for one tool call; connect_timeout_s: for starting, the handshake and
        listing the tools.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        prefix: str = "",
        timeout_s: float = 30.0,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        if not argv:
            raise MCPError("the MCP server command is empty; give the command that starts the server over stdio")
        if not timeout_s > 0 or not connect_timeout_s > 0:
            raise MCPError("timeout_s and connect_timeout_s must be positive numbers of seconds")
        self.argv, self.env, self.cwd, self.prefix = argv, dict(env or {}), cwd, prefix
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.server_tools: list[Any] = []  # the server's tool listings (mcp.types.Tool)
        self._tools: list[Tool] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # The server's stderr goes to a file, not the console: it is shown when starting fails.
        self._errlog = tempfile.TemporaryFile(mode="w+", encoding="utf-8", prefix="genforge-mcp-")

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> MCPServerTools:
        """Start the server, connect and list its tools; MCPError (with the server's stderr) on failure."""
        if self._thread is not None:
            return self
        try:
            import mcp  # noqa: F401
        except ImportError:  # pragma: no cover - mcp is a dependency
            raise ImportError("MCP tools need the Model Context Protocol SDK: pip install mcp") from None
        self._thread = threading.Thread(target=self._run_loop, name="genforge-mcp", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.connect_timeout_s):
            self.close()
            raise MCPError(
                f"the MCP server {shlex.join(self.argv)!r} did not answer within {self.connect_timeout_s:g} s"
            )
        if self._startup_error is not None:
            stderr = self._server_stderr()
            self.close()
            raise MCPError(
                f"could not start or list the MCP server {shlex.join(self.argv)!r}: "
                f"{_exception_text(self._startup_error)}" + (f"\nserver stderr:\n{stderr}" if stderr else "")
            )
        self._tools = [self._wrap(listing) for listing in self.server_tools]
        return self

    def _server_stderr(self, max_chars: int = 3000) -> str:
        try:
            self._errlog.flush()
            self._errlog.seek(0)
            return self._errlog.read()[-max_chars:].strip()
        except (OSError, ValueError):
            return ""

    def _run_loop(self) -> None:
        try:
            asyncio.run(self._session())
        except BaseException as err:  # reported by start(); the thread must not die silently
            if not self._ready.is_set():
                self._startup_error = err
                self._ready.set()

    async def _session(self) -> None:
        from mcp import Client, StdioServerParameters
        from mcp.client.stdio import stdio_client

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        parameters = StdioServerParameters(command=self.argv[0], args=self.argv[1:], env=self.env or None, cwd=self.cwd)
        async with Client(stdio_client(parameters, errlog=self._errlog)) as client:
            listings, cursor = [], None
            while True:  # tools/list is paginated
                page = await client.list_tools(cursor=cursor)
                listings.extend(page.tools)
                cursor = page.next_cursor
                if cursor is None:
                    break
            self.server_tools, self._client = listings, client
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        """Stop the server (it is sent EOF, then terminated) and the client's thread."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop finished meanwhile
                pass
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._client = None
        try:
            self._errlog.close()
        except OSError:
            pass

    def __enter__(self) -> MCPServerTools:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tools ----------------------------------------------------------------------------
    @property
    def tools(self) -> list[Tool]:
        """The server's tools as `Tool`s (start() first)."""
        if self._thread is None:
            raise MCPError("the MCP server is not started; call start() or use it in a with-block")
        return list(self._tools)

    def _wrap(self, listing: Any) -> Tool:
        remote_name = listing.name

        def call(**arguments: Any) -> ToolResult:
            return self.call(remote_name, arguments)

        schema = dict(listing.input_schema or {"type": "object"})
        schema.setdefault("type", "object")
        try:
            return Tool(
                name=_local_name(remote_name, self.prefix),
                description=listing.description or getattr(listing, "title", None) or f"the MCP tool {remote_name}",
                parameters=schema,
                function=call,
                # The call enforces timeout_s itself (and cancels the request); this only backs it up.
                timeout_s=self.timeout_s + 10.0,
            )
        except ToolDefinitionError as err:
            raise MCPError(
                f"the MCP server {shlex.join(self.argv)!r} serves a tool genforge cannot offer: {err}"
            ) from None

    def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        """Call the server's tool `name` (its own name, without the prefix); never raises."""
        if self._client is None or self._loop is None:
            return ToolResult(f"error: the MCP server for {name} is not running", True)
        request = self._client.call_tool(name, dict(arguments or {}), read_timeout_seconds=self.timeout_s)
        future = asyncio.run_coroutine_threadsafe(request, self._loop)
        timed_out = ToolResult(f"error: the MCP tool {name} did not answer within {self.timeout_s:g} s", True)
        try:
            result = future.result(self.timeout_s + 5.0)
        except (concurrent.futures.TimeoutError, TimeoutError):
            future.cancel()
            return timed_out
        except Exception as err:  # a protocol error (unknown tool, server gone): the model is told
            from mcp_types import REQUEST_TIMEOUT

            if getattr(err, "code", None) == REQUEST_TIMEOUT:  # the client's own read timeout
                return timed_out
            return ToolResult(f"error: the MCP tool {name} failed: {_exception_text(err)}", True)
        return ToolResult(_content_text(result), bool(result.is_error))


def mcp_tools(command: str | Sequence[str], **options: Any) -> MCPServerTools:
    """Start an MCP server (see `MCPServerTools`) and return it, connected; use `.tools` and `close()`."""
    return MCPServerTools(command, **options).start()


__all__ = ["MCPError", "MCPServerTools", "mcp_tools"]
