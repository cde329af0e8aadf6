"""The web playground at ``/`` of `genforge serve`, and the few routes it needs beyond OpenAI's.

A playground (as the hosted model providers offer one) is a page to try a served model without
writing a client: chat with streaming and sampling controls, "ask your documents" over a RAG
index with its cited sources, a token view of a prompt with the log-probabilities of a
completion, and the concept map. The page is plain HTML, CSS and one script (``playground/``
beside this module): no build step, and nothing loads from outside the server, which the
Content-Security-Policy sent with the page enforces in the browser.

The page talks to the same routes any client uses (``/v1/models``, ``/v1/chat/completions``
streamed as server-sent events, ``/v1/completions`` with ``echo`` and ``logprobs``), plus:

- ``POST /v1/tokenize`` (vLLM's ``/tokenize`` under ``/v1``): a prompt's token ids and the text
  of each token;
- ``POST /v1/rag/answer``, served when the server was started with a RAG index
  (``genforge serve --rag-index DIR``): `rag.Answerer`'s grounded answer with its citations,
  each with the cited chunk's text, its retrieval score and how well it supports the answer;
- ``GET /v1/concepts``: the concept map (`genforge.concepts`, imported when first asked for).

These routes check the API key like every ``/v1`` route; the page and its two static files do
not (they hold no data), and the page sends the key it is given as a Bearer header only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .errors import OpenAIError, bad
from .payloads import token_text

__all__ = [
    "STATIC_DIR",
    "RagService",
    "TokenizeRequest",
    "RagAnswerRequest",
    "mount_playground",
    "concept_records",
    "open_rag_service",
    "add_arguments",
    "app_options",
]

STATIC_DIR = Path(__file__).with_name("playground")
# The only files served from STATIC_DIR, by URL name: an allow-list, so no path reaches the disk.
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# Nothing but this server: scripts, styles and fetches from its own origin, no frames, no forms
# posting elsewhere. Inline scripts are refused too, so injected markup could not run.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CONCEPT_FIELDS = ("name", "group", "summary", "module", "function", "test", "reference", "doc", "demo")
MAX_RAG_PASSAGES = 20


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: StrictStr = Field(min_length=1)
    add_special_tokens: StrictBool = True  # as /v1/completions encodes a text prompt


class RagAnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: StrictStr = Field(min_length=1)
    k: StrictInt | None = Field(default=None, ge=1, le=MAX_RAG_PASSAGES)  # passages retrieved; None: the server's


class _RecordingRetriever:
    """A retriever that remembers the hits of its first search, so the answer's sources can carry
    their retrieval scores without searching twice. Everything else goes to the real one."""

    def __init__(self, retriever) -> None:
        self._retriever = retriever
        self.hits: list | None = None

    def search(self, query: str, **options):
        hits = self._retriever.search(query, **options)
        if self.hits is None:
            self.hits = list(hits)
        return hits

    def __getattr__(self, name: str):
        return getattr(self._retriever, name)


class RagService:
    """Grounded answers over one RAG index for the HTTP API: `rag.Answerer` run in a worker
    thread (it embeds on the CPU), one question at a time (its caches are not thread-safe)."""

    def __init__(self, retriever, config=None, source: str = "") -> None:
        from ..rag.answer import AnswerConfig, SupportChecker

        self.retriever, self.config = retriever, config or AnswerConfig()
        # One checker for every question: it caches the vectors of the sentences it has scored.
        self.checker = SupportChecker(retriever.embedder, self.config.support_threshold)
        self.source = source  # the index directory, shown in the 'no answer' hints
        self._lock = threading.Lock()

    def answer(self, question: str, k: int | None = None) -> dict:
        """The answer as JSON: its text, its sentences with their citations, and the sources."""
        from ..rag.answer import Answerer

        config = self.config if k is None else dataclasses.replace(self.config, k=k)
        recorder = _RecordingRetriever(self.retriever)
        with self._lock:
            answer = Answerer(recorder, config=config, checker=self.checker).ask(question)
        hits = {hit.chunk.chunk_id: hit for hit in recorder.hits or []}
        sources = []
        for citation in answer.citations:
            hit = hits.get(citation.chunk_id)
            support = [s.citation_support.get(citation.number, 0.0) for s in answer.sentences]
            sources.append(
                {
                    "number": citation.number,
                    "source": citation.source,
                    "title": citation.title,
                    "heading_path": list(citation.heading_path),
                    "start": citation.start,
                    "end": citation.end,
                    "text": hit.chunk.text if hit is not None else "",
                    "score": float(hit.score) if hit is not None else None,
                    "support": max(support, default=0.0),
                }
            )
        return {
            "object": "rag.answer",
            "question": answer.question,
            "answer": answer.text,
            "covered": answer.covered,
            "confidence": answer.confidence,
            "mode": answer.mode,
            "sentences": [
                {"text": s.text, "citations": list(s.citations), "supported": s.supported, "support": s.support}
                for s in answer.sentences
            ],
            "sources": sources,
        }


def open_rag_service(index_dir: str | Path, encoder: str | Path | None = None) -> RagService:
    """A `RagService` over a saved genforge RAG index (`genforge rag index`), queried with the
    encoder its manifest names (``encoder``: that encoder's directory, when not the default)."""
    from ..rag.retrieve import open_retriever

    if not Path(index_dir).is_dir():
        raise ValueError(f"--rag-index {index_dir} is not a directory; build one with `genforge rag index PATHS`")
    return RagService(open_retriever(index_dir, encoder), source=str(index_dir))


def concept_records() -> list[dict]:
    """The concept map (`genforge.concepts`) as JSON records."""
    from ..concepts import load_concept_map

    return [concept.as_dict() for concept in load_concept_map()]


def mount_playground(app: FastAPI, state, *, rag: RagService | None = None, page: bool = True) -> None:
    """Add the playground's routes to the server's app: the page and its files (unless
    ``page`` is False), ``/v1/tokenize``, ``/v1/rag/answer`` (answered when ``rag`` is given)
    and ``/v1/concepts``. ``state`` is the app's `state.ServerState`."""

    async def admit(request: Request) -> str:
        return state.admit(request)

    def counted(route: str) -> None:
        state.metrics.http_requests.labels(route, "200").inc()

    if page:
        # HEAD too: uptime checks and `curl -I` probe pages with it.
        @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
        async def playground_page():
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

        @app.api_route("/playground/{name}", methods=["GET", "HEAD"], include_in_schema=False)
        async def playground_file(name: str):
            if name not in STATIC_FILES:
                raise OpenAIError(404, f"no playground file {name!r}", "not_found_error")
            return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    @app.post("/v1/tokenize")
    async def tokenize(body: TokenizeRequest, _: str = Depends(admit)):
        model = state.generation_model(body.model)
        tokenizer = state.tokenizers[model]
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        counted("/v1/tokenize")
        return {
            "model": body.model,
            "tokens": ids,
            "token_strs": [token_text(tokenizer, i) for i in ids],
            "count": len(ids),
            "max_model_len": state.context[model],
        }

    @app.post("/v1/rag/answer")
    async def rag_answer(body: RagAnswerRequest, _: str = Depends(admit)):
        if rag is None:
            raise OpenAIError(
                404,
                "this server has no RAG index to answer from; start it with `genforge serve --rag-index DIR` "
                "(DIR built by `genforge rag index PATHS --index DIR`)",
                "not_found_error",
                code="rag_index_not_configured",
            )
        if not body.question.strip():
            raise bad("the question is empty", "question")
        response = await asyncio.to_thread(rag.answer, body.question, body.k)
        counted("/v1/rag/answer")
        return response

    @app.get("/v1/concepts")
    async def concepts(_: str = Depends(admit)):
        records = concept_records()
        counted("/v1/concepts")
        return {"object": "list", "data": records}


def add_arguments(serve_parser: argparse.ArgumentParser) -> None:
    """The playground's flags on `genforge serve`."""
    group = serve_parser.add_argument_group("web playground (docs/playground.md)")
    group.add_argument(
        "--rag-index",
        default=None,
        metavar="DIR",
        help="answer POST /v1/rag/answer (the playground's 'ask your documents') from this genforge RAG index "
        "(built by `genforge rag index`)",
    )
    group.add_argument(
        "--rag-encoder",
        default=None,
        metavar="DIR",
        help="the encoder directory the RAG index was built with (default: the bundled all-MiniLM-L6-v2)",
    )
    group.add_argument(
        "--no-playground", action="store_true", help="do not serve the web playground page at / (the API stays)"
    )


def app_options(args: argparse.Namespace) -> dict[str, Any]:
    """`create_app` keyword arguments from the playground's flags (opens the RAG index, if any)."""
    if args.rag_encoder and not args.rag_index:
        raise ValueError("--rag-encoder is only used with --rag-index DIR")
    rag = open_rag_service(args.rag_index, args.rag_encoder) if args.rag_index else None
    return {"playground": not args.no_playground, "rag": rag}
