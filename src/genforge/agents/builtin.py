"""Built-in tools for agents: a safe calculator, Python in a sandbox, search over a genforge
RAG index, and file reading confined to one directory.

- `calculator_tool`: arithmetic by walking the expression's syntax tree (`ast.parse` in
  "eval" mode), never `eval`. Only number literals, + - * / // % **, unary signs, a
  whitelist of math functions and constants (pi, e, tau, inf) are accepted; names, attribute
  access, subscripts, comprehensions, strings and every other node are refused with what is
  allowed. Results are bounded: an integer power whose result would pass `MAX_INT_BITS` bits
  (`9**9**9`) is refused before it is computed, and so is any integer result that large.
- `python_tool`: runs a program in the pass@k sandbox (`genforge.evaluate.code_eval`): a fresh
  isolated interpreter with wall-clock and memory limits, no network, a temporary working
  directory; the tool returns what it printed and how it ended. That sandbox guards against
  accidents, not against hostile code (see its docstring).
- `rag_search_tool`: hybrid search over an index built by `genforge rag index`.
- `file_tools`: `read_file` and `list_files` under one root directory. A path is refused when it
  is absolute, or when it resolves (`..`, symbolic links followed) outside the root.
"""

from __future__ import annotations

import ast
import contextlib
import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .tools import Tool, ToolDefinitionError, ToolResult, as_tools

# -------------------------------------------------------------------------------- calculator
MAX_EXPRESSION_CHARS = 2000
MAX_EXPRESSION_NODES = 400
# Integers beyond this many bits (about 3900 decimal digits) are refused: they stay under
# Python's 4300-digit limit for printing an int, and a calculator answer longer than that
# would only fill the model's context.
MAX_INT_BITS = 13_000
MAX_FACTORIAL = 1000


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate."""


def _checked_int(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(
            f"the result has more than {MAX_INT_BITS} bits; the calculator refuses numbers that large"
        )
    return value


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        # base ** n has about n * log2(|base|) bits: refuse before computing it.
        bits = exponent * math.log2(abs(base))
        if bits > MAX_INT_BITS:
            raise CalculatorError(
                f"{base} ** {exponent} would have about {bits:.0f} bits; the calculator "
                f"refuses integers over {MAX_INT_BITS} bits (use a float base, e.g. {base}.0 ** {exponent})"
            )
    result = operator.pow(base, exponent)
    if isinstance(result, complex):
        raise CalculatorError(f"{base} ** {exponent} is not a real number")
    return result


def _factorial(n: Any) -> int:
    if not isinstance(n, int) or n < 0:
        raise CalculatorError(f"factorial needs a non-negative integer, got {n!r}")
    if n > MAX_FACTORIAL:
        raise CalculatorError(f"factorial({n}) is refused: the calculator allows up to factorial({MAX_FACTORIAL})")
    return math.factorial(n)


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "cbrt": lambda x: math.copysign(abs(x) ** (1 / 3), x),
    "exp": math.exp,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "atan2": math.atan2,
    "sinh": math.sinh,
    "cosh": math.cosh,
    "tanh": math.tanh,
    "degrees": math.degrees,
    "radians": math.radians,
    "floor": math.floor,
    "ceil": math.ceil,
    "trunc": math.trunc,
    "hypot": math.hypot,
    "gcd": math.gcd,
    "lcm": math.lcm,
    "factorial": _factorial,
    "comb": lambda n, k: math.comb(_bounded_n("comb", n), k),
    "perm": lambda n, k: math.perm(_bounded_n("perm", n), k),
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}


def _bounded_n(name: str, n: Any) -> Any:
    # comb(n, k) and perm(n, k) grow like n**k; a bound on n keeps one call fast, and the result
    # is checked against MAX_INT_BITS like every other integer.
    if isinstance(n, int) and n > 100_000:
        raise CalculatorError(f"{name} is refused for n over 100000 (got {n})")
    return n


def _describe(node: ast.AST) -> str:
    return {
        ast.Attribute: "attribute access",
        ast.Subscript: "subscripts",
        ast.Lambda: "lambdas",
        ast.ListComp: "comprehensions",
        ast.GeneratorExp: "comprehensions",
        ast.Compare: "comparisons",
        ast.BoolOp: "and/or",
        ast.IfExp: "conditional expressions",
        ast.NamedExpr: "assignments",
        ast.JoinedStr: "strings",
    }.get(type(node), type(node).__name__)


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"only numbers are allowed as literals, got {node.value!r}")
        return _checked_int(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        return _checked_int(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise CalculatorError(
            f"unknown name {node.id!r}: the calculator knows the constants {', '.join(_CONSTANTS)} and the functions "
            f"{', '.join(_FUNCTIONS)}"
        )
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            called = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)[:80]
            raise CalculatorError(f"calling {called!r} is not allowed; allowed functions: {', '.join(_FUNCTIONS)}")
        if node.keywords:
            raise CalculatorError(f"{node.func.id}() takes positional arguments only")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise CalculatorError("argument unpacking (*) is not allowed")
        arguments = [_evaluate(a) for a in node.args]
        return _checked_int(_FUNCTIONS[node.func.id](*arguments))
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        raise CalculatorError(
            f"operator {type(node.op).__name__} is not allowed; allowed: + - * / // % ** and unary + -"
        )
    raise CalculatorError(
        f"{_describe(node)} are not allowed; the calculator takes numbers, + - * / // % **, parentheses, "
        "the constants pi, e, tau, inf and whitelisted math functions"
    )


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely (see the module docstring); CalculatorError for
    anything outside the whitelist, too large, or undefined (division by zero, log of 0)."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("the expression is empty; give arithmetic such as '(2 + 3) * sqrt(16)'")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is {len(expression)} characters; at most {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise CalculatorError(f"not a valid expression: {err.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_EXPRESSION_NODES:
        raise CalculatorError(f"the expression has more than {MAX_EXPRESSION_NODES} parts; split it up")
    try:
        return _evaluate(tree)
    except CalculatorError:
        raise
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as err:
        raise CalculatorError(f"cannot evaluate {expression.strip()!r}: {err}") from None


def calculator_tool(timeout_s: float = 5.0) -> Tool:
    """The calculator as a tool named `calculator`."""

    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression exactly and return the number.

        Supports + - * / // % ** and parentheses, the constants pi, e, tau, inf, and the functions
        sqrt, cbrt, exp, log, log2, log10, sin, cos, tan, asin, acos, atan, atan2, sinh, cosh,
        tanh, degrees, radians, floor, ceil, trunc, round, abs, min, max, hypot, gcd, lcm,
        factorial, comb and perm.

        Args:
            expression: the arithmetic to evaluate, e.g. "(2 + 3) * sqrt(16) / 7".
        """
        try:
            return str(calculate(expression))
        except CalculatorError as err:
            return ToolResult(f"error: {err}", True)

    return Tool.from_function(calculator, timeout_s=timeout_s)


# ------------------------------------------------------------------------------------ python
def python_tool(
    timeout_s: float = 10.0, memory_mb: int = 1024, max_output_chars: int = 4000, allow_network: bool = False
) -> Tool:
    """A tool named `python` that runs a program in the pass@k sandbox with these limits."""
    from ..evaluate.code_eval import _check_sandbox_settings, run_candidate

    _check_sandbox_settings(timeout_s, memory_mb, 1, max_output_chars)

    def python(code: str) -> ToolResult:
        """Run a Python program in a fresh sandboxed interpreter and return what it printed.

        Nothing persists between calls: each program starts from scratch, so print the values you
        need. There is no network access and no input.

        Args:
            code: the full program; use print() to show results.
        """
        result = run_candidate(
            code,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            allow_network=allow_network,
            max_output_chars=max_output_chars,
        )
        parts = []
        if result.stdout:
            parts.append(result.stdout.rstrip("\n"))
        if result.status == "passed":
            return ToolResult("\n".join(parts) if parts else "(the program printed nothing)")
        why = {
            "timeout": f"it was stopped after the {timeout_s:g} s time limit",
            "memory_limit": f"it ran out of memory (limit {memory_mb} MB)",
            "crashed": f"it was killed by signal {-(result.returncode or 0)}",
            "failed": f"it exited with status {result.returncode}",
        }[result.status]
        if result.stderr.strip():
            parts.append(result.stderr.rstrip("\n"))
        return ToolResult("\n".join([*parts, f"error: {why}"]), True)

    # The sandbox enforces the limit by killing the process; the tool's own timeout only
    # backs it up (interpreter start-up, reading the output).
    return Tool.from_function(python, timeout_s=timeout_s + 30.0, max_result_chars=2 * max_output_chars + 200)


# --------------------------------------------------------------------------------------- RAG
def rag_search_tool(
    index: str | os.PathLike | Any,
    *,
    encoder: str | os.PathLike | None = None,
    k: int = 5,
    max_passage_chars: int = 1500,
    name: str = "search",
    **search_options: Any,
) -> Tool:
    """A tool that searches a genforge RAG index (hybrid BM25 + dense by default).

    index: an index directory (`genforge rag index ... --index DIR`; its encoder is chosen
        from its manifest, or `encoder`) or an open `genforge.rag.Retriever`.
    search_options: passed to `Retriever.search` (mode, fusion, rerank, filters, ...).
    """
    from ..rag.retrieve import Retriever, open_retriever

    retriever = index if isinstance(index, Retriever) else open_retriever(index, encoder)
    if not isinstance(k, int) or k < 1:
        raise ToolDefinitionError(f"k must be a positive integer, got {k!r}")
    default_k = k

    def search(query: str, k: int = default_k) -> str:
        """Search the document index and return the most relevant passages with their sources.

        Args:
            query: what to look for, in words (a question or keywords).
            k: how many passages to return.
        """
        if k < 1 or k > 50:
            return ToolResult(f"error: k must be between 1 and 50, got {k}", True)
        hits = retriever.search(query, k=k, **search_options)
        if not hits:
            return "no passages found"
        blocks = []
        for rank, hit in enumerate(hits, 1):
            chunk = hit.chunk
            text = chunk.text if len(chunk.text) <= max_passage_chars else chunk.text[:max_passage_chars] + " [...]"
            title = f" ({chunk.title})" if chunk.title else ""
            blocks.append(f"[{rank}] {chunk.source}:{chunk.start}-{chunk.end}{title} score={hit.score:.3f}\n{text}")
        return "\n\n".join(blocks)

    return Tool.from_function(search, name=name, max_result_chars=max(2000, k * (max_passage_chars + 200)))


# ------------------------------------------------------------------------------------- files
class FileAccessError(PermissionError):
    """A path outside the directory a file tool may read."""


def resolve_inside(root: str | os.PathLike, path: str) -> Path:
    """`path` (relative to `root`) resolved with every symbolic link followed; FileAccessError
    when it is absolute or lands outside `root` (through `..` or a link)."""
    if not isinstance(path, str) or "\x00" in path:
        raise FileAccessError("the path must be text without NUL characters")
    base = Path(os.path.realpath(root))
    if os.path.isabs(path) or Path(path).drive or path.startswith("~"):
        raise FileAccessError(f"{path!r} is absolute; give a path relative to the readable directory")
    target = Path(os.path.realpath(base / path))
    if target != base and base not in target.parents:
        raise FileAccessError(f"{path!r} is outside the readable directory")
    return target


def file_tools(root: str | os.PathLike, max_chars: int = 20_000, max_entries: int = 500) -> list[Tool]:
    """`read_file` and `list_files`, confined to `root` (see `resolve_inside`)."""
    base = Path(os.path.realpath(root))
    if not base.is_dir():
        raise ToolDefinitionError(f"{root} is not a directory; the file tools need an existing directory to read")

    def read_file(path: str, start_line: int = 1, max_lines: int = 400) -> str:
        """Read a text file from the readable directory, with line numbers.

        Args:
            path: the file's path relative to the readable directory (see list_files).
            start_line: the first line to return (1 is the start of the file).
            max_lines: how many lines to return at most.
        """
        target = resolve_inside(base, path)
        if not target.is_file():
            kind = "a directory" if target.is_dir() else "not found"
            raise FileNotFoundError(f"{path!r} is {kind}; list_files shows the files there are")
        if start_line < 1 or max_lines < 1:
            raise ValueError("start_line and max_lines must be at least 1")
        with open(target, "rb") as handle:
            if b"\x00" in handle.read(8192):
                raise ValueError(f"{path!r} is a binary file; only text files can be read")
        chosen, total = [], 0
        with open(target, encoding="utf-8", errors="replace") as handle:
            for total, line in enumerate(handle, 1):
                if start_line <= total < start_line + max_lines:
                    chosen.append(f"{total:>5}| {line.rstrip(chr(10)).rstrip(chr(13))}")
        if not chosen:
            return f"{path} has {total} lines; nothing from line {start_line}"
        shown_until = start_line + len(chosen) - 1
        more = f"\n[lines {start_line}-{shown_until} of {total}]" if shown_until < total else ""
        return "\n".join(chosen) + more

    def list_files(directory: str = ".") -> str:
        """List the files and folders in a folder of the readable directory.

        Args:
            directory: the folder, relative to the readable directory ("." is its top).
        """
        target = resolve_inside(base, directory)
        if not target.is_dir():
            raise NotADirectoryError(f"{directory!r} is not a folder")
        entries = []
        for entry in sorted(target.iterdir(), key=lambda p: p.name):
            try:
                inside = resolve_inside(base, str(entry.relative_to(base)))
            except FileAccessError:
                continue  # a link leading out of the root is not shown
            relative = entry.relative_to(base).as_posix()
            entries.append(f"{relative}/" if inside.is_dir() else f"{relative} ({inside.stat().st_size} bytes)")
            if len(entries) >= max_entries:
                entries.append(f"[... more entries not shown (limit {max_entries})]")
                break
        return "\n".join(entries) if entries else "(empty)"

    return [
        Tool.from_function(read_file, max_result_chars=max_chars),
        Tool.from_function(list_files, max_result_chars=max_chars),
    ]


__all__ = [
    "CalculatorError",
    "FileAccessError",
    "calculate",
    "calculator_tool",
    "file_tools",
    "open_tool_specs",
    "parse_tool_specs",
    "python_tool",
    "rag_search_tool",
    "resolve_inside",
]


# ------------------------------------------------------------------------- tools from specs
TOOL_KINDS = ("calculator", "python", "rag:", "files:", "mcp:")


def parse_tool_specs(text: str | Sequence[str]) -> list[str]:
    """Tool specs from a comma-separated list (`calculator,python,rag:INDEX,files:DIR,mcp:CMD ARGS`),
    or several such lists. A comma splits only where a known kind follows, so an MCP command
    may itself contain commas."""
    texts = [text] if isinstance(text, str) else list(text)
    specs: list[str] = []
    kinds = "|".join(re.escape(k) for k in TOOL_KINDS)
    for item in texts:
        for spec in re.split(rf",\s*(?=(?:{kinds}))", item.strip()):
            spec = spec.strip()
            if not spec:
                continue
            if spec in ("calculator", "python") or spec.startswith(TOOL_KINDS[2:]) and spec.split(":", 1)[1].strip():
                specs.append(spec)
            else:
                raise ToolDefinitionError(
                    f"tool spec {spec!r} is not understood; accepted: calculator, python, rag:INDEX_DIR, files:DIR, "
                    "mcp:COMMAND (the command that starts an MCP server over stdio), separated by commas"
                )
    return specs


def open_tool_specs(
    specs: Sequence[str],
    stack: contextlib.ExitStack,
    *,
    python_timeout_s: float = 10.0,
    python_memory_mb: int = 1024,
    encoder: str | os.PathLike | None = None,
    mcp_timeout_s: float = 30.0,
) -> list[Tool]:
    """The tools the specs name (see `parse_tool_specs`); MCP servers are started and closed
    by `stack`. Two RAG indexes or two MCP servers get numbered names / prefixes."""
    from .mcp_tools import MCPServerTools

    tools: list[Tool] = []
    rag_count = sum(s.startswith("rag:") for s in specs)
    mcp_count = sum(s.startswith("mcp:") for s in specs)
    rag_seen = mcp_seen = 0
    for spec in specs:
        kind, _, value = spec.partition(":")
        value = value.strip()
        if kind == "calculator":
            tools.append(calculator_tool())
        elif kind == "python":
            tools.append(python_tool(timeout_s=python_timeout_s, memory_mb=python_memory_mb))
        elif kind == "rag":
            rag_seen += 1
            if not Path(value).is_dir():
                raise ToolDefinitionError(f"rag:{value}: not a directory; give an index built by `genforge rag index`")
            name = "search" if rag_count == 1 else f"search_{rag_seen}"
            tools.append(rag_search_tool(value, encoder=encoder, name=name))
        elif kind == "files":
            tools.extend(file_tools(value))
        elif kind == "mcp":
            mcp_seen += 1
            server = MCPServerTools(value, timeout_s=mcp_timeout_s, prefix="" if mcp_count == 1 else f"mcp{mcp_seen}_")
            stack.enter_context(server)
            tools.extend(server.tools)
        else:  # pragma: no cover - parse_tool_specs only lets the kinds above through
            raise ToolDefinitionError(f"unknown tool spec {spec!r}")
    return as_tools(tools)
