"""From a validated request body to what the engine runs: prompts, sampling parameters, constraints.

The schemas (`schemas.py`) check each field alone; here the checks that need the model (its
tokenizer, vocabulary and context length) are made, and a request is refused with a 400 that
names the argument at fault before any engine work starts. The result is a
:class:`Prepared`: one :class:`SamplingParams` (and logits processors) per sequence, ``n``
sequences per prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..generate.constrained import JsonSchemaConstraint
from ..generate.sampling import SamplingParams
from ..generate.tool_calls import (
    FunctionTool,
    ToolCallError,
    ToolCallFormat,
    ToolChoice,
    check_tool_choice,
    check_tools,
    template_arguments,
    tool_call_constraint,
    tool_call_format,
)
from .errors import bad
from .schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat

__all__ = [
    "Prepared",
    "ModelLimits",
    "completion_prompts",
    "chat_prompt",
    "response_format_constraints",
    "ToolRequest",
    "tool_request",
    "tool_call_constraints",
    "prepare",
    "decode_prompt",
]


@dataclass
class Prepared:
    """A validated generation request, ready for the engine."""

    model: str
    prompts: list[list[int]]  # token ids, one list per prompt
    prompt_texts: list[str]
    params: list[SamplingParams]  # one per sequence, prompt-major: prompt i choice j at i * n + j
    n: int
    logprobs: int | None
    processors: list[Sequence[Any]]  # per sequence
    ignore_eos: bool
    stream: bool
    include_usage: bool
    echo: bool = False  # the response text (and logprobs) starts with the prompt's
    score_only: bool = False  # max_tokens 0 with echo: the one token generated is dropped
    adapter: str | None = None  # the LoRA adapter over `model` to run with; None: the base
    tool_format: ToolCallFormat | None = None  # set: outputs are parsed into content and tool calls


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the served model's context and vocabulary."""

    context: int  # tokens, prompt and completion together
    vocabulary: int  # token ids below this have text (the tokenizer's length)


def decode_prompt(tokenizer, ids: list[int], index: int, param: str = "prompt") -> str:
    """The text of a prompt given as token ids, refusing ids the tokenizer does not have."""
    limit = len(tokenizer)
    bad_ids = [t for t in ids if t >= limit]
    if bad_ids:
        raise bad(f"{param} {index} has token id {bad_ids[0]} outside the vocabulary (0..{limit - 1})", param)
    return tokenizer.decode(ids)


def completion_prompts(body: CompletionRequest, tokenizer) -> tuple[list[list[int]], list[str]]:
    """The prompts of a completions request as token ids and as text, whichever form it used."""
    if body.max_tokens == 0 and not body.echo:
        raise bad("max_tokens must be >= 1 (0 is only for echo, to score the prompt)", "max_tokens")
    if body.suffix:
        raise bad("suffix (fill-in-the-middle) is not supported by /v1/completions", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad(f"best_of must equal n ({body.n}) when given: choices are not re-ranked", "best_of")
    prompt = body.prompt
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt[0], str):
        texts = list(prompt)
    else:
        prompts = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
        return prompts, [decode_prompt(tokenizer, p, i) for i, p in enumerate(prompts)]
    return [tokenizer.encode(t, add_special_tokens=True) for t in texts], texts


def _message_dicts(body: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template reads them: text content only."""
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad(
                        f"content part of type {part.type!r} is not supported: this server serves text "
                        'models; send {"type": "text", "text": ...} parts',
                        f"messages[{i}].content[{j}]",
                    )
            content = "".join(part.text for part in content)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.tool_calls:
            # A turn of calls carries no text unless it has some (templates test `content`).
            entry["content"] = content
            entry["tool_calls"] = [_template_tool_call(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            entry["name"] = message.name
        messages.append(entry)
    return messages


def _template_tool_call(call) -> dict:
    arguments = template_arguments(call.function.arguments)
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


@dataclass(frozen=True)
class ToolRequest:
    """A chat request's tools, checked, and what the model may do with them."""

    tools: list[FunctionTool]
    choice: ToolChoice
    format: ToolCallFormat
    parallel: bool

    def template_tools(self) -> list[dict]:
        return [tool.as_openai() for tool in self.tools]


def tool_request(body: ChatCompletionRequest, tokenizer) -> ToolRequest | None:
    """The request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked against each
    other and the model's chat template; None when no tools are given."""
    if body.tools is None:
        for name in ("tool_choice", "parallel_tool_calls"):
            if getattr(body, name) is not None:
                raise bad(f"{name} is only allowed when tools are given", name)
        return None
    try:
        tools = check_tools([tool.model_dump(exclude_none=True) for tool in body.tools])
        choice = check_tool_choice(
            body.tool_choice if isinstance(body.tool_choice, str | None) else body.tool_choice.model_dump(), tools
        )
        fmt = tool_call_format(tokenizer)
    except ToolCallError as err:
        raise bad(str(err), err.param) from None
    if choice.mode != "none" and body.response_format is not None and body.response_format.type != "text":
        raise bad(
            f"response_format {body.response_format.type!r} cannot be combined with tools (tool_choice "
            f"{body.tool_choice or 'auto'!r}): tool calls have their own format; send one or the other, or "
            'tool_choice "none"',
            "response_format",
        )
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    return ToolRequest(tools, choice, fmt, parallel)


async def tool_call_constraints(request: ToolRequest, tokenizer, eos_token_ids: Sequence[int], count: int) -> list:
    """``count`` tool-call grammar constraints, one per sequence; none for ``tool_choice: "none"``."""

    def build():
        return tool_call_constraint(
            tokenizer,
            request.tools,
            request.choice,
            request.format,
            parallel=request.parallel,
            eos_token_ids=eos_token_ids,
            count=count,
        )

    try:  # compiling the grammar takes a while: not on the loop
        return await asyncio.to_thread(build)
    except ToolCallError as err:
        raise bad(str(err), err.param) from None


def chat_prompt(
    body: ChatCompletionRequest, tokenizer, model: str, tools: ToolRequest | None = None
) -> tuple[list[int], str]:
    """The prompt of a chat request, rendered with the model's chat template (and ``tools``,
    when given): ids and text."""
    if body.top_logprobs is not None and not body.logprobs:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    if (
        body.max_tokens is not None
        and body.max_completion_tokens is not None
        and body.max_tokens != body.max_completion_tokens
    ):
        raise bad(
            "give max_completion_tokens or max_tokens (its older name), not two different values",
            "max_completion_tokens",
        )
    if tokenizer.chat_template is None:
        raise bad(f"the model {model!r} has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(
            _message_dicts(body),
            add_generation_prompt=True,
            tools=tools.template_tools() if tools is not None else None,
        )
    except ValueError as err:  # ChatTemplateError: the template refused the conversation
        raise bad(f"the chat template cannot render these messages: {err}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False), text


async def response_format_constraints(
    response_format: ResponseFormat, tokenizer, eos_token_ids: Sequence[int], count: int
) -> list | None:
    """``count`` JSON-schema constraints, one per sequence (each keeps its own grammar state);
    None for plain text."""
    if response_format.type == "text":
        return None
    if response_format.type == "json_object":
        schema: Any = {"type": "object"}
    else:
        if response_format.json_schema is None:
            raise bad("response_format of type json_schema needs a json_schema object", "response_format")
        schema = response_format.json_schema.schema_

    def build():
        return [JsonSchemaConstraint(schema, tokenizer, eos_token_ids=eos_token_ids) for _ in range(count)]

    try:  # compiling the grammar (and, the first time, the token trie) takes a while: not on the loop
        return await asyncio.to_thread(build)
    except ValueError as err:
        raise bad(f"response_format cannot be used: {err}", "response_format") from None


def _check_prompts(prompts: list[list[int]], max_tokens: int | None, limits: ModelLimits, prompt_param: str) -> None:
    """Every prompt in the vocabulary, not empty, and leaving room in the context to generate."""
    vocabulary, limit = limits.vocabulary, limits.context
    for i, ids in enumerate(prompts):
        bad_ids = [t for t in ids if t >= vocabulary]
        if bad_ids:
            raise bad(
                f"prompt {i} has token id {bad_ids[0]} outside the vocabulary (0..{vocabulary - 1})", prompt_param
            )
        if not ids:
            raise bad(f"prompt {i} is empty after tokenization; give at least one token", prompt_param)
    for i, ids in enumerate(prompts):
        where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if len(ids) >= limit:
            raise bad(
                f"{where} has {len(ids)} tokens but the model's context length is {limit} tokens, which "
                "leaves no room to generate; shorten it",
                prompt_param,
                "context_length_exceeded",
            )
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise bad(
                f"{where} has {len(ids)} tokens and max_tokens is {max_tokens}: {len(ids) + max_tokens} "
                f"tokens exceed the model's context length of {limit} tokens; shorten the prompt or lower "
                "max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )


def _logit_bias(body, vocabulary: int) -> dict[int, float] | None:
    if not body.logit_bias:
        return None
    bias = {}
    for token, value in body.logit_bias.items():
        try:
            token_id = int(token)
        except ValueError:
            raise bad(f"logit_bias keys must be token ids, got {token!r}", "logit_bias") from None
        if not 0 <= token_id < vocabulary:
            raise bad(f"logit_bias token id {token_id} is outside the vocabulary (0..{vocabulary - 1})", "logit_bias")
        bias[token_id] = value
    return bias


def _sampling_params(
    body, max_new_tokens: int, seed: int | None, bias: dict[int, float] | None, stops: list[str], stop_ids: list[int]
) -> SamplingParams:
    """One sequence's sampling parameters; OpenAI's defaults where the body leaves a knob out."""
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias,
            min_new_tokens=body.min_tokens,
            max_new_tokens=max_new_tokens,
            stop=stops,
            stop_token_ids=stop_ids,
            seed=seed,
        )
    except ValueError as err:
        raise bad(str(err)) from None


def prepare(
    model: str,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[list[int]],
    texts: list[str],
    logprobs: int | None,
    constraints: list | None,
    prompt_param: str,
    limits: ModelLimits,
) -> Prepared:
    """Validate and turn a request into per-sequence engine parameters; ``constraints``:
    one logits processor per sequence (``response_format``), or None."""
    if body.stream_options is not None and not body.stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens == 0:  # echo only: generate one token to run the prompt, then drop it
        max_tokens = 1
    _check_prompts(prompts, max_tokens, limits, prompt_param)
    bias = _logit_bias(body, limits.vocabulary)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop_ids = list(body.stop_token_ids or [])
    if any(t >= limits.vocabulary for t in stop_ids):
        raise bad(f"stop_token_ids must be in the vocabulary (0..{limits.vocabulary - 1})", "stop_token_ids")
    params, processors = [], []
    for ids in prompts:
        for j in range(body.n):
            # n choices from one seed must differ from each other, and still be reproducible.
            seed = None if body.seed is None else (body.seed + j) % (2**63)
            limit = max_tokens if max_tokens is not None else limits.context - len(ids)
            params.append(_sampling_params(body, limit, seed, bias, stops, stop_ids))
            processors.append([constraints[len(processors)]] if constraints is not None else [])
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Prepared(
        model, prompts, texts, params, body.n, logprobs, processors, body.ignore_eos, body.stream, include_usage
    )
