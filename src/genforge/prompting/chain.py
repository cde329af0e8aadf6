"""Prompt chaining: a pipeline of steps, each a prompt template, a model and an output parser.

A task too big for one prompt is split into steps (Wu et al. 2022, "AI Chains"): extract, then
reason over what was extracted, then write. Each `Step` renders its template from the chain's
inputs and the outputs of the steps before it, asks a `ChatModel`, and parses the reply into a
typed value (text, a JSON object, a regular expression's group, one of a list of choices, an
int or a float) that later steps read by the step's output name.

Everything that can be checked before a model is called is: every variable a step's template
needs must be a chain input or an earlier step's output, and output names must not collide.
A reply that does not parse raises `StepError`, which names the step and carries the raw reply;
`retries` re-asks the model with the parse error appended first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..chat_models import ChatModel
from .parsers import OutputParser, ParseError, parser_for
from .templates import PromptTemplate, load_template

__all__ = ["Chain", "ChainError", "ChainResult", "Step", "StepError", "StepRecord"]


class ChainError(ValueError):
    """A chain that cannot run as built or with the inputs given (said before any model call)."""


class StepError(ValueError):
    """A step's reply did not parse: names the step, says why, and holds the raw reply."""

    def __init__(self, step: str, reason: str, raw: str, attempts: int) -> None:
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"step {step!r}: the reply did not parse{tries}: {reason}; raw reply: {raw!r:.500}")
        self.step, self.reason, self.raw, self.attempts = step, reason, raw, attempts


@dataclass
class Step:
    """One model call of a chain.

    template: a `PromptTemplate` or a Jinja string (its variables are what it reads).
    parser: an `OutputParser`, or "text" / "json" / "int" / "float".
    output: the name later steps read this step's value by (default: the step's name).
    model: this step's model (default: the chain's).
    retries: how many times a reply that does not parse is re-asked, with the error shown.
    """

    name: str
    template: PromptTemplate | str
    parser: OutputParser | str | None = None
    output: str | None = None
    model: ChatModel | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    retries: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ChainError(f"a step needs a non-empty name, got {self.name!r}")
        if isinstance(self.template, str):
            self.template = load_template(self.template, name=self.name)
        elif not isinstance(self.template, PromptTemplate):
            raise ChainError(f"step {self.name!r}: template must be a PromptTemplate or a Jinja string")
        self.parser = parser_for(self.parser)
        self.output = self.output or self.name
        if not self.output.isidentifier():
            raise ChainError(
                f"step {self.name!r}: output name {self.output!r} is not an identifier a template can read"
            )
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ChainError(f"step {self.name!r}: retries must be an integer >= 0, got {self.retries!r}")


@dataclass
class StepRecord:
    """What one step did: the messages sent, each raw reply, and the parsed value."""

    name: str
    messages: list[dict[str, str]]
    replies: list[str]
    value: Any


@dataclass
class ChainResult:
    """The chain's outputs by name (inputs included) and the record of every step."""

    outputs: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]

    @property
    def final(self) -> Any:
        """The last step's value."""
        return self.outputs[self.steps[-1].name] if self.steps else None


class Chain:
    """Steps run in order; each reads the chain's inputs and earlier outputs by name."""

    def __init__(self, steps: Sequence[Step], model: ChatModel | None = None, inputs: Sequence[str] | None = None):
        if not steps:
            raise ChainError("a chain needs at least one step")
        self.steps, self.model = list(steps), model
        names, outputs = set(), set()
        for step in self.steps:
            if not isinstance(step, Step):
                raise ChainError(f"chain steps must be Step objects, got {type(step).__name__}")
            if step.name in names:
                raise ChainError(f"two steps are named {step.name!r}; step names must be unique")
            if step.output in outputs:
                raise ChainError(f"step {step.name!r} writes output {step.output!r}, which an earlier step writes")
            if step.model is None and model is None:
                raise ChainError(f"step {step.name!r} has no model and the chain has none to lend it")
            names.add(step.name)
            outputs.add(step.output)
        # The chain's inputs: given, or every variable no step produces before it is read.
        self.inputs = list(inputs) if inputs is not None else self._free_variables()
        self.check(self.inputs)

    def _free_variables(self) -> list[str]:
        produced: set[str] = set()
        free: list[str] = []
        for step in self.steps:
            free += [v for v in step.template.required if v not in produced and v not in free]
            produced.add(step.output)
        return free

    def check(self, inputs: Sequence[str]) -> None:
        """Refuse, naming the step and variable, a chain whose steps read a value nobody gives."""
        available = set(inputs)
        for step in self.steps:
            missing = [v for v in step.template.required if v not in available]
            if missing:
                raise ChainError(
                    f"step {step.name!r} reads {', '.join(map(repr, missing))}, which is neither a chain input "
                    f"nor an earlier step's output (available: {', '.join(map(repr, sorted(available))) or 'none'})"
                )
            if step.output in inputs:
                raise ChainError(f"step {step.name!r} writes {step.output!r}, which is also a chain input")
            available.add(step.output)

    def output_types(self) -> dict[str, type]:
        """Each step's output name and the type its parser produces."""
        return {step.output: step.parser.output_type for step in self.steps}

    def run(self, **inputs: Any) -> ChainResult:
        unknown = sorted(set(inputs) - set(self.inputs))
        missing = [name for name in self.inputs if name not in inputs]
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing {', '.join(map(repr, missing))}")
            if unknown:
                problems.append(f"unknown {', '.join(map(repr, unknown))}")
            raise ChainError(f"chain inputs: {'; '.join(problems)} (it takes {', '.join(map(repr, self.inputs))})")
        values: dict[str, Any] = dict(inputs)
        result = ChainResult(outputs=values)
        for step in self.steps:
            record = self._run_step(step, values)
            values[step.output] = record.value
            result.steps.append(record)
        return result

    def _run_step(self, step: Step, values: Mapping[str, Any]) -> StepRecord:
        model = step.model or self.model
        readable = {name: values[name] for name in step.template.declared if name in values}
        messages = step.template.messages(**readable)
        conversation = list(messages)
        replies: list[str] = []
        for attempt in range(step.retries + 1):
            reply = model.chat(conversation, max_tokens=step.max_tokens, temperature=step.temperature).content
            replies.append(reply)
            try:
                return StepRecord(step.name, messages, replies, step.parser.parse(reply))
            except ParseError as err:
                if attempt == step.retries:
                    raise StepError(step.name, str(err), reply, len(replies)) from None
                # Show the model its reply and what was wrong with it, and ask again.
                conversation += [
                    {"role": "assistant", "content": reply},
                    {
                        "role": "user",
                        "content": f"That reply could not be read: {err}. Answer again in the asked format.",
                    },
                ]
        raise AssertionError("unreachable")  # pragma: no cover
