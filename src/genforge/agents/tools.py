"""Tools for agents: a plain Python function with type hints becomes a tool a model can call.

A tool is what the OpenAI tools API (and every chat template with tool support) offers a
model: a name, a description and a JSON schema for the arguments. Here the schema is derived
from the function itself:

- the signature gives the properties: `str`, `int`, `float`, `bool`, `None`, `list[X]`,
  `tuple[X, ...]`, `set[X]`, `dict[str, X]`, `Literal[...]`, `Enum` subclasses, unions and
  `Optional[X]` / `X | None`; a parameter without a default is required, a default is
  recorded in the schema; `Annotated[X, "text"]` describes a parameter in place;
- the docstring gives the description (its text up to the first section) and a description
  per argument from a Google-style `Args:` section or a NumPy-style `Parameters` section.

A call is checked before the function runs: the arguments are validated against the schema
(jsonschema), so a model that sends `{"x": "three"}` to `f(x: int)` gets back a tool result
saying what was wrong and what was expected, instead of the function failing somewhere
inside. Exceptions and timeouts become error results too: a tool never raises into the agent
loop.

A timeout cannot stop Python code running in a thread: a function that overruns is left to
finish in a daemon thread while the agent goes on with an error result. Tools that may run
long or hang (code execution, network calls) should enforce their own limits in a
subprocess, as the built-in Python tool does through the pass@k sandbox.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

# OpenAI's rule for function names; chat templates and servers rely on it.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_TIMEOUT_S = 30.0
# Results longer than this are cut (head and tail kept): a tool that prints a megabyte would
# otherwise fill the model's context on its own.
DEFAULT_MAX_RESULT_CHARS = 8000

_SECTION_HEADERS = {
    "args",
    "arguments",
    "parameters",
    "params",
    "keyword args",
    "keyword arguments",
    "other parameters",
    "returns",
    "return",
    "yields",
    "yield",
    "raises",
    "raise",
    "examples",
    "example",
    "notes",
    "note",
    "see also",
    "references",
    "warnings",
    "warning",
    "attributes",
}
_ARGUMENT_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments"}


class ToolDefinitionError(ValueError):
    """A function that cannot be offered as a tool (said when the tool is made, not when called)."""


@dataclass(frozen=True)
class ToolResult:
    """What a tool call gave back: the text the model reads, whether it is an error, how long it took."""

    content: str
    is_error: bool = False
    duration_s: float = 0.0


# ------------------------------------------------------------------------------ docstrings
def parse_docstring(docstring: str | None) -> tuple[str, dict[str, str]]:
    """The description (text before the first section) and per-argument descriptions from a
    Google-style (`Args:` then `name (type): text`) or NumPy-style (`Parameters`, a line of
    dashes, then `name : type` and indented text) docstring. Continuation lines are joined."""
    lines = inspect.cleandoc(docstring or "").splitlines()
    description: list[str] = []
    arguments: dict[str, str] = {}
    section: str | None = None
    numpy_style = False
    base_indent: int | None = None
    current: str | None = None
    index = 0
    while index < len(lines):
        line, stripped = lines[index], lines[index].strip()
        header = stripped.rstrip(":").lower()
        underlined = index + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[index + 1].strip()) is not None
        if header in _SECTION_HEADERS and not line[:1].isspace() and (stripped.endswith(":") or underlined):
            section, numpy_style, base_indent, current = header, underlined, None, None
            index += 2 if underlined else 1
            continue
        index += 1
        if section is None:
            description.append(line)
            continue
        if section not in _ARGUMENT_SECTIONS or not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if base_indent is None:
            base_indent = indent
        entry = re.match(r"^\*{0,2}([A-Za-z_]\w*)\s*(?:\([^)]*\))?\s*(?::\s*(.*))?$", stripped)
        if indent <= base_indent and entry:
            current = entry.group(1)
            # Google puts the description after the colon; NumPy puts the type there.
            arguments[current] = "" if numpy_style else (entry.group(2) or "").strip()
        elif current is not None:
            arguments[current] = f"{arguments[current]} {stripped}".strip()
    text = "\n".join(description).strip()
    # Paragraph breaks survive; lines wrapped inside a paragraph are joined.
    text = "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip())
    return text, arguments


# -------------------------------------------------------------------------------- schemas
def json_schema_for(annotation: Any, where: str = "the annotation") -> dict[str, Any]:
    """The JSON schema of a Python type annotation (see the module docstring for what is
    accepted); a clear ToolDefinitionError for anything else."""
    if annotation is inspect.Parameter.empty:
        raise ToolDefinitionError(f"{where} has no type hint; tools need one (str, int, float, bool, list[...], ...)")
    if annotation is Any:
        return {}
    if annotation is None or annotation is type(None):
        return {"type": "null"}
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is typing.Annotated:
        schema = json_schema_for(arguments[0], where)
        notes = [a for a in arguments[1:] if isinstance(a, str)]
        if notes:
            schema["description"] = " ".join(notes)
        return schema
    if origin is typing.Literal:
        values = list(arguments)
        if not all(isinstance(v, (str, int, float, bool)) or v is None for v in values):
            raise ToolDefinitionError(f"{where}: Literal values must be str, int, float, bool or None, got {values}")
        schema: dict[str, Any] = {"enum": values}
        kinds = {_json_type(v) for v in values}
        if len(kinds) == 1:
            schema = {"type": kinds.pop(), "enum": values}
        return schema
    if origin in (typing.Union, types.UnionType):
        options = [json_schema_for(a, where) for a in arguments]
        return {"anyOf": options}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [member.value for member in annotation]
        if not all(isinstance(v, (str, int, float)) for v in values):
            raise ToolDefinitionError(f"{where}: enum {annotation.__name__} must have str or number values")
        kinds = {_json_type(v) for v in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}
    if annotation is bool:
        return {"type": "boolean"}
    if annotation is int:
        return {"type": "integer"}
    if annotation is float:
        return {"type": "number"}
    if annotation is str:
        return {"type": "string"}
    if annotation in (list, tuple, set, frozenset) or origin in (list, set, frozenset, Sequence, Iterable):
        schema = {"type": "array"}
        if arguments:
            schema["items"] = json_schema_for(arguments[0], where)
        if origin in (set, frozenset) or annotation in (set, frozenset):
            schema["uniqueItems"] = True
        return schema
    if origin is tuple:
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return {"type": "array", "items": json_schema_for(arguments[0], where)}
        items = [json_schema_for(a, where) for a in arguments]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if annotation is dict or origin in (dict, Mapping):
        schema = {"type": "object"}
        if arguments:
            if arguments[0] is not str:
                raise ToolDefinitionError(
                    f"{where}: JSON objects have string keys; use dict[str, ...], got {annotation}"
                )
            schema["additionalProperties"] = json_schema_for(arguments[1], where)
        return schema
    raise ToolDefinitionError(
        f"{where} is {annotation!r}, which has no JSON form; use str, int, float, bool, None, list[...], "
        "tuple[...], set[...], dict[str, ...], Literal[...], an Enum, a union or Optional[...]"
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def _jsonable_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, set, frozenset)):
        return [_jsonable_default(v) for v in value]
    json.dumps(value)  # raises TypeError for a default with no JSON form
    return value


def schema_from_function(function: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """(description, JSON schema of the arguments) for a function, from its signature and docstring."""
    name = getattr(function, "__name__", type(function).__name__)
    try:
        signature = inspect.signature(function)
        hints = typing.get_type_hints(function, include_extras=True)
    except (TypeError, ValueError, NameError) as err:
        raise ToolDefinitionError(f"cannot read the signature of {name}: {err}") from None
    description, documented = parse_docstring(inspect.getdoc(function))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ToolDefinitionError(
                f"{name}: *{parameter.name} / **{parameter.name} cannot be described to a model; name every argument"
            )
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise ToolDefinitionError(
                f"{name}: argument {parameter.name!r} is positional-only; tools are called by name"
            )
        annotation = hints.get(parameter.name, inspect.Parameter.empty)
        schema = json_schema_for(annotation, f"argument {parameter.name!r} of {name}")
        if parameter.name in documented and documented[parameter.name] and "description" not in schema:
            schema["description"] = documented[parameter.name]
        if parameter.default is inspect.Parameter.empty:
            required.append(parameter.name)
        else:
            try:
                schema["default"] = _jsonable_default(parameter.default)
            except TypeError:
                raise ToolDefinitionError(
                    f"{name}: the default of {parameter.name!r} ({parameter.default!r}) has no JSON form"
                ) from None
        properties[parameter.name] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        parameters["required"] = required
    return description, parameters


# ------------------------------------------------------------------------------ the tool
def _result_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def cut_text(text: str, max_chars: int) -> str:
    """`text` cut to about `max_chars`, keeping the head and the tail and saying how much was dropped."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[len(text) - half :]}"


@dataclass
class Tool:
    """A callable offered to a model: name, description, JSON-schema parameters and the
    function that runs with the validated arguments as keyword arguments.

    `timeout_s` bounds one call (None: no bound); `max_result_chars` bounds the text a call
    returns to the model. `convert` (optional) turns the validated JSON arguments into the
    function's keyword arguments (the default converts integral floats for `int` parameters,
    arrays for `tuple`/`set` parameters and values for `Enum` parameters).
    """

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    max_result_chars: int = DEFAULT_MAX_RESULT_CHARS
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    _validator: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ToolDefinitionError(
                f"tool name {self.name!r} is not accepted: use 1 to 64 letters, digits, '_' or '-' (OpenAI's rule)"
            )
        if not callable(self.function):
            raise ToolDefinitionError(f"tool {self.name!r}: function must be callable, got {self.function!r}")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type", "object") != "object":
            raise ToolDefinitionError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ToolDefinitionError(f"tool {self.name!r}: timeout_s must be a positive number or None")
        if not isinstance(self.max_result_chars, int) or self.max_result_chars < 100:
            raise ToolDefinitionError(f"tool {self.name!r}: max_result_chars must be an integer of at least 100")
        try:
            validator_class = jsonschema.validators.validator_for(self.parameters, jsonschema.Draft202012Validator)
            validator_class.check_schema(self.parameters)
        except jsonschema.SchemaError as err:
            raise ToolDefinitionError(
                f"tool {self.name!r}: parameters are not a valid JSON schema: {err.message}"
            ) from None
        self._validator = validator_class(self.parameters)

    @classmethod
    def from_function(
        cls,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
    ) -> Tool:
        """A tool from a function with type hints (schema and description derived, see the module docstring)."""
        derived, parameters = schema_from_function(function)
        description = description if description is not None else derived
        if not description:
            raise ToolDefinitionError(
                f"{getattr(function, '__name__', function)!r} has no docstring; a model needs a description of the "
                "tool (write a docstring or pass description=...)"
            )
        return cls(
            name=name or function.__name__,
            description=description,
            parameters=parameters,
            function=function,
            timeout_s=timeout_s,
            max_result_chars=max_result_chars,
            convert=_converter_for(function),
        )

    def spec(self) -> dict[str, Any]:
        """The tool as an entry of an OpenAI `tools` list."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def argument_errors(self, arguments: Any) -> list[str]:
        """What is wrong with `arguments` against the schema (empty when they are valid)."""
        if not isinstance(arguments, Mapping):
            return [f"arguments must be a JSON object, got {type(arguments).__name__}"]
        errors = sorted(self._validator.iter_errors(dict(arguments)), key=lambda e: list(e.absolute_path))
        out = []
        for error in errors:
            at = "/".join(str(p) for p in error.absolute_path)
            out.append(f"{at}: {error.message}" if at else error.message)
        return out

    def __call__(self, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        """Validate, run with the timeout, and return the result; never raises."""
        started = time.monotonic()
        arguments = {} if arguments is None else arguments
        errors = self.argument_errors(arguments)
        if errors:
            expected = json.dumps(self.parameters, ensure_ascii=False)
            message = f"error: bad arguments for {self.name}: {'; '.join(errors)}. The arguments must match: {expected}"
            return ToolResult(cut_text(message, self.max_result_chars), True, time.monotonic() - started)
        keyword_arguments = self.convert(dict(arguments)) if self.convert else dict(arguments)
        outcome = _run_with_timeout(self.function, keyword_arguments, self.timeout_s)
        duration = time.monotonic() - started
        if outcome.timed_out:
            return ToolResult(
                f"error: {self.name} did not finish within its {self.timeout_s:g} s timeout", True, duration
            )
        if outcome.error is not None:
            error = outcome.error
            return ToolResult(
                cut_text(f"error: {self.name} raised {type(error).__name__}: {error}", self.max_result_chars),
                True,
                duration,
            )
        if isinstance(outcome.value, ToolResult):  # a tool that reports its own error status
            return ToolResult(cut_text(outcome.value.content, self.max_result_chars), outcome.value.is_error, duration)
        return ToolResult(cut_text(_result_text(outcome.value), self.max_result_chars), False, duration)


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False


def _run_with_timeout(function: Callable[..., Any], arguments: dict[str, Any], timeout_s: float | None) -> _Outcome:
    if timeout_s is None:
        try:
            return _Outcome(value=function(**arguments))
        except Exception as err:  # the model hears about it; the loop goes on
            return _Outcome(error=err)
    outcome = _Outcome()

    def target() -> None:
        try:
            outcome.value = function(**arguments)
        except BaseException as err:  # even SystemExit: reported to the model as the tool result
            outcome.error = err

    # A daemon thread: one that overruns its timeout is abandoned, not joined at exit.
    worker = threading.Thread(target=target, name="genforge-tool", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return _Outcome(timed_out=True)
    return outcome


def _converter_for(function: Callable[..., Any]) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """Turns JSON values into what the annotations ask for, where JSON has no such type."""
    hints = typing.get_type_hints(function, include_extras=True)
    conversions: dict[str, Callable[[Any], Any]] = {}
    for name, annotation in hints.items():
        if name == "return":
            continue
        convert = _value_converter(annotation)
        if convert is not None:
            conversions[name] = convert
    if not conversions:
        return None

    def convert(arguments: dict[str, Any]) -> dict[str, Any]:
        return {k: conversions[k](v) if k in conversions else v for k, v in arguments.items()}

    return convert


def _value_converter(annotation: Any) -> Callable[[Any], Any] | None:
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _value_converter(arguments[0])
    if annotation is int:
        return lambda v: int(v) if isinstance(v, float) and v.is_integer() else v
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return lambda v: annotation(v)
    if annotation in (tuple, set, frozenset) or origin in (tuple, set, frozenset):
        kind = origin or annotation
        return lambda v: kind(v) if isinstance(v, list) else v
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in arguments if a is not type(None)]
        if len(inner) == 1 and (convert := _value_converter(inner[0])) is not None:
            return lambda v: None if v is None else convert(v)
    return None


def tool(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
):
    """Make a `Tool` from a function; usable bare (`@tool`) or with options (`@tool(timeout_s=5)`)."""

    def make(fn: Callable[..., Any]) -> Tool:
        return Tool.from_function(
            fn, name=name, description=description, timeout_s=timeout_s, max_result_chars=max_result_chars
        )

    return make(function) if function is not None else make


def as_tools(items: Sequence[Tool | Callable[..., Any] | Any]) -> list[Tool]:
    """Tools from a mix of `Tool`s, plain functions and tool providers (anything with a `tools`
    list, such as an open `MCPServerTools`); duplicate names are refused."""
    tools: list[Tool] = []
    for item in items:
        if isinstance(item, Tool):
            tools.append(item)
        elif not callable(item) and isinstance(getattr(item, "tools", None), list):
            tools.extend(as_tools(item.tools))
        else:
            tools.append(Tool.from_function(item))
    seen: dict[str, int] = {}
    for position, t in enumerate(tools):
        if t.name in seen:
            raise ToolDefinitionError(
                f"two tools are named {t.name!r} (positions {seen[t.name]} and {position}); tool names must be unique "
                "(MCP servers take a prefix for this)"
            )
        seen[t.name] = position
    return tools


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Tool",
    "ToolDefinitionError",
    "ToolResult",
    "as_tools",
    "cut_text",
    "json_schema_for",
    "parse_docstring",
    "schema_from_function",
    "tool",
]
