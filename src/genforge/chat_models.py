"""Language models behind one small interface: chat messages in, assistant replies out.

Agents, prompting recipes, constitutional critique and generative RAG answers need the same
few things from a model: a reply to a conversation (optionally offered tools), several
sampled replies, and plain text completion. Two backends give them:

- `LocalChatModel`: a genforge model in this process, decoded by `genforge.generate`; the
  conversation is rendered with the tokenizer's chat template.
- `EndpointChatModel`: any OpenAI-compatible chat endpoint (genforge serve, vLLM, the OpenAI
  API) through the official `openai` client.

Anything else with the same `chat`, `sample_replies` and `complete` methods (a scripted fake
in a test, a wrapper with a cache) works wherever a `ChatModel` is taken.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class ChatModelError(ValueError):
    """A request a chat model cannot serve, said before any work is done."""


@dataclass
class Reply:
    """One assistant turn: its text, the tool calls it made (OpenAI's form: `id`, `type`,
    `function.name`, `function.arguments` as a JSON string) and why generation ended."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    completion_tokens: int = 0

    def message(self) -> dict[str, Any]:
        """The reply as a message to append to the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


@runtime_checkable
class ChatModel(Protocol):
    """What agents, prompting and critique take as a model."""

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
    ) -> Reply: ...

    def sample_replies(
        self,
        messages: Sequence[Mapping[str, Any]],
        n: int,
        *,
        max_tokens: int = 256,
        temperature: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[Reply]: ...

    def complete(self, prompt: str, max_tokens: int = 256, **options: Any) -> str: ...


def _check_request(messages: Sequence[Mapping[str, Any]], max_tokens: int, temperature: float, n: int = 1) -> None:
    if not messages:
        raise ChatModelError("a chat request needs at least one message")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ChatModelError(f"message {number} is not a mapping with a 'role' (got {message!r:.80})")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ChatModelError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not temperature >= 0:
        raise ChatModelError(f"temperature must be >= 0, got {temperature!r}")
    if not isinstance(n, int) or n < 1:
        raise ChatModelError(f"n must be a positive integer, got {n!r}")


class _CompleteFromChat:
    """`complete` as one user message to `chat`."""

    def complete(self, prompt: str, max_tokens: int = 256, **options: Any) -> str:
        return self.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, **options).content


class LocalChatModel(_CompleteFromChat):
    """A genforge causal language model, in this process, as a `ChatModel`.

    Give a model directory (genforge or Hugging Face layout), or a loaded `model` with its
    `tokenizer`. Conversations are rendered with the tokenizer's chat template; a tokenizer
    without one takes a single user message as the raw prompt (a base model continuing text).
    A prompt that leaves no room for `max_tokens` in the context is refused, never cut. The
    context is `Config.max_context`; `context_limit` sets it (past the trained context only for
    a model with dynamic RoPE scaling; a given `model`'s config is changed in place).
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        model=None,
        tokenizer=None,
        eos_token_ids: Sequence[int] | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        context_limit: int | None = None,
    ) -> None:
        if directory is not None:
            from .loading import load_for_inference

            directory = Path(directory)
            if not (directory / "config.json").is_file():
                raise ChatModelError(
                    f"{directory} is not a model directory (no config.json); pass a genforge or Hugging Face checkpoint"
                )
            loaded = load_for_inference(directory, dtype=dtype, device=device, context_limit=context_limit)
            model, tokenizer, eos_token_ids = loaded.model, loaded.tokenizer, loaded.eos_token_ids
        if model is None or tokenizer is None:
            raise ChatModelError("LocalChatModel needs a model directory, or a loaded model and its tokenizer")
        if not model.config.causal:
            raise ChatModelError(
                f"the model is an encoder ({model.config.family}); replies need a causal language model"
            )
        if context_limit is not None and model.config.context_limit != context_limit:
            model.config = model.config.with_context_limit(context_limit)
        self.model, self.tokenizer, self.eos_token_ids = model, tokenizer, eos_token_ids

    def prompt_ids(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """The conversation as the token ids the model continues."""
        if getattr(self.tokenizer, "chat_template", None):
            if any(message.get("tool_calls") for message in messages):
                from .generate.tool_calls import messages_for_template  # arguments as the template reads them

                messages = messages_for_template(messages)
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tools=tools)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if tools:
            raise ChatModelError("tools need a chat template that renders them; this tokenizer has no chat template")
        if len(messages) != 1 or messages[0].get("role") != "user":
            raise ChatModelError(
                "this tokenizer has no chat template, so only a single user message (the raw prompt) can be sent"
            )
        return self.tokenizer.encode(str(messages[0].get("content") or ""))

    def _params(self, ids: list[int], max_tokens: int, temperature: float, stop: Sequence[str], seed: int | None):
        from .generate.sampling import SamplingParams

        context = self.model.config.max_context  # past the trained context only under dynamic RoPE
        if len(ids) + max_tokens > context:
            raise ChatModelError(
                f"the prompt is {len(ids)} tokens and max_tokens is {max_tokens}: together over the model's "
                f"{context}-token context; shorten the conversation or lower max_tokens"
            )
        return SamplingParams(temperature=temperature, max_new_tokens=max_tokens, stop=list(stop), seed=seed)

    def _decode(self, ids: list[int], n: int, params) -> list[Reply]:
        from .generate.decode import decode

        outputs = decode("sample", self.model, self.tokenizer, [ids] * n, params, eos_token_ids=self.eos_token_ids)
        return [
            Reply(
                content=out.text or "", finish_reason=out.finish_reason or "stop", completion_tokens=len(out.token_ids)
            )
            for out in outputs
        ]

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
    ) -> Reply:
        _check_request(messages, max_tokens, temperature)
        if tools and tool_choice != "none":
            from .generate.tool_calls import local_tool_reply

            ids = self.prompt_ids(messages, tools)
            out = local_tool_reply(
                self, ids, tools, tool_choice, self._params(ids, max_tokens, temperature, stop, seed)
            )
            return Reply(out.content, out.tool_calls, out.finish_reason, out.completion_tokens)
        ids = self.prompt_ids(messages, tools)
        return self._decode(ids, 1, self._params(ids, max_tokens, temperature, stop, seed))[0]

    def sample_replies(
        self,
        messages: Sequence[Mapping[str, Any]],
        n: int,
        *,
        max_tokens: int = 256,
        temperature: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[Reply]:
        """`n` replies sampled in one batch (the prompt is shared by every row)."""
        _check_request(messages, max_tokens, temperature, n)
        ids = self.prompt_ids(messages)
        return self._decode(ids, n, self._params(ids, max_tokens, temperature, stop, seed))


def _tool_call_dict(call: Any) -> dict[str, Any]:
    if isinstance(call, Mapping):
        return dict(call)
    if hasattr(call, "model_dump"):
        return call.model_dump(exclude_none=True)
    function = call.function
    return {"id": call.id, "type": "function", "function": {"name": function.name, "arguments": function.arguments}}


class EndpointChatModel(_CompleteFromChat):
    """Any OpenAI-compatible chat endpoint as a `ChatModel`, through the official `openai` client.

    `client` may be given directly (an `openai.OpenAI`, or anything with the same
    `chat.completions.create`); otherwise one is made from `base_url` and `api_key`.
    `temperature` is the default for `chat` and `complete`.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        client=None,
        temperature: float = 0.0,
        timeout: float = 600.0,
    ) -> None:
        if not model:
            raise ChatModelError("an endpoint chat model needs the endpoint's model name")
        if client is None:
            try:
                import openai
            except ImportError:  # pragma: no cover - openai is a dependency
                raise ImportError(
                    "an OpenAI-compatible endpoint is called through the official client: pip install openai"
                ) from None
            client = openai.OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout)
        self.client, self.model, self.temperature = client, model, temperature

    def _create(self, messages, n: int, max_tokens: int, temperature: float | None, stop, seed, **extra) -> list[Reply]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens,
            "temperature": self.temperature if temperature is None else temperature,
        }
        if n != 1:
            request["n"] = n
        if stop:
            request["stop"] = list(stop)
        if seed is not None:
            request["seed"] = seed
        request.update({k: v for k, v in extra.items() if v is not None})
        response = self.client.chat.completions.create(**request)
        replies = []
        for choice in response.choices:
            message = choice.message
            usage = getattr(response, "usage", None)
            replies.append(
                Reply(
                    content=message.content or "",
                    tool_calls=[_tool_call_dict(c) for c in (getattr(message, "tool_calls", None) or [])],
                    finish_reason=getattr(choice, "finish_reason", None) or "stop",
                    completion_tokens=getattr(usage, "completion_tokens", 0) if n == 1 and usage else 0,
                )
            )
        return replies

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
    ) -> Reply:
        _check_request(messages, max_tokens, self.temperature if temperature is None else temperature)
        extra = {"tools": [dict(t) for t in tools] if tools else None, "tool_choice": tool_choice if tools else None}
        return self._create(messages, 1, max_tokens, temperature, stop, seed, **extra)[0]

    def sample_replies(
        self,
        messages: Sequence[Mapping[str, Any]],
        n: int,
        *,
        max_tokens: int = 256,
        temperature: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[Reply]:
        _check_request(messages, max_tokens, temperature, n)
        return self._create(messages, n, max_tokens, temperature, stop, seed)


def tool_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    """A tool call's arguments, parsed from their JSON string; a clear error when they are not
    a JSON object."""
    function = call.get("function") or {}
    raw = function.get("arguments") or "{}"
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as err:
        raise ChatModelError(f"tool call {function.get('name')!r} has arguments that are not JSON ({err})") from None
    if not isinstance(arguments, dict):
        raise ChatModelError(f"tool call {function.get('name')!r} has arguments that are not a JSON object: {raw!r}")
    return arguments


def add_chat_model_arguments(parser) -> None:
    """--model DIR (in process) or --endpoint URL [--endpoint-model NAME] [--api-key-env VAR]."""
    parser.add_argument("--model", default=None, help="a genforge / Hugging Face chat model directory, run in process")
    parser.add_argument("--endpoint", default=None, help="an OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    parser.add_argument("--endpoint-model", default=None, help="the endpoint's model name (default: its only model)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--device", default="cpu", help="device for --model (default cpu)")


def chat_model_from_args(args) -> ChatModel:
    """The `ChatModel` the flags of `add_chat_model_arguments` name."""
    import os

    from .console import console

    if bool(args.model) == bool(args.endpoint):
        raise ValueError("give the model as either --model DIR (in process) or --endpoint URL (OpenAI-compatible)")
    if args.model:
        with console.status(f"loading {args.model}"):
            return LocalChatModel(args.model, device=args.device)
    import openai

    client = openai.OpenAI(base_url=args.endpoint, api_key=os.environ.get(args.api_key_env) or "not-needed")
    name = args.endpoint_model
    if name is None:
        try:
            served = [m.id for m in client.models.list()]
        except openai.APIError as err:
            raise ConnectionError(f"cannot list the models of {args.endpoint}: {err}") from None
        if len(served) != 1:
            raise ValueError(
                f"{args.endpoint} serves {len(served)} models ({', '.join(served[:10]) or 'none'}); "
                "name one with --endpoint-model"
            )
        name = served[0]
    return EndpointChatModel(name, client=client)
