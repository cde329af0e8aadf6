"""Tool (function) calling: OpenAI's ``tools`` and ``tool_choice``, checked, constrained and parsed.

A chat model calls a tool by writing the call in the format its chat template taught it, and
the caller turns that text into OpenAI's ``tool_calls`` (Schick et al. 2023, "Toolformer",
for the idea; OpenAI's function-calling API and the chat templates of Qwen2.5, Hermes 2 Pro and
Llama 3.1 for the shapes). Four pieces, each a pure function or a small class:

- :func:`check_tools` and :func:`check_tool_choice`: the request's ``tools`` (``type:
  function``, a ``name``, a ``description``, JSON-schema ``parameters``) and ``tool_choice``
  (``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}``),
  refused with a :class:`ToolCallError` that names the argument and says why: an unknown
  function, a duplicate name, a schema the grammar compiler (llguidance) rejects.
- :func:`tool_call_format`: which call format the model's chat template uses, recognised from
  the template itself: Hermes/Qwen (``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  calls one after another) or Llama 3's JSON (``{"name": ..., "parameters": {...}}``, calls
  joined by ``"; "``). A template that does not render ``tools`` at all is refused.
- :func:`tool_call_grammar` / :func:`tool_call_constraint`: a Lark grammar for llguidance
  (``generate.constrained``) in which each call is a JSON object whose ``name`` is one tool's
  name (a ``const``) and whose arguments follow that tool's schema (``anyOf`` over the tools), so
  that with ``required`` or a named function every finished call is valid against its schema
  (constrained decoding: Willard & Louf 2023; Geng et al. 2023). With ``auto`` the model
  writes free text, and the grammar takes over once it opens a call (the opening tag for
  Hermes; a leading ``{`` for Llama 3, whose free text therefore never starts with one).
- :class:`ToolCallParser`: model output, fed piece by piece as it is generated, into content
  and calls (``id`` ``call_...``, ``type: function``, ``function.name``, ``function.arguments``
  as a JSON string), as streaming events; :func:`parse_tool_calls` runs it over a whole text,
  so a streamed answer joins to exactly the non-streamed one.

:func:`local_tool_reply` puts them together for an in-process model (`chat_models.LocalChatModel`),
so that agents can use tools without a server. Arguments are written with ``", "`` and ``": "``
between items, as the templates' ``tojson`` writes them in the prompt.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance

from .constrained import GrammarConstraint

__all__ = [
    "ToolCallError",
    "FunctionTool",
    "ToolChoice",
    "ToolCallFormat",
    "HERMES",
    "LLAMA3_JSON",
    "check_tools",
    "check_tool_choice",
    "tool_call_format",
    "tool_call_grammar",
    "tool_call_constraint",
    "ContentDelta",
    "ToolCallStart",
    "ArgumentsDelta",
    "ToolCallParser",
    "ParsedReply",
    "parse_tool_calls",
    "new_call_id",
    "template_arguments",
    "messages_for_template",
    "ToolReply",
    "local_tool_reply",
]

# OpenAI's rule for function names.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The separators the chat templates' `tojson` writes (json.dumps' defaults): the model reads
# calls written this way in its prompt, so it is asked to write them the same way.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Keys of a JSON schema whose values are data, not schemas: a "$ref" inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


class ToolCallError(ValueError):
    """A ``tools``/``tool_choice`` request that cannot be served; ``param`` names the argument at fault."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------------------------ the request


@dataclass(frozen=True)
class FunctionTool:
    """One function the model may call: its name, what it does, and the JSON schema of its arguments."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The tool in OpenAI's form, as chat templates read it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


def check_tools(tools: Any) -> list[FunctionTool]:
    """The request's ``tools``, checked: OpenAI's form, unique names, and parameter schemas that
    describe a JSON object and that llguidance compiles. Raises :class:`ToolCallError`."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not tools:
        raise ToolCallError(
            'tools must be a non-empty list of {"type": "function", "function": {"name": ..., '
            f'"description": ..., "parameters": <JSON schema>}}}}; got {tools!r:.80}'
        )
    checked: list[FunctionTool] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if (
            not isinstance(tool, Mapping)
            or tool.get("type") != "function"
            or not isinstance(tool.get("function"), Mapping)
        ):
            raise ToolCallError(
                f'{where} must be {{"type": "function", "function": {{...}}}} (only function tools are served); '
                f"got {tool!r:.80}",
                where,
            )
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolCallError(
                f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes; got {name!r}",
                f"{where}.function.name",
            )
        if any(t.name == name for t in checked):
            raise ToolCallError(f"{where}: two tools are named {name!r}; give each function its own name", where)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolCallError(f"{where}.function.description must be a string", f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is None:  # OpenAI's default: a function without arguments
            parameters = {"type": "object", "properties": {}}
        checked.append(FunctionTool(name, description, _check_parameters(parameters, name, f"{where}.function")))
    return checked


def _check_parameters(parameters: Any, name: str, where: str) -> dict[str, Any]:
    param = f"{where}.parameters"
    if not isinstance(parameters, Mapping):
        raise ToolCallError(f"{param} of {name!r} must be a JSON schema object, got {parameters!r:.80}", param)
    kind = parameters.get("type")
    if kind is not None and kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise ToolCallError(
            f'{param} of {name!r} must describe a JSON object ("type": "object"): a call\'s arguments are '
            f"named; got type {kind!r}",
            param,
        )
    try:
        plain = json.loads(json.dumps(parameters))
    except (TypeError, ValueError) as err:
        raise ToolCallError(f"{param} of {name!r} is not JSON data: {err}", param) from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(plain, defaults=_JSON_STYLE)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        message = messages[0] if failed else ""
    except (ValueError, TypeError) as err:
        message = str(err)
    if message:
        raise ToolCallError(
            f"the parameters schema of {name!r} cannot be used for constrained decoding: {_first_line(message)}", param
        )
    return plain


@dataclass(frozen=True)
class ToolChoice:
    """What the model may do: ``"none"`` (answer in text), ``"auto"`` (text or calls),
    ``"required"`` (one call or more, to any tool) or ``"function"`` (one call to ``name``)."""

    mode: str
    name: str | None = None


def check_tool_choice(tool_choice: Any, tools: Sequence[FunctionTool]) -> ToolChoice:
    """``tool_choice`` checked against the tools; None is OpenAI's default, ``"auto"``."""
    if tool_choice is None:
        return ToolChoice("auto")
    if isinstance(tool_choice, str):
        if tool_choice in ("none", "auto", "required"):
            return ToolChoice(tool_choice)
        raise ToolCallError(
            f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}; '
            f"got {tool_choice!r}",
            "tool_choice",
        )
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(tool_choice, Mapping) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ToolCallError(
            'tool_choice names a function as {"type": "function", "function": {"name": ...}}; '
            f"got {tool_choice!r:.80}",
            "tool_choice",
        )
    known = [t.name for t in tools]
    if name not in known:
        raise ToolCallError(
            f"tool_choice names the function {name!r}, which is not among the tools ({', '.join(known)})",
            "tool_choice",
        )
    return ToolChoice("function", name)


# --------------------------------------------------------------------------------- the call format


@dataclass(frozen=True)
class ToolCallFormat:
    """How a chat template writes a call: each call's JSON object between ``open_tag + "\\n"`` and
    ``"\\n" + close_tag`` (Hermes) or bare (Llama 3), the arguments under ``arguments_key``, and
    ``separator`` between calls."""

    name: str
    arguments_key: str
    open_tag: str | None
    close_tag: str | None
    separator: str


HERMES = ToolCallFormat("hermes", "arguments", "<tool_call>", "</tool_call>", "\n")
LLAMA3_JSON = ToolCallFormat("llama3_json", "parameters", None, None, "; ")

_PROBE = {
    "type": "function",
    "function": {
        "name": "genforge_probe_tool",
        "description": "probe",
        "parameters": {"type": "object", "properties": {}},
    },
}
# tokenizer -> (template source, its format): rendering the probe once per template.
_FORMATS: weakref.WeakKeyDictionary[Any, tuple[str, ToolCallFormat]] = weakref.WeakKeyDictionary()


def _tool_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # several named templates: the one apply_chat_template picks for tools
        template = template.get("tool_use", template.get("default"))
    return template if isinstance(template, str) else None


def tool_call_format(tokenizer: Any) -> ToolCallFormat:
    """The call format of the tokenizer's chat template; :class:`ToolCallError` when the template
    does not render ``tools`` (then the model was never shown a tool, and cannot call one).

    The template is asked to render a probe tool: if the probe's name is missing from the
    text, the template ignores tools. A template that mentions ``<tool_call>`` is Hermes/Qwen;
    one that spells out a ``"parameters"`` key is Llama 3's JSON; any other template that
    renders tools gets the Hermes format, the most widely trained one.
    """
    template = _tool_template(tokenizer)
    fix = (
        "serve a model whose chat template supports tools (Qwen2.5, Llama 3.1+ Instruct, Hermes 2 Pro), or put a "
        "template that renders `tools` in its tokenizer_config.json (chat_template) or chat_template.jinja"
    )
    if template is None:
        raise ToolCallError(f"the model has no chat template, so it cannot be offered tools; {fix}")
    try:
        cached = _FORMATS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == template:
        return cached[1]
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "probe"}], add_generation_prompt=True, tools=[_PROBE]
        )
    except ValueError as err:  # ChatTemplateError
        raise ToolCallError(f"the model's chat template fails when given tools ({err}); {fix}") from None
    if _PROBE["function"]["name"] not in rendered:
        raise ToolCallError(f"the model's chat template does not render tools, so the model never sees them; {fix}")
    if "<tool_call>" in template or "<tool_call>" in rendered:
        found = HERMES
    elif re.search(r'"parameters\\?"\s*:', template):
        found = LLAMA3_JSON
    else:
        found = HERMES
    try:
        _FORMATS[tokenizer] = (template, found)
    except TypeError:
        pass
    return found


# ------------------------------------------------------------------------------------- the grammar


def _rewrite_refs(node: Any, prefix: str) -> Any:
    """Local ``$ref`` pointers ("#...") re-rooted under ``prefix``: a tool's schema moves from the
    document root into the call grammar's ``$defs``."""
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                out[key] = prefix + value[1:]
            elif key in _DATA_KEYWORDS:
                out[key] = value
            else:
                out[key] = _rewrite_refs(value, prefix)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


def _call_schema(tools: Sequence[FunctionTool], fmt: ToolCallFormat) -> dict[str, Any]:
    """The JSON schema of one call: ``{"name": const, <arguments_key>: the tool's schema}``, any tool."""
    options, definitions = [], {}
    for i, tool in enumerate(tools):
        arguments: dict[str, Any] = tool.parameters
        if "$ref" in json.dumps(arguments):  # references resolve against the root: move the schema there
            key = f"genforge_tool_{i}"
            definitions[key] = _rewrite_refs(arguments, f"#/$defs/{key}")
            arguments = {"$ref": f"#/$defs/{key}"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, fmt.arguments_key: arguments},
                "required": ["name", fmt.arguments_key],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = dict(options[0]) if len(options) == 1 else {"anyOf": options}
    if definitions:
        schema["$defs"] = definitions
    schema["x-guidance"] = _JSON_STYLE
    return schema


def _tag(tag: str, token_tags: Iterable[str]) -> str:
    # A tag that is one added token is named as a token (llguidance keeps added tokens out of
    # byte-level text); otherwise it is a string the model writes piece by piece.
    return tag if tag in token_tags else json.dumps(tag)


def tool_call_grammar(
    tools: Sequence[FunctionTool],
    choice: ToolChoice,
    fmt: ToolCallFormat,
    *,
    parallel: bool = True,
    token_tags: Iterable[str] = (),
) -> str:
    """The Lark grammar (llguidance's dialect) of what the model may write under ``choice``.

    ``required``: one call, or several in a row when ``parallel``; a named function: one call
    to it; ``auto``: free text, or calls once the model opens one. ``token_tags``: the format's
    tags that are single added tokens of the tokenizer. ``none`` has no grammar (ValueError).
    """
    if choice.mode == "none":
        raise ValueError('tool_choice "none" leaves the text unconstrained: it has no grammar')
    token_tags = frozenset(token_tags)
    offered = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    call = "%json " + json.dumps(_call_schema(offered, fmt), ensure_ascii=False)
    many = parallel and choice.mode != "function"
    if fmt.open_tag is not None:
        opening = _tag(fmt.open_tag, token_tags)
        closing = _tag(fmt.close_tag, token_tags)
        block = f'"\\n" call "\\n" {closing}'
        rest = f"({json.dumps(fmt.separator)} {opening} {block})*" if many else ""
        if choice.mode != "auto":
            body = f"start: {opening} {block} {rest}"
        elif fmt.open_tag in token_tags:
            # The tag token cannot occur inside TEXT (a byte-level lexeme), so TEXT ends where it starts.
            body = f"start: TEXT | TEXT {opening} {block} {rest}"
        else:
            # A lazy lexeme ends at the first occurrence of the tag: free text up to the call's start.
            body = f"start: TEXT | text_then_open {block} {rest}\ntext_then_open[lazy]: TEXT {opening}"
        return f"%llguidance {{}}\n{body}\ncall: {call}\nTEXT: /(.|\\n)*/\n"
    rest = f"({json.dumps(fmt.separator)} call)*" if many else ""
    if choice.mode != "auto":
        return f"%llguidance {{}}\nstart: call {rest}\ncall: {call}\n"
    # Free text may not start with "{" (after any blank), which is how a call starts.
    return (
        f"%llguidance {{}}\nstart: TEXT | call {rest}\ncall: {call}\nTEXT: /([ \\t\\r\\n]*[^{{ \\t\\r\\n](.|\\n)*)?/\n"
    )


def _token_tags(tokenizer: Any, fmt: ToolCallFormat) -> set[str]:
    backend = getattr(tokenizer, "backend", tokenizer)
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    return {tag for tag in (fmt.open_tag, fmt.close_tag) if tag is not None and tag in added}


def tool_call_constraint(
    tokenizer: Any,
    tools: Sequence[FunctionTool],
    choice: ToolChoice,
    fmt: ToolCallFormat,
    *,
    parallel: bool = True,
    eos_token_ids: int | Iterable[int] | None = None,
    count: int = 1,
) -> list[GrammarConstraint]:
    """``count`` logits processors (one per sequence: each keeps its own grammar state) that keep
    the output inside :func:`tool_call_grammar`.

    A compiled grammar is kept per tokenizer (the last 32 tool sets, choices and formats), and
    each request's constraints start from a copy of it: agents send the same tools request
    after request, and compiling costs some milliseconds each time, taken from the steps of
    the requests already decoding."""
    if choice.mode == "none":
        return []
    grammar = tool_call_grammar(tools, choice, fmt, parallel=parallel, token_tags=_token_tags(tokenizer, fmt))
    eos = None if eos_token_ids is None else tuple([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids)
    key = (grammar, eos)
    with _COMPILED_LOCK:
        try:
            compiled = _COMPILED.setdefault(tokenizer, OrderedDict())
        except TypeError:  # not weak-referenceable: no cache
            compiled = OrderedDict()
        prototype = compiled.get(key)
        if prototype is not None:
            compiled.move_to_end(key)
    if prototype is None:
        what = f"tool calls ({choice.mode}{': ' + choice.name if choice.name else ''}, {fmt.name} format)"
        try:
            prototype = GrammarConstraint(
                llguidance.LLMatcher.grammar_from_lark(grammar), tokenizer, what=what, eos_token_ids=eos
            )
        except ValueError as err:
            raise ToolCallError(f"the tools cannot be used for constrained decoding: {_first_line(err)}") from None
        with _COMPILED_LOCK:
            compiled[key] = prototype
            while len(compiled) > 32:
                compiled.popitem(last=False)
    return [prototype.fresh() for _ in range(count)]


# tokenizer -> {(grammar, eos ids): a compiled constraint that has seen nothing}, least recently used first.
_COMPILED: weakref.WeakKeyDictionary[Any, OrderedDict] = weakref.WeakKeyDictionary()
_COMPILED_LOCK = threading.Lock()


def _first_line(message: Any) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return lines[0] if lines else str(message)


# -------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ContentDelta:
    """Text of the reply (outside any call)."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """Call ``index`` begins: its id and function name are known."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    """More of call ``index``'s arguments (JSON text); the pieces join to ``function.arguments``."""

    index: int
    text: str


Event = ContentDelta | ToolCallStart | ArgumentsDelta


def new_call_id() -> str:
    """A call id in OpenAI's form, ``call_`` and 24 characters."""
    return "call_" + uuid.uuid4().hex[:24]


# The start of a call object up to its arguments' value: name first, as the grammar writes it.
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a call with it when it is decoded as text


@dataclass
class _Call:
    raw: str = ""  # the call object's text so far
    scanned: int = 0  # characters of `raw` the scanner has read
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    index: int | None = None  # set once the name is known
    arguments_start: int | None = None
    arguments_end: int | None = None
    sent: int = 0  # characters of the arguments already reported
    closed: bool = False


class ToolCallParser:
    """Model output, fed in pieces, as content and tool-call events (`ContentDelta`,
    `ToolCallStart`, `ArgumentsDelta`).

    Text that may still turn out to be the start of a call (a partial opening tag, trailing
    blanks) is held back until the next piece decides it. A call is recognised as a JSON object
    whose first key is ``"name"`` and second ``"arguments"`` (or ``"parameters"``); its arguments
    are reported as they arrive, exactly as written. A call object that does not have that shape
    is parsed whole when it closes (``json.loads``), and becomes content if it is not a call. An
    unfinished call at the end (generation cut by ``max_tokens``) keeps the arguments written so
    far if its name was complete, and is content otherwise.
    """

    def __init__(self, fmt: ToolCallFormat, new_id: Callable[[], str] = new_call_id) -> None:
        self.fmt, self.new_id = fmt, new_id
        self.calls = 0  # calls started so far
        self._mode = "start"  # start | text | plain | call | after
        self._pending = ""  # text received and not yet decided
        self._call: _Call | None = None
        self._opening = ""  # the text that opened the current call (tag, newline), for content if it fails

    # ------------------------------------------------------------------------------- feeding

    def feed(self, text: str) -> list[Event]:
        """The events ``text`` (the next piece of output) decides."""
        self._pending += text
        events: list[Event] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[Event]:
        """The events of whatever is still held back, at the end of the output."""
        events: list[Event] = []
        while self._step(events, final=True):
            pass
        call = self._call
        if call is not None:  # cut short inside a call
            if call.index is not None:
                self._send_arguments(call, events)
            else:
                events.append(ContentDelta(self._opening + call.raw))
            self._call = None
        if self._pending and self._mode in ("text", "plain", "start"):
            events.append(ContentDelta(self._pending))
        self._pending = ""
        return [e for e in events if not isinstance(e, ContentDelta) or e.text]

    # ------------------------------------------------------------------------------ the states

    def _step(self, events: list[Event], final: bool) -> bool:
        """Decide what can be decided of the pending text; True when another step may decide more."""
        if self._mode == "start":
            return self._start(events, final)
        if self._mode == "plain":
            if self._pending:
                events.append(ContentDelta(self._pending))
                self._pending = ""
            return False
        if self._mode == "text":
            return self._text(events, final)
        if self._mode == "call":
            return self._scan_call(events)
        return self._after_call(events, final)

    def _start(self, events: list[Event], final: bool) -> bool:
        if self.fmt.open_tag is not None:
            self._mode = "text"
            return True
        # Llama 3: the reply is calls if it starts with "{" (after blanks and an optional python tag).
        body = self._pending.lstrip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG) :].lstrip()
        elif _PYTHON_TAG.startswith(body) and body and not final:
            return False
        if not body:
            return False
        if body.startswith("{"):
            self._opening, self._pending = self._pending[: len(self._pending) - len(body)], body
            self._call, self._mode = _Call(), "call"
        else:
            self._mode = "plain"
        return True

    def _text(self, events: list[Event], final: bool) -> bool:
        tag = self.fmt.open_tag
        at = self._pending.find(tag)
        if at >= 0:
            before = self._pending[:at]
            if before.strip():
                events.append(ContentDelta(before.rstrip() if self.calls == 0 else before))
            self._opening = tag
            self._pending = self._pending[at + len(tag) :]
            self._call, self._mode = None, "call"
            return True
        if final:
            return False
        # Hold back a partial tag at the end, and the blanks before it (dropped if a call follows).
        keep = next(
            (k for k in range(min(len(tag) - 1, len(self._pending)), 0, -1) if tag.startswith(self._pending[-k:])), 0
        )
        head = self._pending[: len(self._pending) - keep]
        send = head.rstrip()
        if send:
            events.append(ContentDelta(send))
            self._pending = self._pending[len(send) :]
        return False

    def _scan_call(self, events: list[Event]) -> bool:
        call = self._call
        if call is None:  # after an opening tag: blanks, then the object
            body = self._pending.lstrip()
            if not body:
                return False
            if not body.startswith("{"):  # not a call after all: the tag and text are content
                events.append(ContentDelta(self._opening + self._pending))
                self._pending, self._mode = "", "text"
                return True
            self._opening += self._pending[: len(self._pending) - len(body)]
            self._pending = body
            call = self._call = _Call()
        call.raw += self._pending
        self._pending = ""
        raw = call.raw
        if call.index is None and call.arguments_start is None:
            # The head is anchored at the object's start: it is found however much text follows it.
            head = _CALL_HEAD.match(raw)
            if head is not None:
                self._start_call(call, json.loads(head.group(1)), head.end(), events)
        for i in range(call.scanned, len(raw)):
            char = raw[i]
            if call.in_string:
                if call.escaped:
                    call.escaped = False
                elif char == "\\":
                    call.escaped = True
                elif char == '"':
                    call.in_string = False
                continue
            if char == '"':
                call.in_string = True
            elif char in "{[":
                call.depth += 1
            elif char in "}]":
                call.depth -= 1
                if call.depth == 0:
                    if call.arguments_start is not None and call.arguments_end is None:
                        call.arguments_end = i
                    self._pending = raw[i + 1 :]
                    call.raw = raw[: i + 1]
                    self._close_call(call, events)
                    return True
            elif char == "," and call.depth == 1 and call.arguments_start is not None and i >= call.arguments_start:
                if call.arguments_end is None:
                    call.arguments_end = i  # more keys follow the arguments
        call.scanned = len(raw)
        if call.index is not None:
            self._send_arguments(call, events)
        return False

    def _start_call(self, call: _Call, name: str, arguments_start: int, events: list[Event]) -> None:
        call.index, call.arguments_start = self.calls, arguments_start
        self.calls += 1
        events.append(ToolCallStart(call.index, self.new_id(), name))

    def _send_arguments(self, call: _Call, events: list[Event]) -> None:
        end = call.arguments_end if call.arguments_end is not None else len(call.raw)
        text = call.raw[call.arguments_start : end].strip()  # blanks may surround the value
        if len(text) > call.sent:
            events.append(ArgumentsDelta(call.index, text[call.sent :]))
            call.sent = len(text)

    def _close_call(self, call: _Call, events: list[Event]) -> None:
        self._call = None
        if call.index is not None:
            self._send_arguments(call, events)
        else:  # not in the streaming shape: parse it whole
            try:
                value = json.loads(call.raw)
            except json.JSONDecodeError:
                value = None
            arguments = value.get(self.fmt.arguments_key, value.get("arguments")) if isinstance(value, dict) else None
            if isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(arguments, dict):
                index = self.calls
                self.calls += 1
                events.append(ToolCallStart(index, self.new_id(), value["name"]))
                events.append(ArgumentsDelta(index, json.dumps(arguments, ensure_ascii=False)))
            else:
                events.append(ContentDelta(self._opening + call.raw))
        self._mode = "after"

    def _after_call(self, events: list[Event], final: bool) -> bool:
        body = self._pending.lstrip()
        if not body:
            return False
        close = self.fmt.close_tag
        if close is not None:
            if body.startswith(close):
                self._pending = body[len(close) :]
                self._mode = "text"
                return True
            if close.startswith(body):  # a closing tag still arriving (or cut off at the end)
                if final:
                    self._pending = ""
                return False
            self._mode = "text"  # no closing tag: whatever follows is text (or the next call)
            return True
        separator = self.fmt.separator.strip()
        if body.startswith(separator):
            rest = body[len(separator) :].lstrip()
            if not rest:
                return False
            if rest.startswith("{"):
                self._opening, self._pending = "", rest
                self._call, self._mode = _Call(), "call"
                return True
        self._mode = "plain"
        return True


@dataclass
class ParsedReply:
    """A whole reply: its content (None when it only made calls) and its tool calls in OpenAI's form."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def collect_events(events: Iterable[Event]) -> ParsedReply:
    """Join streaming events into the whole reply."""
    content, calls = "", []
    for event in events:
        if isinstance(event, ContentDelta):
            content += event.text
        elif isinstance(event, ToolCallStart):
            calls.append({"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}})
        else:
            calls[event.index]["function"]["arguments"] += event.text
    return ParsedReply(None if calls and not content else content, calls)


def parse_tool_calls(text: str, fmt: ToolCallFormat, new_id: Callable[[], str] = new_call_id) -> ParsedReply:
    """Content and tool calls of a whole reply (the :class:`ToolCallParser` run over it at once)."""
    parser = ToolCallParser(fmt, new_id)
    return collect_events([*parser.feed(text), *parser.finish()])


def template_arguments(arguments: Any) -> Any:
    """A call's arguments as chat templates read them: OpenAI sends JSON text, and templates (as
    transformers documents them) expect the mapping, which they write with ``tojson``. Text
    that is not a JSON object is left as it is."""
    if not isinstance(arguments, str):
        return arguments
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def messages_for_template(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with each assistant tool call's arguments as :func:`template_arguments` gives them."""
    out = []
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            converted = []
            for call in calls:
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping) and "arguments" in function:
                    function = {**function, "arguments": template_arguments(function["arguments"])}
                    call = {**call, "function": function}
                converted.append(call)
            message["tool_calls"] = converted
        out.append(message)
    return out


# ---------------------------------------------------------------------------- in-process replies


@dataclass
class ToolReply:
    """An in-process model's reply when offered tools; `chat_models.Reply` holds the same fields."""

    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    completion_tokens: int


def local_tool_reply(
    chat_model: Any,
    prompt_ids: Sequence[int],
    tools: Sequence[Mapping[str, Any]],
    tool_choice: str | Mapping[str, Any] | None,
    params: Any,
    *,
    parallel_tool_calls: bool = True,
) -> ToolReply:
    """One reply of an in-process model (``chat_model.model``, ``.tokenizer``, ``.eos_token_ids``)
    to ``prompt_ids`` (the conversation rendered with ``tools``), under ``tool_choice``, sampled
    with ``params`` (a `SamplingParams`). Calls are constrained and parsed as the server does."""
    from .generator import generate

    checked = check_tools(tools)
    choice = check_tool_choice(tool_choice, checked)
    tokenizer = chat_model.tokenizer
    fmt = tool_call_format(tokenizer)
    # The ids that end generation end a finished call too; None: the tokenizer's EOS.
    eos = chat_model.eos_token_ids or getattr(chat_model.model.config, "eos_token_id", None)
    constraints = tool_call_constraint(tokenizer, checked, choice, fmt, parallel=parallel_tool_calls, eos_token_ids=eos)
    [completion] = generate(
        chat_model.model,
        [list(prompt_ids)],
        params,
        tokenizer=tokenizer,
        eos_token_ids=eos,
        extra_processors=constraints,
    )
    finish_reason = completion.finish_reason or "stop"
    if choice.mode == "none":
        return ToolReply(completion.text or "", [], finish_reason, len(completion.token_ids))
    parsed = parse_tool_calls(completion.text or "", fmt)
    if parsed.tool_calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return ToolReply(parsed.content or "", parsed.tool_calls, finish_reason, len(completion.token_ids))
