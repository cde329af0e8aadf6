"""Output parsers: a model's reply text -> a typed value for the next step of a prompt chain.

Each parser has `parse(text) -> value` and `output_type` (the Python type of its value). A reply
that does not parse raises `ParseError`, which carries the raw text so that the caller (a chain
step, a retry) can show it or feed it back to the model.

- `TextParser`: the text, stripped.
- `JSONParser`: the first JSON object or array in the reply (inside a ```json fence or not),
  optionally checked against a JSON schema.
- `RegexParser`: a regular expression's group (or a dict of its named groups).
- `ChoiceParser`: exactly one of a list of choices, named in the reply.
- `NumberParser`: an int or a float (the last number in the reply, or the first).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ChoiceParser",
    "JSONParser",
    "NumberParser",
    "OutputParser",
    "ParseError",
    "RegexParser",
    "TextParser",
    "parser_for",
]


class ParseError(ValueError):
    """A reply that does not parse: what was expected, and the raw reply."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


@runtime_checkable
class OutputParser(Protocol):
    output_type: type

    def parse(self, text: str) -> Any: ...


@dataclass
class TextParser:
    """The reply as text, stripped of surrounding white space; `allow_empty=False` refuses an empty reply."""

    allow_empty: bool = False
    output_type: type = field(default=str, init=False)

    def parse(self, text: str) -> str:
        stripped = text.strip()
        if not stripped and not self.allow_empty:
            raise ParseError("expected some text, got an empty reply", text)
        return stripped


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n(.*?)```", re.DOTALL)


@dataclass
class JSONParser:
    """The first JSON object (or array, with `allow_array`) in the reply.

    The reply may wrap it in prose or a ```json fence: models do both. With `schema`, the value
    is validated by `jsonschema` and a violation is a `ParseError` that says where.
    """

    schema: Mapping[str, Any] | None = None
    allow_array: bool = False
    output_type: type = field(default=dict, init=False)

    def __post_init__(self) -> None:
        if self.allow_array:
            self.output_type = object
        if self.schema is not None:
            try:
                import jsonschema
            except ImportError:  # pragma: no cover - installed with genforge's dev extras
                raise ImportError("JSONParser(schema=...) validates with jsonschema: pip install jsonschema") from None
            try:
                jsonschema.validators.validator_for(self.schema).check_schema(self.schema)
            except jsonschema.SchemaError as err:
                raise ValueError(f"JSONParser: the schema is not a valid JSON schema ({err.message})") from None

    def parse(self, text: str) -> Any:
        value = self._find(text)
        if self.schema is not None:
            import jsonschema

            error = jsonschema.exceptions.best_match(
                jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(value)
            )
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "the top level"
                raise ParseError(f"the JSON does not match the schema at {where}: {error.message}", text)
        return value

    def _find(self, text: str) -> Any:
        candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
        decoder = json.JSONDecoder()
        openers = "{[" if self.allow_array else "{"
        for candidate in candidates:
            for start, char in enumerate(candidate):
                if char not in openers:
                    continue
                try:
                    value, _ = decoder.raw_decode(candidate, start)
                except json.JSONDecodeError:
                    continue
                return value
        kind = "a JSON object or array" if self.allow_array else "a JSON object"
        raise ParseError(f"expected {kind}, found none in the reply", text)


@dataclass
class RegexParser:
    """A regular expression searched in the reply: its `group` (default: the first group, or the
    whole match without groups); with named groups and `group=None`, a dict of them."""

    pattern: str | re.Pattern
    group: int | str | None = None
    flags: int = 0
    output_type: type = field(default=str, init=False)

    def __post_init__(self) -> None:
        try:
            self._compiled = re.compile(self.pattern, self.flags) if isinstance(self.pattern, str) else self.pattern
        except re.error as err:
            raise ValueError(f"RegexParser: {self.pattern!r} is not a valid regular expression ({err})") from None
        if self.group is None and self._compiled.groupindex:
            self.output_type = dict

    def parse(self, text: str) -> Any:
        match = self._compiled.search(text)
        if match is None:
            raise ParseError(f"expected text matching {self._compiled.pattern!r}, found none", text)
        if self.group is not None:
            try:
                return match.group(self.group)
            except IndexError:
                raise ValueError(f"RegexParser: the pattern has no group {self.group!r}") from None
        if self._compiled.groupindex:
            return match.groupdict()
        return match.group(1) if self._compiled.groups else match.group(0)


@dataclass
class ChoiceParser:
    """Exactly one of `choices`, named in the reply (as a whole word, case-insensitively unless
    `case_sensitive`). A reply that names none, or several, does not parse, except that a reply
    that is exactly one choice (after stripping) always does."""

    choices: Sequence[str]
    case_sensitive: bool = False
    output_type: type = field(default=str, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.choices, str) or not self.choices or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError(f"ChoiceParser takes a non-empty list of non-empty strings, got {self.choices!r}")
        flags = 0 if self.case_sensitive else re.IGNORECASE
        self._patterns = [re.compile(rf"(?<!\w){re.escape(c)}(?!\w)", flags) for c in self.choices]

    def parse(self, text: str) -> str:
        stripped = text.strip().strip(".!\"'`*")
        for choice in self.choices:
            if stripped == choice or (not self.case_sensitive and stripped.casefold() == choice.casefold()):
                return choice
        named = [c for c, pattern in zip(self.choices, self._patterns) if pattern.search(text)]
        # A choice inside a longer one that is named ("positive" inside "very positive") is not
        # named on its own: keep the longest.
        named = [c for c in named if not any(c != other and c.casefold() in other.casefold() for other in named)]
        if len(named) == 1:
            return named[0]
        if not named:
            raise ParseError(f"expected one of {list(self.choices)}, found none in the reply", text)
        raise ParseError(f"expected one of {list(self.choices)}, but the reply names several: {named}", text)


_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class NumberParser:
    """A number in the reply as `int` or `float` (`kind`); `which` picks the `"last"` (where a
    worked answer ends) or the `"first"`. Thousands separators are read ("1,234" -> 1234); an
    int parser refuses a number with a fractional part rather than rounding it."""

    kind: type = float
    which: str = "last"
    output_type: type = field(default=float, init=False)

    def __post_init__(self) -> None:
        if self.kind not in (int, float):
            raise ValueError(f"NumberParser kind must be int or float, got {self.kind!r}")
        if self.which not in ("first", "last"):
            raise ValueError(f"NumberParser which must be 'first' or 'last', got {self.which!r}")
        self.output_type = self.kind

    def parse(self, text: str) -> int | float:
        numbers = _NUMBER.findall(text)
        if not numbers:
            raise ParseError(f"expected a number ({self.kind.__name__}), found none in the reply", text)
        raw = numbers[-1] if self.which == "last" else numbers[0]
        value = float(raw.replace(",", ""))
        if self.kind is int:
            if not value.is_integer():
                raise ParseError(f"expected an integer, got {raw}", text)
            return int(value)
        return value


def parser_for(spec: str | OutputParser | None) -> OutputParser:
    """A parser from a short name ("text", "json", "int", "float") or a parser itself."""
    if spec is None or spec == "text":
        return TextParser()
    if isinstance(spec, str):
        named = {"json": JSONParser, "int": lambda: NumberParser(int), "float": lambda: NumberParser(float)}
        if spec not in named:
            raise ValueError(
                f"unknown parser {spec!r}: give 'text', 'json', 'int', 'float', or a parser object "
                "(RegexParser, ChoiceParser, ...)"
            )
        return named[spec]()
    if not isinstance(spec, OutputParser):
        raise ValueError(f"a parser needs parse(text) and output_type, got {type(spec).__name__}")
    return spec
