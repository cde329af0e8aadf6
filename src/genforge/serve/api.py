"""The OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine.

Routes follow the OpenAI REST reference, so any OpenAI client works against the server:

- ``GET /v1/models`` (and ``/v1/models/{id}``): the generation and embedding models served;
- ``POST /v1/completions``: text (or token-id) prompts, ``n`` choices each;
- ``POST /v1/chat/completions``: messages rendered with the model's chat template;
- ``POST /v1/embeddings``: sentence embeddings from encoder models;
- ``GET /health`` and ``GET /metrics`` (Prometheus).

Streaming is server-sent events (one ``data: {json}`` chunk per engine step with new text,
ending with ``data: [DONE]``); with ``stream_options.include_usage`` a last chunk carries
``usage`` and every other chunk ``"usage": null``, as OpenAI does.

Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 for invalid parameters (FastAPI's 422 is turned into 400, naming the field), 400 for a
prompt that does not fit the context (both numbers are given), 401 for a missing or
unknown API key, 404 for an unknown model, 408 when a request runs past the timeout, 429
when a key's rate limit is spent (``Retry-After`` says when to retry) or the queue is full,
503 while shutting down, and 500 only for faults of the server itself.

Beyond OpenAI's parameters the sampling extensions vLLM accepts are understood too:
``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate.sampling import SamplingParams
from .limits import AdmissionQueue, KeyChecker, RateLimit, TokenBucketLimiter
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics

__all__ = ["create_app", "OpenAIError"]

log = logging.getLogger(__name__)

MAX_N = 16  # choices per prompt; each is a sequence in the engine
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_STOP = 4  # OpenAI's limit on stop strings
_INT64 = 2**63 - 1


# --------------------------------------------------------------------------------------------- errors


class OpenAIError(Exception):
    """An error answered in OpenAI's shape; ``status`` is the HTTP status code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


# ----------------------------------------------------------------------------------- request schemas


class _Schema(BaseModel):
    # Unknown fields are refused (400 naming them) rather than silently ignored: a misspelt
    # `max_token` would otherwise generate to the end of the context.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Schema):
    include_usage: StrictBool = False


NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[StrictInt, Field(ge=-_INT64 - 1, le=_INT64)]
TokenId = Annotated[StrictInt, Field(ge=0)]


class _SamplingFields(_Schema):
    model: NonEmptyStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: Seed | None = None
    user: StrictStr | None = None
    # vLLM's extensions
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # -1 or 0: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[TokenId] | None = None


class CompletionRequest(_SamplingFields):
    prompt: (NonEmptyStr | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[NonEmptyStr], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    # 0 is allowed with echo: the prompt is scored, nothing is generated (how lm-evaluation-harness
    # asks for a continuation's log-likelihood).
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None


class ContentPart(BaseModel):
    # Any part parses, so that an image or audio part gets a clear "not supported" rather than
    # a schema mismatch; only text parts are served.
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class JsonSchemaFormat(_Schema):
    name: StrictStr = "response"
    description: StrictStr | None = None
    # `schema` clashes with a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | StrictBool = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None


class EmbeddingRequest(_Schema):
    model: NonEmptyStr
    # OpenAI's limit: 2048 inputs per request.
    input: (StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=2048)]
            | Annotated[list[TokenId], Field(min_length=1)]
            | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=2048)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None


# ------------------------------------------------------------------------------------ the fan-out


_DONE = object()


class _Fanout:
    """Runs the engine streams of one HTTP request side by side (``n`` choices, several
    prompts) and yields ``(choice index, RequestOutput)`` in arrival order.

    Each stream is pumped by its own task; closing the fan-out cancels the tasks, and a
    cancelled consumer of ``AsyncEngine.generate`` aborts its request, which frees its KV
    blocks at once.
    """

    def __init__(self, engine, model: str, requests: Sequence[Any]) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open = len(requests)
        self.tasks = [asyncio.create_task(self._pump(i, engine.generate(model, r))) for i, r in enumerate(requests)]

    async def _pump(self, index: int, stream: AsyncIterator) -> None:
        try:
            async for output in stream:
                self.queue.put_nowait((index, output))
        except Exception as err:  # handed to the consumer, which answers with an error
            self.queue.put_nowait((index, err))
        finally:
            await stream.aclose()
            self.queue.put_nowait((index, _DONE))

    def __aiter__(self):
        return self

    async def __anext__(self):
        while self.open:
            index, item = await self.queue.get()
            if item is _DONE:
                self.open -= 1
                continue
            if isinstance(item, Exception):
                raise item
            return index, item
        raise StopAsyncIteration

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass
class _Choice:
    """What one sequence has produced so far."""

    prompt_index: int
    prompt_logprobs: list[Any] | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Prepared:
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


# ----------------------------------------------------------------------------------------- the app


def create_app(
    engine,
    *,
    tokenizers: Mapping[str, Any],
    api_keys: Sequence[str] | None = None,
    rate_limit: RateLimit | None = None,
    max_queue: int | None = 256,
    request_timeout: float | None = 600.0,
    embedding_models: Mapping[str, Any] | None = None,
    max_model_len: Mapping[str, int] | None = None,
    eos_token_ids: Mapping[str, Sequence[int]] | None = None,
    drain_timeout: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """Build the FastAPI app serving ``engine`` (an ``AsyncEngine``).

    ``tokenizers`` maps each engine model name to its ``genforge.tokenizer.Tokenizer``;
    ``embedding_models`` maps names to encoders with ``encode(texts) -> (n, dim) tensor``
    and a ``tokenizer`` (``genforge.encoder.SentenceEncoder``). ``api_keys``: Bearer keys
    accepted (None or empty: no authentication). ``rate_limit``: per key (per client
    address without keys). ``max_queue``: sequences in flight at once, running or waiting
    (None: unbounded). ``request_timeout``: seconds a request may take (None: no limit).
    ``max_model_len`` and ``eos_token_ids`` default to what each engine reports.
    """
    embedding_models = {name: _Embedder.of(name, encoder) for name, encoder in (embedding_models or {}).items()}
    generation_models = list(engine.models)
    missing = [m for m in generation_models if m not in tokenizers]
    if missing:
        raise ValueError(f"no tokenizer given for model(s) {missing}; pass tokenizers={{name: Tokenizer}} for each")
    clash = sorted(set(generation_models) & set(embedding_models))
    if clash:
        raise ValueError(f"model name(s) {clash} are used for both a generation and an embedding model")
    if request_timeout is not None and not (request_timeout > 0):
        raise ValueError(f"request_timeout must be > 0 seconds or None, got {request_timeout!r}")
    context = {m: _context_length(engine, m, max_model_len) for m in generation_models}
    eos = {m: _eos_ids(engine, m, tokenizers[m], eos_token_ids) for m in generation_models}
    keys = KeyChecker(api_keys)
    limiter = TokenBucketLimiter(rate_limit, clock=clock) if rate_limit is not None else None
    queue = AdmissionQueue(max_queue)
    metrics = ServerMetrics(engine, generation_models)
    created = int(time.time())
    state = {"draining": False}
    embed_lock = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn stops accepting connections and waits for open ones before it runs this,
        # so by now in-flight requests have finished (or their clients have gone).
        state["draining"] = True
        await engine.shutdown(drain_timeout=drain_timeout)

    app = FastAPI(title="genforge", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions, chat completions and embeddings.")
    app.state.metrics = metrics
    app.state.queue = queue
    app.state.engine = engine
    app.openapi = _openapi_with_openai_errors(app, {"CompletionRequest": generation_models,
                                                     "ChatCompletionRequest": generation_models,
                                                     "EmbeddingRequest": list(embedding_models)})

    # ------------------------------------------------------------------ error handlers

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError):
        metrics.http_requests.labels(_route(request), str(err.status)).inc()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return await _openai_error(request, _validation_to_openai(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        if err.status_code == 404:
            message = f"{request.method} {request.url.path} is not a route of this server"
        elif err.status_code == 405:
            headers = {k.lower(): v for k, v in (getattr(err, "headers", None) or {}).items()}
            allowed = headers.get("allow", "another method")
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
        else:
            message = str(err.detail)
        error = OpenAIError(err.status_code, message, kinds.get(err.status_code, "invalid_request_error"),
                            headers=getattr(err, "headers", None))
        return await _openai_error(request, error)

    @app.exception_handler(Exception)
    async def _fault(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)
        error = OpenAIError(500, f"internal server error ({type(err).__name__})", "server_error")
        metrics.http_requests.labels(_route(request), "500").inc()
        return error.response()

    # ------------------------------------------------------------------ admission

    async def admit(request: Request) -> str:
        """Authentication, then the key's rate limit; returns the caller's identity."""
        if state["draining"]:
            raise OpenAIError(503, "the server is shutting down", "server_error")
        who = request.client.host if request.client else "unknown"
        if keys.enabled:
            key = keys.check(request.headers.get("authorization"))
            if key is None:
                raise OpenAIError(401, "missing or invalid API key; send it as 'Authorization: Bearer KEY'",
                                  "authentication_error", code="invalid_api_key")
            who = "key:" + key
        if limiter is not None:
            wait = limiter.acquire(who)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                raise OpenAIError(429, f"rate limit reached ({limiter.limit.requests:g} requests per "
                                       f"{limiter.limit.per_seconds:g} s); retry in {retry} s",
                                  "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
        return who

    def generation_model(name: str) -> str:
        if name in generation_models:
            return name
        hint = " (it is an embedding model: use /v1/embeddings)" if name in embedding_models else ""
        raise OpenAIError(404, f"the model {name!r} does not exist{hint}; served: {', '.join(generation_models)}",
                          "not_found_error", "model", "model_not_found")

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        if state["draining"]:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "models": generation_models + list(embedding_models)}

    @app.get("/metrics")
    async def prometheus_metrics():
        metrics.queue.set(queue.in_flight)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "genforge"}
        if name in context:
            card["max_model_len"] = context[name]
        return card

    @app.get("/v1/models")
    async def list_models(_: str = Depends(admit)):
        return {"object": "list", "data": [model_card(m) for m in generation_models + list(embedding_models)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, _: str = Depends(admit)):
        if model_id not in generation_models and model_id not in embedding_models:
            raise OpenAIError(404, f"the model {model_id!r} does not exist", "not_found_error", "model",
                              "model_not_found")
        return model_card(model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, _: str = Depends(admit)):
        model = generation_model(body.model)
        tokenizer = tokenizers[model]
        if body.max_tokens == 0 and not body.echo:
            raise _bad("max_tokens must be >= 1 (0 is only for echo, to score the prompt)", "max_tokens")
        if body.suffix:
            raise _bad("suffix (fill-in-the-middle) is not supported by /v1/completions", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise _bad(f"best_of must equal n ({body.n}) when given: choices are not re-ranked", "best_of")
        prompt = body.prompt
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt[0], str):
            texts = list(prompt)
        else:
            texts = None
        if texts is not None:
            prompts = [tokenizer.encode(t, add_special_tokens=True) for t in texts]
        else:
            prompts = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
            texts = [_decode_prompt(tokenizer, p, i) for i, p in enumerate(prompts)]
        prepared = await _prepare(model, body, prompts, texts, body.logprobs, None, "prompt")
        prepared.echo, prepared.score_only = body.echo, body.max_tokens == 0
        return await run("text_completion", prepared, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, _: str = Depends(admit)):
        model = generation_model(body.model)
        tokenizer = tokenizers[model]
        if body.top_logprobs is not None and not body.logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise _bad("give max_completion_tokens or max_tokens (its older name), not two different values",
                       "max_completion_tokens")
        if tokenizer.chat_template is None:
            raise _bad(f"the model {model!r} has no chat template; use /v1/completions", "messages")
        messages = []
        for i, message in enumerate(body.messages):
            content = message.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise _bad(f"content part of type {part.type!r} is not supported: this server serves text "
                                   "models; send {\"type\": \"text\", \"text\": ...} parts",
                                   f"messages[{i}].content[{j}]")
                content = "".join(part.text for part in content)
            entry = {"role": message.role, "content": content or ""}
            if message.name is not None:
                entry["name"] = message.name
            messages.append(entry)
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as err:  # ChatTemplateError: the template refused the conversation
            raise _bad(f"the chat template cannot render these messages: {err}", "messages") from None
        prompt = tokenizer.encode(text, add_special_tokens=False)
        constraints = None
        if body.response_format is not None and body.response_format.type != "text":
            constraints = await _response_format(model, body.response_format, body.n)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prepared = await _prepare(model, body, [prompt], [text], logprobs, constraints, "messages")
        return await run("chat.completion", prepared, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, _: str = Depends(admit)):
        if body.model not in embedding_models:
            hint = " (it is a generation model)" if body.model in generation_models else ""
            served = ", ".join(embedding_models) or "none"
            raise OpenAIError(404, f"the embedding model {body.model!r} does not exist{hint}; served: {served}",
                              "not_found_error", "model", "model_not_found")
        encoder: _Embedder = embedding_models[body.model]
        inputs = body.input
        if isinstance(inputs, str):
            texts = [inputs]
        elif isinstance(inputs[0], str):
            texts = list(inputs)
        else:
            rows = [list(inputs)] if isinstance(inputs[0], int) else [list(r) for r in inputs]
            texts = [_decode_prompt(encoder.tokenizer, r, i, param="input") for i, r in enumerate(rows)]
        dimension = int(encoder.dimension)
        if body.dimensions is not None and body.dimensions != dimension:
            raise _bad(f"the model {body.model!r} embeds into {dimension} dimensions; dimensions={body.dimensions} "
                       "cannot be served (omit it)", "dimensions")
        usage = sum(len(ids) for ids in encoder.tokenizer.encode_batch(texts))
        async with embed_lock:  # one forward pass at a time: the encoder is not thread-safe
            vectors = await asyncio.to_thread(encoder.embed, texts)
        data = []
        for i, row in enumerate(vectors):
            value = base64.b64encode(row.tobytes()).decode() if body.encoding_format == "base64" else row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        metrics.http_requests.labels("/v1/embeddings", "200").inc()
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": usage, "total_tokens": usage}}

    # ------------------------------------------------------------------ preparation

    async def _response_format(model: str, response_format: ResponseFormat, count: int) -> list:
        """``count`` JSON-schema constraints, one per sequence: each keeps its own grammar state."""
        from ..generate.constrained import JsonSchemaConstraint

        if response_format.type == "json_object":
            schema: Any = {"type": "object"}
        else:
            if response_format.json_schema is None:
                raise _bad("response_format of type json_schema needs a json_schema object", "response_format")
            schema = response_format.json_schema.schema_
        tokenizer = tokenizers[model]

        def build():
            return [JsonSchemaConstraint(schema, tokenizer, eos_token_ids=eos[model]) for _ in range(count)]

        try:  # compiling the grammar (and, the first time, the token trie) takes a while: not on the loop
            return await asyncio.to_thread(build)
        except ValueError as err:
            raise _bad(f"response_format cannot be used: {err}", "response_format") from None

    async def _prepare(model, body, prompts, texts, logprobs, constraints, prompt_param) -> _Prepared:
        """Validate and turn a request into per-sequence engine parameters; ``constraints``:
        one logits processor per sequence (``response_format``), or None."""
        if body.stream_options is not None and not body.stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        limit = context[model]
        vocabulary = len(tokenizers[model])
        for i, ids in enumerate(prompts):
            bad = [t for t in ids if t >= vocabulary]
            if bad:
                raise _bad(f"prompt {i} has token id {bad[0]} outside the vocabulary (0..{vocabulary - 1})",
                           prompt_param)
            if not ids:
                raise _bad(f"prompt {i} is empty after tokenization; give at least one token", prompt_param)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens == 0:  # echo only: generate one token to run the prompt, then drop it
            max_tokens = 1
        for i, ids in enumerate(prompts):
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            if len(ids) >= limit:
                raise _bad(f"{where} has {len(ids)} tokens but the model's context length is {limit} tokens, which "
                           "leaves no room to generate; shorten it", prompt_param, "context_length_exceeded")
            if max_tokens is not None and len(ids) + max_tokens > limit:
                raise _bad(f"{where} has {len(ids)} tokens and max_tokens is {max_tokens}: {len(ids) + max_tokens} "
                           f"tokens exceed the model's context length of {limit} tokens; shorten the prompt or lower "
                           "max_tokens", "max_tokens", "context_length_exceeded")
        bias = None
        if body.logit_bias:
            bias = {}
            for token, value in body.logit_bias.items():
                try:
                    token_id = int(token)
                except ValueError:
                    raise _bad(f"logit_bias keys must be token ids, got {token!r}", "logit_bias") from None
                if not 0 <= token_id < vocabulary:
                    raise _bad(f"logit_bias token id {token_id} is outside the vocabulary (0..{vocabulary - 1})",
                               "logit_bias")
                bias[token_id] = value
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop_ids = list(body.stop_token_ids or [])
        if any(t >= vocabulary for t in stop_ids):
            raise _bad(f"stop_token_ids must be in the vocabulary (0..{vocabulary - 1})", "stop_token_ids")
        params, processors = [], []
        for ids in prompts:
            for j in range(body.n):
                # n choices from one seed must differ from each other, and still be reproducible.
                seed = None if body.seed is None else (body.seed + j) % (2**63)
                try:
                    params.append(SamplingParams(
                        temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p,
                        top_k=max(0, body.top_k or 0), min_p=body.min_p or 0.0,
                        repetition_penalty=body.repetition_penalty or 1.0,
                        presence_penalty=body.presence_penalty or 0.0,
                        frequency_penalty=body.frequency_penalty or 0.0,
                        logit_bias=bias, min_new_tokens=body.min_tokens,
                        max_new_tokens=max_tokens if max_tokens is not None else limit - len(ids),
                        stop=stops, stop_token_ids=stop_ids, seed=seed,
                    ))
                except ValueError as err:
                    raise _bad(str(err)) from None
                processors.append([constraints[len(processors)]] if constraints is not None else [])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _Prepared(model, prompts, texts, params, body.n, logprobs, processors, body.ignore_eos,
                         body.stream, include_usage)

    # ------------------------------------------------------------------ running

    async def run(kind: str, prepared: _Prepared, request: Request):
        from .engine import Request as EngineRequest

        sequences = len(prepared.params)
        if not queue.try_enter(sequences):
            raise OpenAIError(429, f"the server is at capacity ({queue.capacity} sequences in flight); retry shortly",
                              "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        engine_requests = [
            EngineRequest(request_id=f"{request_id}-{k}", prompt_token_ids=prepared.prompts[k // prepared.n],
                          params=prepared.params[k], logprobs=prepared.logprobs,
                          processors=prepared.processors[k], ignore_eos=prepared.ignore_eos,
                          prompt_logprobs=prepared.logprobs if prepared.echo else None)
            for k in range(sequences)
        ]
        choices = [_Choice(prompt_index=k // prepared.n) for k in range(sequences)]
        fanout = _Fanout(engine, prepared.model, engine_requests)
        deadline = None if request_timeout is None else asyncio.get_running_loop().time() + request_timeout
        finished_queue = False

        def release():
            nonlocal finished_queue
            if not finished_queue:
                finished_queue = True
                queue.leave(sequences)

        def record(index: int, output):
            """Add an engine output to its choice; returns it as the client should see it."""
            choice = choices[index]
            if getattr(output, "prompt_logprobs", None) is not None:
                choice.prompt_logprobs = output.prompt_logprobs
            if output.finished:
                choice.finish_reason = output.finish_reason
                metrics.observe_finished(prepared.model, output)
            if prepared.score_only:  # the token generated only to run the prompt is not shown
                reason = output.finish_reason if output.finish_reason == "abort" else "length"
                output = dataclasses.replace(output, token_ids=[], text="", logprobs=None, completion_tokens=0,
                                             finish_reason=reason if output.finished else None)
                choice.finish_reason = output.finish_reason
            choice.text += output.text
            choice.token_ids.extend(output.token_ids)
            if output.logprobs:
                choice.logprobs.extend(output.logprobs)
            choice.prompt_tokens, choice.completion_tokens = output.prompt_tokens, output.completion_tokens
            choice.cached_tokens = output.cached_prompt_tokens
            return output

        async def collect() -> None:
            async for index, output in fanout:
                record(index, output)

        # Until the response starts, a client disconnect is noticed by watching the connection
        # (once streaming, Starlette cancels the response itself when the client goes away).
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            # A stream waits for the first output before answering, so that a request the engine
            # refuses still gets its 400 rather than a 200 stream that carries an error.
            first = await _race(collect() if not prepared.stream else fanout.__anext__(), watcher, deadline)
        except BaseException as err:
            release()
            await fanout.aclose()
            if isinstance(err, _ClientGone):
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            if isinstance(err, StopAsyncIteration):
                raise OpenAIError(500, "the engine returned no output", "server_error") from None
            raise _engine_error(err, request_timeout) from None
        finally:
            watcher.cancel()

        if not prepared.stream:
            release()
            await fanout.aclose()
            _check_aborted(choices)
            metrics.http_requests.labels(_route(request), "200").inc()
            return _full_response(kind, request_id, prepared, choices, tokenizers[prepared.model])

        async def events():
            created_at = int(time.time())
            chunk_type = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
            usage_field = {"usage": None} if prepared.include_usage else {}
            tokenizer = tokenizers[prepared.model]
            offsets = [len(prepared.prompt_texts[c.prompt_index]) for c in choices]

            def chunk(choice_list):
                return _sse({"id": request_id, "object": chunk_type, "created": created_at, "model": prepared.model,
                             "system_fingerprint": None, "choices": choice_list, **usage_field})

            try:
                if kind == "chat.completion":  # OpenAI opens every choice with the role alone, one chunk each
                    for k in range(sequences):
                        yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}])
                echoed: set[int] = set()
                item = first
                while True:
                    index, output = item
                    output = record(index, output)
                    if prepared.echo and index not in echoed:
                        # The prompt first, with its logprobs, which come with a choice's first output.
                        echoed.add(index)
                        choice = choices[index]
                        lp = None
                        if prepared.logprobs is not None:
                            lp = _prompt_logprobs_payload(prepared.prompts[choice.prompt_index],
                                                          choice.prompt_logprobs, tokenizer)
                        yield chunk([{"index": index, "text": prepared.prompt_texts[choice.prompt_index],
                                      "logprobs": lp, "finish_reason": None}])
                    if output.text or output.finished or output.logprobs:
                        entry: dict[str, Any] = {"index": index, "finish_reason": output.finish_reason
                                                 if output.finished else None}
                        if output.finished and output.finish_reason == "abort":
                            raise OpenAIError(503, "the request was aborted by the server (shutting down)",
                                              "server_error")
                        lp = _logprobs_payload(kind, output.logprobs, tokenizer, offsets[index]) \
                            if output.logprobs else None
                        if output.logprobs and kind != "chat.completion":
                            offsets[index] += sum(len(t) for t in lp["tokens"])
                        if kind == "chat.completion":
                            entry["delta"] = {"content": output.text} if output.text else {}
                        else:
                            entry["text"] = output.text
                        entry["logprobs"] = lp
                        yield chunk([entry])
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await fanout.__anext__()
                    except StopAsyncIteration:
                        break
                if prepared.include_usage:
                    yield _sse({"id": request_id, "object": chunk_type, "created": created_at,
                                "model": prepared.model, "system_fingerprint": None, "choices": [],
                                "usage": _usage(prepared, choices)})
                metrics.http_requests.labels(_route(request), "200").inc()
            except OpenAIError as err:
                yield _sse(err.body())
            except (asyncio.CancelledError, GeneratorExit):
                raise  # the client went away: the finally below aborts the engine requests
            except Exception as err:  # the headers are sent: report in-band
                error = _engine_error(err, request_timeout)
                if not isinstance(error, OpenAIError):  # a real fault: logged, and a 500-shaped event
                    log.error("internal error while streaming %s", request_id, exc_info=err)
                    error = OpenAIError(500, f"internal server error ({type(err).__name__})", "server_error")
                    metrics.http_requests.labels(_route(request), "500").inc()
                yield _sse(error.body())
            finally:
                release()
                await fanout.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---------------------------------------------------------------------------------------- helpers


# Type tags pydantic adds to the location of an error inside a union ("prompt.constrained-str").
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def _param_path(loc: Sequence[Any]) -> tuple[str | None, bool]:
    """An error location as OpenAI names params (``messages[0].role``), and whether it went
    through a union member."""
    path, tagged = "", False
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.isidentifier() or part in _TYPE_TAGS:
            tagged = True
        else:
            path += ("." if path else "") + part
    return path or None, tagged


def _validation_to_openai(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """FastAPI's validation errors (its 422) as one OpenAI 400 that names the first bad param."""
    if not errors:
        return _bad("invalid request")
    first = errors[0]
    param, tagged = _param_path(first.get("loc", ()))
    kind = first.get("type")
    if kind == "extra_forbidden":
        return _bad(f"unrecognized request argument {param!r}", param)
    if kind == "missing":
        return _bad(f"missing required argument {param!r}", param)
    if param is None:
        return _bad("the request body must be a JSON object with the request's arguments")
    if tagged:  # a union: none of its forms matched; say what each wanted
        top = param.split(".")[0].split("[")[0]
        reasons = list(dict.fromkeys(e.get("msg", "") for e in errors if _param_path(e.get("loc", ()))[0]
                                     and _param_path(e.get("loc", ()))[0].startswith(top)))
        return _bad(f"invalid value for {top!r}: no accepted form matched ({'; '.join(reasons[:4])})", top)
    return _bad(f"invalid value for {param!r}: {first.get('msg', 'invalid')}", param)


def _openapi_with_openai_errors(app: FastAPI, served: Mapping[str, Sequence[str]]) -> Callable[[], dict]:
    """The generated OpenAPI schema, with FastAPI's 422 replaced by the 400 this server answers,
    the error responses documented in OpenAI's shape, and the ``model`` field of each request
    listing the models this server serves (``served``: request schema name -> model names)."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        error = {"description": "error", "content": {"application/json": {"schema": {
            "type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}}}
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status in ("400", "401", "404", "429") if operation.get("requestBody") or \
                        operation.get("parameters") else ("401", "429"):
                    responses[status] = error
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        for name, models in served.items():
            if models and name in components:
                components[name]["properties"]["model"]["enum"] = list(models)
        app.openapi_schema = schema
        return schema

    return openapi


@dataclass
class _Embedder:
    """One shape for the two kinds of embedding model: ``genforge.encoder.SentenceEncoder``
    (``encode`` -> tensor) and ``genforge.rag.index.EncoderEmbedder`` (``embed`` -> array)."""

    model: Any
    tokenizer: Any
    dimension: int

    @classmethod
    def of(cls, name: str, model: Any) -> _Embedder:
        tokenizer = getattr(model, "tokenizer", None) or getattr(getattr(model, "encoder", None), "tokenizer", None)
        if tokenizer is None or not (hasattr(model, "encode") or hasattr(model, "embed")):
            raise ValueError(f"embedding model {name!r} must be a genforge SentenceEncoder or EncoderEmbedder "
                             f"(encode/embed and a tokenizer), got {type(model).__name__}")
        return cls(model, tokenizer, int(model.dimension))

    def embed(self, texts: list[str]) -> np.ndarray:
        if hasattr(self.model, "encode"):
            return np.asarray(self.model.encode(texts), dtype=np.float32)
        return np.asarray(self.model.embed(texts), dtype=np.float32)


def _route(request: Request) -> str:
    """The route template a request matched (``/v1/models/{model_id}``), for metric labels: raw
    paths would give every probed URL its own time series."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _inner_engine(engine, model: str):
    """The synchronous ``Engine`` behind an ``AsyncEngine`` for ``model``, if it exposes one."""
    if callable(getattr(engine, "engine", None)):
        return engine.engine(model)
    return getattr(engine, "engines", {}).get(model)


def _context_length(engine, model: str, given: Mapping[str, int] | None) -> int:
    if given and model in given:
        return int(given[model])
    length = getattr(_inner_engine(engine, model), "max_model_len", None)
    if length is None:
        raise ValueError(f"cannot tell the context length of {model!r}; pass max_model_len={{name: tokens}}")
    return int(length)


def _eos_ids(engine, model: str, tokenizer, given: Mapping[str, Sequence[int]] | None) -> list[int]:
    if given and model in given:
        return list(given[model])
    ids = getattr(_inner_engine(engine, model), "eos_token_ids", None)
    if ids:
        return sorted(ids)
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _decode_prompt(tokenizer, ids: list[int], index: int, param: str = "prompt") -> str:
    limit = len(tokenizer)
    bad = [t for t in ids if t >= limit]
    if bad:
        raise _bad(f"{param} {index} has token id {bad[0]} outside the vocabulary (0..{limit - 1})", param)
    return tokenizer.decode(ids)


async def _race(awaitable, watcher: asyncio.Future, deadline: float | None):
    """Await ``awaitable``, giving up when ``watcher`` (the client's disconnect) completes
    first (``_ClientGone``) or the deadline passes (``TimeoutError``)."""
    task = asyncio.ensure_future(awaitable)
    timeout = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
    try:
        done, _ = await asyncio.wait([task, watcher], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if watcher in done:
        raise _ClientGone()
    raise TimeoutError()


class _ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def _disconnected(request: Request) -> None:
    # After the body is read, the next ASGI message on a connection is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _engine_error(err: BaseException, timeout: float | None) -> BaseException:
    """Map what the engine (or waiting on it) raised to the error the client sees."""
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, TimeoutError):
        return OpenAIError(408, f"the request took longer than the server's timeout of {timeout:g} s",
                           "timeout_error", code="timeout")
    if type(err).__name__ == "EngineShutdown":
        return OpenAIError(503, "the server is shutting down; retry on another replica", "server_error")
    if isinstance(err, ValueError):  # the engine's validation: a user-facing message
        code = "context_length_exceeded" if "context" in str(err) else None
        return _bad(str(err), code=code)
    if isinstance(err, (_ClientGone, asyncio.CancelledError)):
        return err  # nobody to answer
    return err  # a real fault: the generic handler answers 500 and logs it


def _check_aborted(choices: Sequence[_Choice]) -> None:
    if any(c.finish_reason == "abort" for c in choices):
        raise OpenAIError(503, "the request was aborted by the server (shutting down); retry", "server_error")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prepared: _Prepared, choices: Sequence[_Choice]) -> dict:
    # OpenAI counts each prompt once, however many choices it has.
    prompt = sum(len(p) for p in prepared.prompts)
    cached = sum(choices[i * prepared.n].cached_tokens for i in range(len(prepared.prompts)))
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _token_text(tokenizer, token_id: int) -> str:
    # Logprobs are of the raw model distribution, whose rows can outnumber the tokenizer's
    # vocabulary (padded embedding tables): such a row has no text, so it is named by its id.
    if token_id >= len(tokenizer):
        return f"<|token_id:{token_id}|>"
    return tokenizer.decode([token_id])


def _logprobs_payload(kind: str, entries, tokenizer, text_offset: int = 0) -> dict:
    """OpenAI's logprobs object for some tokens: the chat shape (``content``) or the legacy
    completions shape (parallel lists)."""
    if kind == "chat.completion":
        content = []
        for e in entries:
            token = _token_text(tokenizer, e.token_id)
            content.append({
                "token": token, "logprob": _finite(e.logprob), "bytes": list(token.encode("utf-8")),
                "top_logprobs": [{"token": (t := _token_text(tokenizer, tid)), "logprob": _finite(lp),
                                  "bytes": list(t.encode("utf-8"))} for tid, lp in e.top],
            })
        return {"content": content}
    tokens, offsets, position = [], [], text_offset
    for e in entries:
        token = _token_text(tokenizer, e.token_id)
        tokens.append(token)
        offsets.append(position)
        position += len(token)
    top = []
    for e in entries:
        # Two ids can decode to the same text; keep the likelier one (the first, as ranked).
        alternatives: dict[str, float] = {}
        for tid, lp in e.top:
            alternatives.setdefault(_token_text(tokenizer, tid), _finite(lp))
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [_finite(e.logprob) for e in entries], "top_logprobs": top,
            "text_offset": offsets}


def _prompt_logprobs_payload(prompt_ids: Sequence[int], entries, tokenizer) -> dict:
    """The completions logprobs lists for an echoed prompt: its first token has no logprob
    (nothing comes before it), as in OpenAI's responses. ``entries`` None: tokens only."""
    tokens = [_token_text(tokenizer, t) for t in prompt_ids]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    token_logprobs: list[float | None] = [None] * len(tokens)
    top: list[dict | None] = [None] * len(tokens)
    for i, entry in enumerate(entries or []):
        if entry is not None and i < len(tokens):
            token_logprobs[i] = _finite(entry.logprob)
            alternatives: dict[str, float] = {}
            for tid, lp in entry.top:
                alternatives.setdefault(_token_text(tokenizer, tid), _finite(lp))
            top[i] = alternatives
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _finite(value: float) -> float:
    # JSON has no -Infinity; OpenAI reports impossible tokens as -9999.0.
    return float(value) if math.isfinite(value) else -9999.0


def _full_response(kind: str, request_id: str, prepared: _Prepared, choices: Sequence[_Choice], tokenizer) -> dict:
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": prepared.model,
            "system_fingerprint": None}
    out = []
    for index, choice in enumerate(choices):
        lp = None
        prompt_text = prepared.prompt_texts[choice.prompt_index]
        if prepared.logprobs is not None:
            lp = _logprobs_payload(kind, choice.logprobs, tokenizer, len(prompt_text))
            if prepared.echo:
                head = _prompt_logprobs_payload(prepared.prompts[choice.prompt_index], choice.prompt_logprobs,
                                                tokenizer)
                lp = {key: head[key] + lp[key] for key in lp}
        if prepared.echo:
            choice.text = prompt_text + choice.text
        if kind == "chat.completion":
            out.append({"index": index, "message": {"role": "assistant", "content": choice.text, "refusal": None},
                        "logprobs": lp, "finish_reason": choice.finish_reason})
        else:
            out.append({"index": index, "text": choice.text, "logprobs": lp, "finish_reason": choice.finish_reason})
    body["choices"] = out
    body["usage"] = _usage(prepared, choices)
    return body


def app_from_directories(
    models: Mapping[str, Any],
    *,
    embedding_models: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    engine_options: Mapping[str, Any] | None = None,
    **app_options: Any,
) -> FastAPI:
    """Load each model directory (``name -> dir``) into an ``Engine``, each embedding model
    into a ``SentenceEncoder``, and build the app over them (``app_options`` go to
    :func:`create_app`). End-of-sequence ids include generation_config.json's, as
    ``genforge generate`` does (Llama 3 instruct ends turns with an id only it lists)."""
    from ..checkpoint import load_model, read_generation_config
    from ..encoder import SentenceEncoder
    from ..generate.request import end_of_sequence_ids
    from ..inference import pack_for_cpu_inference
    from ..tokenizer import Tokenizer
    from .engine import AsyncEngine, Engine

    if not models:
        raise ValueError("serve at least one generation model")
    for name, directory in {**models, **(embedding_models or {})}.items():
        if not (Path(directory) / "config.json").is_file():
            raise ValueError(f"model {name!r}: {directory} is not a model directory (no config.json)")
    engines, tokenizers = {}, {}
    for name, directory in models.items():
        model = load_model(directory, dtype=dtype, device=device)
        if str(model.device) == "cpu":
            model = pack_for_cpu_inference(model)
        tokenizer = Tokenizer.from_dir(directory)
        eos = end_of_sequence_ids(model.config, tokenizer, read_generation_config(directory).get("eos_token_id"))
        engines[name] = Engine(model, tokenizer, eos_token_ids=sorted(eos), **dict(engine_options or {}))
        tokenizers[name] = tokenizer
    encoders = {name: SentenceEncoder(directory, device=device) for name, directory in (embedding_models or {}).items()}
    return create_app(AsyncEngine(engines), tokenizers=tokenizers, embedding_models=encoders, **app_options)
