"""Agents: tools from plain Python functions, built-in tools (calculator, sandboxed Python, RAG
search, confined file reading), tools from MCP servers, and a ReAct loop over native tool
calls with budgets, a JSONL trace and replay.

See docs/agents.md for the loop, each tool and MCP.
"""

from .builtin import (
    CalculatorError,
    FileAccessError,
    calculate,
    calculator_tool,
    file_tools,
    python_tool,
    rag_search_tool,
    resolve_inside,
)
from .loop import (
    Agent,
    AgentError,
    AgentResult,
    AgentStep,
    ReplayReport,
    ScriptedChatModel,
    ToolCallRecord,
    make_final_answer_tool,
    read_trace,
    replay,
    run_agent,
    write_trace,
)
from .mcp_tools import MCPError, MCPServerTools, mcp_tools
from .tools import Tool, ToolDefinitionError, ToolResult, as_tools, json_schema_for, parse_docstring, tool

__all__ = [
    "Agent",
    "AgentError",
    "AgentResult",
    "AgentStep",
    "CalculatorError",
    "FileAccessError",
    "MCPError",
    "MCPServerTools",
    "ReplayReport",
    "ScriptedChatModel",
    "Tool",
    "ToolCallRecord",
    "ToolDefinitionError",
    "ToolResult",
    "as_tools",
    "calculate",
    "calculator_tool",
    "file_tools",
    "json_schema_for",
    "make_final_answer_tool",
    "mcp_tools",
    "parse_docstring",
    "python_tool",
    "rag_search_tool",
    "read_trace",
    "replay",
    "resolve_inside",
    "run_agent",
    "tool",
    "write_trace",
]
