"""Built-in agent tools: the calculator against hostile input, the file tools against escapes,
the Python tool's limits, RAG search over a small index, and tool specs from the command line."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time

import numpy as np
import pytest

from genforge.agents import (
    CalculatorError,
    FileAccessError,
    ToolDefinitionError,
    calculate,
    calculator_tool,
    file_tools,
    python_tool,
    rag_search_tool,
    resolve_inside,
)
from genforge.agents.builtin import MAX_INT_BITS, open_tool_specs, parse_tool_specs


# ------------------------------------------------------------------------------ calculator
@pytest.mark.parametrize(
    "expression, value",
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 10", 1024),
        ("-2 ** 2", -4),
        ("7 // 2 + 7 % 2", 4),
        ("10 / 4", 2.5),
        ("sqrt(16) + log10(1000)", 7.0),
        ("max(1, 5, 3) - min(4, 2)", 3),
        ("round(pi, 3)", 3.142),
        ("factorial(10)", 3628800),
        ("comb(10, 3)", 120),
        ("hypot(3, 4)", 5.0),
        ("1e3 + .5", 1000.5),
        ("2 ** -1", 0.5),
        ("10 ** 3000 // 10 ** 2999", 10),
    ],
)
def test_calculator_computes(expression, value):
    assert calculate(expression) == pytest.approx(value)


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os').system('echo pwned')", "calling \"__import__('os').system\" is not allowed"),
        ("().__class__.__bases__[0].__subclasses__()", "not allowed"),
        ("(1).__class__", "attribute access are not allowed"),
        ("math.sqrt(4)", "calling 'math.sqrt' is not allowed"),
        ("open('/etc/passwd').read()", "not allowed"),
        ("x + 1", "unknown name 'x'"),
        ("__builtins__", "unknown name '__builtins__'"),
        ("eval('1+1')", "calling 'eval' is not allowed"),
        ("exec('import os')", "calling 'exec' is not allowed"),
        ("[1, 2][0]", "not allowed"),
        ("'a' * 10", "only numbers are allowed as literals"),
        ("True + 1", "only numbers are allowed as literals"),
        ("lambda: 1", "lambdas are not allowed"),
        ("[x for x in range(10)]", "comprehensions are not allowed"),
        ("(y := 3)", "assignments are not allowed"),
        ("1 if 1 else 2", "conditional expressions are not allowed"),
        ("1 < 2", "comparisons are not allowed"),
        ("1 << 100000", "operator LShift is not allowed"),
        ("~1", "operator Invert is not allowed"),
        ("9 ** 9 ** 9", "refuses integers over"),
        ("2 ** 100000", "refuses integers over"),
        ("(10 ** 3000) * (10 ** 3000)", "more than"),
        ("factorial(100000)", "factorial(100000) is refused"),
        ("comb(10 ** 9, 5)", "refused for n over 100000"),
        ("sqrt(*[4])", "not allowed"),
        ("round(x=1)", "positional arguments only"),
        ("1 / 0", "division by zero"),
        ("log(0)", "cannot evaluate"),
        ("exp(1000)", "cannot evaluate"),
        ("(-8) ** 0.5", "not a real number"),
        ("1 +", "not a valid expression"),
        ("import os", "not a valid expression"),
        ("", "the expression is empty"),
        ("1" + "+1" * 1500, "characters; at most"),
        ("+".join(["1"] * 300), "more than 400 parts"),
    ],
)
def test_calculator_refuses_hostile_and_undefined_input(expression, message):
    started = time.monotonic()
    with pytest.raises(CalculatorError) as caught:
        calculate(expression)
    assert message in str(caught.value)
    assert time.monotonic() - started < 1.0  # refused before doing expensive work


def test_calculator_tool_reports_errors_as_results():
    calculator = calculator_tool()
    assert calculator({"expression": "6 * 7"}).content == "42"
    refused = calculator({"expression": "__import__('os')"})
    assert refused.is_error and refused.content.startswith("error: calling '__import__' is not allowed")
    assert calculator({"expression": "2 ** 0.5"}).content == repr(math.sqrt(2))
    big = calculate(f"2 ** {MAX_INT_BITS - 1}")
    assert len(calculator({"expression": f"2 ** {MAX_INT_BITS - 1}"}).content) == len(str(big))


# ----------------------------------------------------------------------------------- files
@pytest.fixture
def sandbox(tmp_path):
    root = tmp_path / "root"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("line one\nline two\nline three\n")
    (root / "notes.md").write_text("# Notes\n" + "".join(f"item {i}\n" for i in range(1, 101)))
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    secret = tmp_path / "secret.txt"
    secret.write_text("the password is swordfish")
    os.symlink(secret, root / "link_out.txt")  # a link leading out of the root
    os.symlink(root / "docs" / "a.txt", root / "link_in.txt")  # a link staying inside
    os.symlink(tmp_path, root / "up")  # a directory link leading out
    return root


@pytest.mark.parametrize(
    "path, message",
    [
        ("../secret.txt", "outside the readable directory"),
        ("docs/../../secret.txt", "outside the readable directory"),
        ("link_out.txt", "outside the readable directory"),
        ("up/secret.txt", "outside the readable directory"),
        ("/etc/passwd", "is absolute"),
        ("~/.bashrc", "is absolute"),
        ("docs/\x00a.txt", "NUL"),
    ],
)
def test_file_paths_cannot_escape_the_root(sandbox, path, message):
    with pytest.raises(FileAccessError, match=message):
        resolve_inside(sandbox, path)
    read_file, _ = file_tools(sandbox)
    result = read_file({"path": path})
    assert result.is_error and "FileAccessError" in result.content and "swordfish" not in result.content


def test_file_tools_read_and_list_inside_the_root(sandbox):
    read_file, list_files = file_tools(sandbox)
    assert read_file({"path": "docs/a.txt"}).content == "    1| line one\n    2| line two\n    3| line three"
    assert read_file({"path": "link_in.txt", "start_line": 2, "max_lines": 1}).content == (
        "    2| line two\n[lines 2-2 of 3]"
    )
    assert read_file({"path": "./docs/../notes.md", "start_line": 100}).content == "  100| item 99\n  101| item 100"
    assert "binary file" in read_file({"path": "blob.bin"}).content
    assert "is a directory" in read_file({"path": "docs"}).content
    assert "not found" in read_file({"path": "missing.txt"}).content
    listing = list_files({}).content.splitlines()
    assert listing == ["blob.bin (9 bytes)", "docs/", "link_in.txt (29 bytes)", "notes.md (800 bytes)"]
    assert list_files({"directory": "docs"}).content == "docs/a.txt (29 bytes)"
    assert list_files({"directory": "up"}).is_error
    with pytest.raises(ToolDefinitionError, match="not a directory"):
        file_tools(sandbox / "notes.md")


# ---------------------------------------------------------------------------------- python
def test_python_tool_runs_code_and_reports_how_it_ended():
    python = python_tool(timeout_s=1.0, memory_mb=256, max_output_chars=500)
    ok = python({"code": "print(sum(range(10)))"})
    assert not ok.is_error and ok.content == "45"
    assert python({"code": "x = 1"}).content == "(the program printed nothing)"
    failed = python({"code": "print('before')\nraise ValueError('bad value')"})
    assert failed.is_error and failed.content.startswith("before\n")
    assert "ValueError: bad value" in failed.content and failed.content.endswith("error: it exited with status 1")
    started = time.monotonic()
    looped = python({"code": "while True: pass"})
    assert looped.is_error and looped.content.endswith("error: it was stopped after the 1 s time limit")
    assert time.monotonic() - started < 8
    hungry = python({"code": "x = bytearray(2 * 1024 ** 3)"})
    assert hungry.is_error and "ran out of memory (limit 256 MB)" in hungry.content
    offline = python({"code": "import socket\nsocket.create_connection(('example.com', 80))"})
    assert offline.is_error and "network access is disabled" in offline.content
    chatty = python({"code": "print('x' * 100000)"})
    assert len(chatty.content) < 1300 and "output cut" in chatty.content


# ------------------------------------------------------------------------------------- rag
class HashEmbedder:
    """Bag of words hashed into 64 dimensions: deterministic and instant."""

    name, dimension = "hash-bow-64", 64

    def embed(self, texts):
        out = np.zeros((len(texts), self.dimension), np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace(",", " ").replace(".", " ").split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dimension] += 1.0
        return out + 1e-3


def test_rag_search_returns_passages_with_sources():
    from genforge.rag import Chunk, HybridIndex, Retriever

    texts = [
        ("paged.md", "Paged attention stores the key value cache in fixed size blocks."),
        ("lora.md", "LoRA trains two small low rank matrices beside each frozen weight."),
        ("bread.md", "Knead the dough, let it rise for two hours, then bake it."),
    ]
    chunks = [Chunk(text, source, 0, len(text), title=source[:-3]) for source, text in texts]
    embedder = HashEmbedder()
    search = rag_search_tool(Retriever(HybridIndex.build(chunks, embedder), embedder), k=2)
    assert search.name == "search" and search.parameters["properties"]["k"]["default"] == 2
    result = search({"query": "how long does the dough rise"})
    assert not result.is_error
    first = result.content.split("\n\n")[0]
    assert first.startswith("[1] bread.md:0-") and "Knead the dough" in first
    assert result.content.count("\n\n") == 1  # k = 2 passages
    assert search({"query": "x", "k": 0}).is_error
    assert search({"query": "  "}).is_error  # the retriever's own error, as a result


# ----------------------------------------------------------------------------------- specs
def test_tool_specs_split_on_known_kinds_only(tmp_path):
    specs = parse_tool_specs(["calculator,python", f"files:{tmp_path},mcp:python -c 'print(1, 2)',rag:/x"])
    assert specs == ["calculator", "python", f"files:{tmp_path}", "mcp:python -c 'print(1, 2)'", "rag:/x"]
    for bad in ("calculater", "rag:", "shell:ls"):
        with pytest.raises(ToolDefinitionError, match="not understood"):
            parse_tool_specs(bad)
    with contextlib.ExitStack() as stack:
        tools = open_tool_specs(["calculator", "python", f"files:{tmp_path}"], stack)
    assert [t.name for t in tools] == ["calculator", "python", "read_file", "list_files"]
    with pytest.raises(ToolDefinitionError, match="not a directory"):
        open_tool_specs(["rag:/nonexistent/index"], contextlib.ExitStack())
