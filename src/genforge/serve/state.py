"""The state one server holds: its engine and models, their limits, admission and metrics.

`create_app` builds one :class:`ServerState` and its routes read it; nothing else is shared
between requests. Admission (API key, then the key's rate limit) and model lookup live here,
so that every route refuses the same way. A generation model may serve LoRA adapters (when its
engine has a `MultiLora`): a request picks one by `model` as `base:adapter`, by the adapter's
own name, or by the `lora` field, and `/v1/models` lists each as `base:adapter`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from .embeddings import Embedder
from .errors import OpenAIError, bad
from .limits import AdmissionQueue, KeyChecker, RateLimit, TokenBucketLimiter
from .metrics import ServerMetrics
from .preparation import ModelLimits

__all__ = ["ServerState"]


@dataclass
class ServerState:
    """Everything the routes of one app share."""

    engine: Any  # an AsyncEngine, or anything with its models/generate/abort/stats/shutdown
    tokenizers: Mapping[str, Any]  # generation model -> its tokenizer
    embedding_models: dict[str, Embedder]
    context: dict[str, int]  # generation model -> context length, in tokens
    eos: dict[str, list[int]]  # generation model -> its end-of-sequence ids
    keys: KeyChecker
    limiter: TokenBucketLimiter | None
    queue: AdmissionQueue
    metrics: ServerMetrics
    request_timeout: float | None
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # set once the server stops: new requests get a 503
    embed_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    guards: Any = None  # a guarding.ServerGuards when safety guards are on (create_app's `guards`)
    moderation_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def build(
        cls,
        engine,
        *,
        tokenizers: Mapping[str, Any],
        api_keys: Sequence[str] | None,
        rate_limit: RateLimit | None,
        max_queue: int | None,
        request_timeout: float | None,
        embedding_models: Mapping[str, Any] | None,
        max_model_len: Mapping[str, int] | None,
        eos_token_ids: Mapping[str, Sequence[int]] | None,
        clock: Callable[[], float],
    ) -> ServerState:
        """Check `create_app`'s arguments and build the state (see `create_app` for each)."""
        embedders = {name: Embedder.of(name, encoder) for name, encoder in (embedding_models or {}).items()}
        generation_models = list(engine.models)
        missing = [m for m in generation_models if m not in tokenizers]
        if missing:
            raise ValueError(f"no tokenizer given for model(s) {missing}; pass tokenizers={{name: Tokenizer}} for each")
        clash = sorted(set(generation_models) & set(embedders))
        if clash:
            raise ValueError(f"model name(s) {clash} are used for both a generation and an embedding model")
        if request_timeout is not None and not (request_timeout > 0):
            raise ValueError(f"request_timeout must be > 0 seconds or None, got {request_timeout!r}")
        return cls(
            engine=engine,
            tokenizers=tokenizers,
            embedding_models=embedders,
            context={m: _context_length(engine, m, max_model_len) for m in generation_models},
            eos={m: _eos_ids(engine, m, tokenizers[m], eos_token_ids) for m in generation_models},
            keys=KeyChecker(api_keys),
            limiter=TokenBucketLimiter(rate_limit, clock=clock) if rate_limit is not None else None,
            queue=AdmissionQueue(max_queue),
            metrics=ServerMetrics(engine, generation_models),
            request_timeout=request_timeout,
        )

    @property
    def generation_models(self) -> list[str]:
        return list(self.context)

    @property
    def all_models(self) -> list[str]:
        """Every model id a client may name: each generation model followed by its adapters
        (`base:adapter`), then the embedding models."""
        listed = []
        for model in self.generation_models:
            listed += [model, *(f"{model}:{adapter}" for adapter in self.adapters(model))]
        return listed + list(self.embedding_models)

    def adapters(self, model: str) -> tuple[str, ...]:
        """The LoRA adapters served over generation model `model` now."""
        listing = getattr(self.engine, "adapters", None)
        return tuple(listing(model)) if callable(listing) else ()

    def serves_adapters(self, model: str) -> bool:
        check = getattr(self.engine, "serves_adapters", None)
        return bool(check(model)) if callable(check) else False

    def limits(self, model: str) -> ModelLimits:
        return ModelLimits(context=self.context[model], vocabulary=len(self.tokenizers[model]))

    def admit(self, request: Request) -> str:
        """Authentication, then the key's rate limit; returns the caller's identity."""
        if self.draining:
            raise OpenAIError(503, "the server is shutting down", "server_error")
        who = request.client.host if request.client else "unknown"
        if self.keys.enabled:
            key = self.keys.check(request.headers.get("authorization"))
            if key is None:
                raise OpenAIError(
                    401,
                    "missing or invalid API key; send it as 'Authorization: Bearer KEY'",
                    "authentication_error",
                    code="invalid_api_key",
                )
            who = "key:" + key
        if self.limiter is not None:
            wait = self.limiter.acquire(who)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                raise OpenAIError(
                    429,
                    f"rate limit reached ({self.limiter.limit.requests:g} requests per "
                    f"{self.limiter.limit.per_seconds:g} s); retry in {retry} s",
                    "rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry)},
                )
        return who

    def generation_model(self, name: str) -> str:
        return self.generation_target(name)[0]

    def generation_target(self, name: str, lora: str | None = None) -> tuple[str, str | None]:
        """The generation model and LoRA adapter (None: the base) that a request's `model`
        (a model, `model:adapter`, or an adapter's own name) and `lora` fields pick."""
        if name in self.context:
            model, adapter = name, None
        else:
            base, separator, own_name = name.rpartition(":")
            if separator and base in self.context:
                model, adapter = base, own_name
            else:
                owners = [m for m in self.generation_models if name in self.adapters(m)]
                if len(owners) > 1:
                    choices = ", ".join(f"{m}:{name}" for m in owners)
                    raise bad(f"the adapter {name!r} is served over several models; name one of {choices}", "model")
                if not owners:
                    raise self.not_found(name)
                model, adapter = owners[0], name
        if lora is not None:
            if adapter is not None and adapter != lora:
                raise bad(f"model {name!r} names the adapter {adapter!r} but lora names {lora!r}; give one", "lora")
            adapter = lora
        if adapter is not None and adapter not in self.adapters(model):
            raise self.not_found(f"{model}:{adapter}", f" ({model!r} serves no adapter {adapter!r})")
        return model, adapter

    def not_found(self, name: str, why: str = "") -> OpenAIError:
        """The 404 for a model (or `model:adapter`) not served, listing those that are."""
        if not why and name in self.embedding_models:
            why = " (it is an embedding model: use /v1/embeddings)"
        served = [m for m in self.all_models if m not in self.embedding_models]
        return OpenAIError(
            404,
            f"the model {name!r} does not exist{why}; served: {', '.join(served)}",
            "not_found_error",
            "model",
            "model_not_found",
        )

    def adapter_target(self, lora_name: str, model: str | None) -> tuple[str, str]:
        """The generation model and adapter name of a load or unload request: `lora_name`,
        or `base:lora_name`, over `model` (which may be left out when one model is served)."""
        base, separator, name = lora_name.rpartition(":")
        if separator:
            if model is not None and model != base:
                raise bad(f"lora_name {lora_name!r} names the model {base!r} but model is {model!r}", "model")
            model = base
        elif model is None:
            if len(self.generation_models) > 1:
                raise bad(
                    f"several models are served ({', '.join(self.generation_models)}); name one in 'model'", "model"
                )
            model = self.generation_models[0]
        if model not in self.context:
            raise self.not_found(model)
        if not self.serves_adapters(model):
            raise bad(f"the model {model!r} is not served with LoRA support", "model")
        if name in self.context or name in self.embedding_models:
            raise bad(f"{name!r} is the name of a served model; give the adapter another name", "lora_name")
        return model, name

    def embedding_model(self, name: str) -> Embedder:
        if name in self.embedding_models:
            return self.embedding_models[name]
        hint = " (it is a generation model)" if name in self.context else ""
        served = ", ".join(self.embedding_models) or "none"
        raise OpenAIError(
            404,
            f"the embedding model {name!r} does not exist{hint}; served: {served}",
            "not_found_error",
            "model",
            "model_not_found",
        )

    def model_card(self, name: str) -> dict:
        base, separator, adapter = name.rpartition(":")
        is_adapter = bool(separator) and base in self.context and adapter in self.adapters(base)
        if name not in self.context and name not in self.embedding_models and not is_adapter:
            raise OpenAIError(404, f"the model {name!r} does not exist", "not_found_error", "model", "model_not_found")
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "genforge"}
        if is_adapter:  # vLLM's card of a LoRA adapter names the model it runs over
            card["parent"] = base
            card["max_model_len"] = self.context[base]
        elif name in self.context:
            card["max_model_len"] = self.context[name]
        return card


def _inner_engine(engine, model: str):
    """The synchronous ``Engine`` behind an ``AsyncEngine`` for ``model``, if it exposes one
    (read for its constants only)."""
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
