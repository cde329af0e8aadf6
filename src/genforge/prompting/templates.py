"""Prompt templates: a Jinja source with the variables it takes declared up front.

A prompt that silently renders `{{ question }}` as an empty string when the caller forgot
`question` is a bug that only shows in the model's answers. So a `PromptTemplate` knows its
variables: rendering with one missing, or with one the template does not declare, is an error
that names it, and a template that uses a variable it does not declare is refused when it is
made. Rendering runs in Jinja's sandbox with `StrictUndefined`, so a template read from a file
cannot reach Python internals and a typo inside a loop fails instead of printing nothing.

Templates come from a string or a file:

- a `.yaml`/`.yml`/`.json` spec: `template` (required), `system`, `variables`, `name`,
  `description`;
- any other text file: the template itself, optionally after front matter between `---`
  lines (YAML, or JSON, which YAML reads too) holding the same keys but `template`.

`variables` is a list of names, or a mapping name -> description, or name -> `{description,
default}`; a variable with a default may be left out. Without `variables`, the variables are
the names the template reads (found by Jinja's parser), all required.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox

__all__ = ["PromptTemplate", "PromptTemplateError", "Variable", "load_template"]

_SPEC_SUFFIXES = (".yaml", ".yml", ".json")
_SPEC_KEYS = {"template", "system", "variables", "name", "description"}
_NO_DEFAULT = object()


class PromptTemplateError(ValueError):
    """A template that cannot be made or rendered: says which template and which variable."""


@dataclass(frozen=True)
class Variable:
    """A declared template variable; `default` is `_NO_DEFAULT` when the caller must give it."""

    name: str
    description: str = ""
    default: Any = _NO_DEFAULT

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT


def _environment() -> jinja2.sandbox.SandboxedEnvironment:
    # keep_trailing_newline: a prompt file's final newline is part of the prompt, as it is in the file.
    return jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )


@dataclass
class PromptTemplate:
    """A Jinja prompt (and optional system prompt) with declared variables.

    `render(**values)` gives the prompt text; `messages(**values)` gives chat messages (the
    system prompt, if any, then the prompt as the user's turn).
    """

    template: str
    variables: Sequence[str] | Mapping[str, Any] | None = None
    system: str | None = None
    name: str = "prompt"
    description: str = ""
    declared: dict[str, Variable] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str):
            raise PromptTemplateError(
                f"template {self.name!r}: the template must be a string, got {self.template!r:.60}"
            )
        if self.system is not None and not isinstance(self.system, str):
            raise PromptTemplateError(f"template {self.name!r}: system must be a string, got {self.system!r:.60}")
        environment = _environment()
        used: set[str] = set()
        for part, source in (("template", self.template), ("system", self.system)):
            if source is None:
                continue
            try:
                used |= jinja2.meta.find_undeclared_variables(environment.parse(source)) - set(environment.globals)
            except jinja2.TemplateSyntaxError as err:
                raise PromptTemplateError(
                    f"template {self.name!r}: the {part} is not valid Jinja (line {err.lineno}: {err.message})"
                ) from None
        self.declared = _declare(self.name, self.variables, used)
        undeclared = sorted(used - set(self.declared))
        if undeclared:
            raise PromptTemplateError(
                f"template {self.name!r} uses {_names(undeclared)} but declares only {_names(self.declared)}; "
                "add them to its variables"
            )
        self._compiled = environment.from_string(self.template)
        self._compiled_system = environment.from_string(self.system) if self.system is not None else None

    @property
    def required(self) -> list[str]:
        """The variables a caller must give, in declaration order."""
        return [v.name for v in self.declared.values() if v.required]

    def values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """`given` checked against the declaration, with defaults filled in."""
        unknown = sorted(set(given) - set(self.declared))
        if unknown:
            raise PromptTemplateError(
                f"template {self.name!r} got {_names(unknown)}, which it does not declare "
                f"(it takes {_names(self.declared)})"
            )
        missing = [name for name in self.required if name not in given]
        if missing:
            raise PromptTemplateError(f"template {self.name!r} needs {_names(missing)}, which was not given")
        return {v.name: given.get(v.name, v.default) for v in self.declared.values()}

    def render(self, **values: Any) -> str:
        """The prompt text for `values` (every required variable, no undeclared one)."""
        return self._render(self._compiled, self.values(values))

    def render_system(self, **values: Any) -> str | None:
        if self._compiled_system is None:
            return None
        return self._render(self._compiled_system, self.values(values))

    def messages(self, **values: Any) -> list[dict[str, str]]:
        """Chat messages: the system prompt (if the template has one), then the prompt as the user's turn."""
        checked = self.values(values)
        messages = []
        if self._compiled_system is not None:
            messages.append({"role": "system", "content": self._render(self._compiled_system, checked)})
        messages.append({"role": "user", "content": self._render(self._compiled, checked)})
        return messages

    def _render(self, compiled: jinja2.Template, values: dict[str, Any]) -> str:
        try:
            return compiled.render(values)
        except jinja2.UndefinedError as err:
            # A declared variable was given but lacks what the template reads from it (an
            # attribute or key): name the template, not just Jinja's message.
            raise PromptTemplateError(f"template {self.name!r}: {err.message}") from None
        except jinja2.sandbox.SecurityError as err:
            raise PromptTemplateError(f"template {self.name!r} tried an unsafe operation: {err}") from None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], name: str = "prompt") -> PromptTemplate:
        """A template from a parsed spec (the keys of a YAML/JSON template file)."""
        if not isinstance(spec, Mapping):
            raise PromptTemplateError(f"template {name!r}: a spec must be a mapping, got {type(spec).__name__}")
        unknown = sorted(set(spec) - _SPEC_KEYS)
        if unknown:
            raise PromptTemplateError(
                f"template {name!r}: unknown spec keys {_names(unknown)} (accepted: {_names(sorted(_SPEC_KEYS))})"
            )
        if "template" not in spec:
            raise PromptTemplateError(f"template {name!r}: the spec has no 'template'")
        return cls(
            template=spec["template"],
            variables=spec.get("variables"),
            system=spec.get("system"),
            name=str(spec.get("name", name)),
            description=str(spec.get("description", "")),
        )


def load_template(source: str | Path, *, name: str | None = None) -> PromptTemplate:
    """A `PromptTemplate` from a file path or a Jinja string (see the module docstring).

    A `Path`, or a string naming an existing file, is read as a file; any other string is the
    template itself (its front matter, if any, is read the same way as a file's).
    """
    path = source if isinstance(source, Path) else None
    if isinstance(source, str) and "\n" not in source and len(source) < 4096:
        try:
            if Path(source).is_file():
                path = Path(source)
        except OSError:  # a string that cannot be a path (too long a name): it is a template
            path = None
    if path is not None:
        if not path.exists() or path.is_dir():  # not is_file(): a pipe such as /dev/stdin is readable too
            raise FileNotFoundError(f"no template file at {path}")
        text = path.read_text(encoding="utf-8")
        label = name or path.stem
        if path.suffix.lower() in _SPEC_SUFFIXES:
            return PromptTemplate.from_spec(_parse_spec(text, label, path.suffix.lower() == ".json"), label)
        return _from_text(text, label)
    if not isinstance(source, str):
        raise PromptTemplateError(f"a template is a file path or a Jinja string, got {type(source).__name__}")
    return _from_text(source, name or "prompt")


def _from_text(text: str, name: str) -> PromptTemplate:
    """A template from text, with optional front matter between `---` lines."""
    lines = text.splitlines(keepends=True)
    if lines and lines[0].strip() == "---":
        for end, line in enumerate(lines[1:], 1):
            if line.strip() == "---":
                spec = _parse_spec("".join(lines[1:end]), name, json_only=False) or {}
                if "template" in spec:
                    raise PromptTemplateError(
                        f"template {name!r}: front matter may not hold 'template' (the text after it is the template)"
                    )
                return PromptTemplate.from_spec({**spec, "template": "".join(lines[end + 1 :])}, name)
        raise PromptTemplateError(f"template {name!r}: front matter opened with '---' is never closed by a '---' line")
    return PromptTemplate(template=text, name=name)


def _parse_spec(text: str, name: str, json_only: bool) -> Any:
    if json_only:
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptTemplateError(f"template {name!r}: the spec is not valid JSON ({err})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PromptTemplateError(f"template {name!r}: the spec is not valid YAML ({err})") from None


def _declare(template: str, variables, used: set[str]) -> dict[str, Variable]:
    if variables is None:  # no declaration: exactly what the template reads, all required
        return {n: Variable(n) for n in sorted(used)}
    declared: dict[str, Variable] = {}
    if isinstance(variables, Mapping):
        for key, value in variables.items():
            if isinstance(value, Mapping):
                extra = sorted(set(value) - {"description", "default"})
                if extra:
                    raise PromptTemplateError(
                        f"template {template!r}: variable {key!r} has unknown keys {_names(extra)} "
                        "(accepted: 'description', 'default')"
                    )
                declared[key] = Variable(key, str(value.get("description", "")), value.get("default", _NO_DEFAULT))
            else:
                declared[key] = Variable(key, "" if value is None else str(value))
    elif isinstance(variables, Sequence) and not isinstance(variables, str):
        for key in variables:
            if key in declared:
                raise PromptTemplateError(f"template {template!r} declares {key!r} twice")
            declared[key] = Variable(key)
    else:
        raise PromptTemplateError(
            f"template {template!r}: variables must be a list of names or a mapping name -> description, "
            f"got {type(variables).__name__}"
        )
    for key in declared:
        if not isinstance(key, str) or not key.isidentifier():
            raise PromptTemplateError(f"template {template!r}: variable names must be identifiers, got {key!r}")
    return declared


def _names(names) -> str:
    names = list(names)
    return ", ".join(repr(n) for n in names) if names else "none"
