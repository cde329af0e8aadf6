"""The OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine.

Routes follow the OpenAI REST reference, so any OpenAI client works against the server:

- ``GET /v1/models`` (and ``/v1/models/{id}``): the generation and embedding models served;
- ``POST /v1/completions``: text (or token-id) prompts, ``n`` choices each;
- ``POST /v1/chat/completions``: messages rendered with the model's chat template; with
  ``tools``, calls come back as ``message.tool_calls`` (``delta.tool_calls`` when streamed),
  their arguments constrained to each function's schema (`generate.tool_calls`);
- ``POST /v1/embeddings``: sentence embeddings from encoder models;
- ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's routes): serve a PEFT
  LoRA adapter over a generation model, or stop; requests then pick it by ``model`` as
  ``base:adapter`` (or the adapter's own name, or a ``lora`` field), in the same batches as the
  base's requests (`finetune.multi_lora`);
- ``POST /v1/moderations``: OpenAI's moderation endpoint, answered by genforge's moderation
  heads (`safety.moderation`);
- ``GET /health`` and ``GET /metrics`` (Prometheus).

With ``guards`` (`safety.guards.GuardConfig`; ``genforge serve --guard input,output,pii``),
prompts are scanned for injection before they run (blocked: a 400 with code
``prompt_injection``), outputs are moderated as they stream (stopped: ``finish_reason:
"content_filter"``) and PII is redacted from outputs and guard logs; see `guarding`.

Streaming is server-sent events (one ``data: {json}`` chunk per engine step with new text,
ending with ``data: [DONE]``); with ``stream_options.include_usage`` a last chunk carries
``usage`` and every other chunk ``"usage": null``, as OpenAI does.

Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 for invalid parameters (FastAPI's 422 is turned into 400, naming the field) or a body
that is not a JSON object, 400 for a prompt that does not fit the context (both numbers are given), 401 for a missing or
unknown API key, 404 for an unknown model, 408 when a request runs past the timeout, 429
when a key's rate limit is spent (``Retry-After`` says when to retry) or the queue is full,
503 while shutting down, and 500 only for faults of the server itself.

Beyond OpenAI's parameters the sampling extensions vLLM accepts are understood too:
``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``.

This module only wires the app: `create_app` builds one `state.ServerState` and thin routes
over it. The pieces, each usable alone: `schemas` (request bodies), `errors` (OpenAIError and
what maps to it), `preparation` (a body to engine parameters), `payloads` (response shapes and
stream chunks), `runner` (the run and stream of one request), `embeddings`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..finetune.lora import LoraError
from .embeddings import embeddings_response
from .errors import OpenAIError, bad, http_error_to_openai, internal_error, validation_to_openai
from .guarding import ServerGuards, moderation_response
from .limits import RateLimit
from .metrics import CONTENT_TYPE_LATEST, route_label
from .payloads import CHAT, COMPLETION
from .playground import mount_playground
from .preparation import (
    chat_prompt,
    completion_prompts,
    prepare,
    response_format_constraints,
    tool_call_constraints,
    tool_request,
)
from .runner import run
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    openapi_with_openai_errors,
)
from .state import ServerState

__all__ = ["create_app", "app_from_directories", "OpenAIError"]

log = logging.getLogger(__name__)


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
    guards: Any = None,
    playground: bool = True,
    rag: Any = None,
) -> FastAPI:
    """Build the FastAPI app serving ``engine`` (an ``AsyncEngine``).

    ``tokenizers`` maps each engine model name to its ``genforge.tokenizer.Tokenizer``;
    ``embedding_models`` maps names to encoders with ``encode(texts) -> (n, dim) tensor``
    and a ``tokenizer`` (``genforge.encoder.SentenceEncoder``). ``api_keys``: Bearer keys
    accepted (None or empty: no authentication). ``rate_limit``: per key (per client
    address without keys). ``max_queue``: sequences in flight at once, running or waiting
    (None: unbounded). ``request_timeout``: seconds a request may take (None: no limit).
    ``max_model_len`` and ``eos_token_ids`` default to what each engine reports.
    ``guards``: a `safety.guards.GuardConfig` (or a built `guarding.ServerGuards`) turning the
    input, output and PII guards on; None: no guards. ``playground``: serve the web page at
    ``/``; ``rag``: a `playground.RagService` answering ``/v1/rag/answer`` (see `playground`).
    """
    state = ServerState.build(
        engine,
        tokenizers=tokenizers,
        api_keys=api_keys,
        rate_limit=rate_limit,
        max_queue=max_queue,
        request_timeout=request_timeout,
        embedding_models=embedding_models,
        max_model_len=max_model_len,
        eos_token_ids=eos_token_ids,
        clock=clock,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn stops accepting connections and waits for open ones before it runs this,
        # so by now in-flight requests have finished (or their clients have gone).
        state.draining = True
        await engine.shutdown(drain_timeout=drain_timeout)

    if guards is not None:
        state.guards = guards if isinstance(guards, ServerGuards) else ServerGuards(guards, state.metrics.registry)

    app = FastAPI(
        title="genforge",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions, chat completions and embeddings.",
    )
    app.state.server = state
    app.state.metrics = state.metrics
    app.state.queue = state.queue
    app.state.engine = engine
    # Adapters come and go at run time: a fixed list of model names would refuse them.
    fixed = [] if any(state.serves_adapters(m) for m in state.generation_models) else state.generation_models
    app.openapi = openapi_with_openai_errors(
        app,
        {
            "CompletionRequest": fixed,
            "ChatCompletionRequest": fixed,
            "EmbeddingRequest": list(state.embedding_models),
        },
    )
    _add_error_handlers(app, state)
    _add_routes(app, state)
    mount_playground(app, state, rag=rag, page=playground)
    return app


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    """Every error answered in OpenAI's shape, and counted by route and status."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, err: OpenAIError):
        state.metrics.http_requests.labels(route_label(request), str(err.status)).inc()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return await openai_error(request, validation_to_openai(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return await openai_error(request, http_error_to_openai(request.method, request.url.path, err))

    @app.exception_handler(Exception)
    async def fault(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)
        state.metrics.http_requests.labels(route_label(request), "500").inc()
        return internal_error(err).response()


def _add_routes(app: FastAPI, state: ServerState) -> None:
    """The routes: each checks the caller (`ServerState.admit`), then hands the body on."""

    async def admit(request: Request) -> str:
        return state.admit(request)

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "models": state.all_models}

    @app.get("/metrics")
    async def prometheus_metrics():
        state.metrics.queue.set(state.queue.in_flight)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(_: str = Depends(admit)):
        return {"object": "list", "data": [state.model_card(m) for m in state.all_models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, _: str = Depends(admit)):
        return state.model_card(model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, _: str = Depends(admit)):
        model, adapter = state.generation_target(body.model, body.lora)
        events = await state.guards.check_request(body) if state.guards is not None else []
        prompts, texts = completion_prompts(body, state.tokenizers[model])
        prepared = prepare(model, body, prompts, texts, body.logprobs, None, "prompt", state.limits(model))
        prepared.echo, prepared.score_only, prepared.adapter = body.echo, body.max_tokens == 0, adapter
        return await run(state, COMPLETION, prepared, request, events)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, _: str = Depends(admit)):
        model, adapter = state.generation_target(body.model, body.lora)
        events = await state.guards.check_request(body) if state.guards is not None else []
        tokenizer = state.tokenizers[model]
        tools = tool_request(body, tokenizer)
        prompt, text = chat_prompt(body, tokenizer, model, tools)
        constraints = None
        if tools is not None and tools.choice.mode != "none":
            constraints = await tool_call_constraints(tools, tokenizer, state.eos[model], body.n)
        elif body.response_format is not None:
            constraints = await response_format_constraints(body.response_format, tokenizer, state.eos[model], body.n)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prepared = prepare(model, body, [prompt], [text], logprobs, constraints, "messages", state.limits(model))
        prepared.adapter = adapter
        if tools is not None and tools.choice.mode != "none":
            prepared.tool_format = tools.format
        return await run(state, CHAT, prepared, request, events)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest, _: str = Depends(admit)):
        model, name = state.adapter_target(body.lora_name, body.model)
        if name in state.adapters(model) and not body.load_inplace:
            raise bad(
                f"an adapter named {name!r} is already loaded over {model!r}; unload it first, or send "
                '"load_inplace": true to replace it',
                "lora_name",
            )
        try:
            await state.engine.load_adapter(model, name, body.lora_path, replace=body.load_inplace)
        except LoraError as err:  # the directory is not a LoRA adapter for this model: the message says why
            raise bad(str(err), "lora_path") from None
        state.metrics.http_requests.labels("/v1/load_lora_adapter", "200").inc()
        return {"object": "lora_adapter", "id": f"{model}:{name}", "lora_name": name, "model": model}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest, _: str = Depends(admit)):
        model, name = state.adapter_target(body.lora_name, body.model)
        if name not in state.adapters(model):
            raise state.not_found(f"{model}:{name}", f" ({model!r} serves no adapter {name!r})")
        await state.engine.unload_adapter(model, name)
        state.metrics.http_requests.labels("/v1/unload_lora_adapter", "200").inc()
        return {"object": "lora_adapter", "id": f"{model}:{name}", "lora_name": name, "model": model, "deleted": True}

    @app.post("/v1/moderations")
    async def moderations(request: Request, _: str = Depends(admit)):
        try:
            body = await request.json()
        except ValueError:
            raise bad("the request body is not valid JSON; send an object with an 'input'") from None
        response = await moderation_response(body, state.guards, state.moderation_lock)
        state.metrics.http_requests.labels("/v1/moderations", "200").inc()
        return response

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, _: str = Depends(admit)):
        encoder = state.embedding_model(body.model)
        response = await embeddings_response(body, encoder, state.embed_lock)
        state.metrics.http_requests.labels("/v1/embeddings", "200").inc()
        return response


def app_from_directories(
    models: Mapping[str, Any],
    *,
    loras: Mapping[str, Mapping[str, Any]] | None = None,
    embedding_models: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    engine_options: Mapping[str, Any] | None = None,
    **app_options: Any,
) -> FastAPI:
    """Load each model directory (``name -> dir``) into an ``Engine``, each embedding model
    into a ``SentenceEncoder``, and build the app over them (``app_options`` go to
    :func:`create_app`). End-of-sequence ids include generation_config.json's, as
    ``genforge generate`` does (Llama 3 instruct ends turns with an id only it lists).
    Every generation model can serve LoRA adapters (a `MultiLora`, built before the model is
    packed for the CPU); ``loras`` (model name -> {adapter name -> PEFT adapter dir}) are
    loaded at start-up, each checked against its model before the server starts."""
    from ..checkpoint import read_config
    from ..encoder import SentenceEncoder
    from ..finetune.multi_lora import MultiLora
    from ..inference import pack_for_cpu_inference
    from ..loading import load_for_inference
    from ..seq2seq import refuse_encoder_decoder
    from .engine import ENGINE_WHY, AsyncEngine, Engine

    if not models:
        raise ValueError("serve at least one generation model")
    unknown = sorted(set(loras or {}) - set(models))
    if unknown:
        raise ValueError(
            f"LoRA adapters given for {', '.join(unknown)}, which is not served; served: {', '.join(models)}"
        )
    for name, directory in {**models, **(embedding_models or {})}.items():
        if not (Path(directory) / "config.json").is_file():
            raise ValueError(f"model {name!r}: {directory} is not a model directory (no config.json)")
    for name, directory in models.items():  # before any weights load
        refuse_encoder_decoder(read_config(directory), f"serving model {name!r}", ENGINE_WHY)
    engines, tokenizers = {}, {}
    for name, directory in models.items():
        loaded = load_for_inference(directory, dtype=dtype, device=device, pack=False)
        adapters = MultiLora(loaded.model)  # reads the layer layout, which packing hides
        pack_for_cpu_inference(loaded.model)
        for adapter, adapter_directory in (loras or {}).get(name, {}).items():
            if adapter in models:
                raise ValueError(f"the LoRA adapter {adapter!r} has the name of a served model; name it apart")
            adapters.load(adapter, adapter_directory)
        engines[name] = Engine(
            loaded.model,
            loaded.tokenizer,
            eos_token_ids=loaded.eos_token_ids,
            adapters=adapters,
            **dict(engine_options or {}),
        )
        tokenizers[name] = loaded.tokenizer
    encoders = {name: SentenceEncoder(directory, device=device) for name, directory in (embedding_models or {}).items()}
    return create_app(AsyncEngine(engines), tokenizers=tokenizers, embedding_models=encoders, **app_options)
