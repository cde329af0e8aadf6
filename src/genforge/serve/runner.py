"""Running one generation request: its engine streams, the client's connection, its answer.

A request of ``n`` choices over several prompts is several engine requests, run side by side
(`Fanout`) and gathered into one :class:`~.payloads.Choice` each. A plain request waits for
all of them and answers one body; a streamed one waits for the first output (so that a request
the engine refuses still gets its 400, not a 200 stream carrying an error) and then sends
events as outputs arrive. A client that leaves, a deadline that passes, or the end of the
response frees the request's place in the admission queue and aborts what the engine still
runs for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .engine import Request as EngineRequest
from .engine import RequestOutput
from .errors import OpenAIError, engine_error, internal_error
from .guarding import GUARD_HEADER, StreamGuard, header_value, report
from .metrics import route_label
from .payloads import CHAT, DONE_EVENT, Choice, StreamChunks, full_response, sse
from .preparation import Prepared
from .state import ServerState

__all__ = ["run", "Fanout", "RequestRun", "race", "ClientGone"]

log = logging.getLogger(__name__)

_DONE = object()


class Fanout:
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


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def race(awaitable, watcher: asyncio.Future, deadline: float | None):
    """Await ``awaitable``, giving up when ``watcher`` (the client's disconnect) completes
    first (``ClientGone``) or the deadline passes (``TimeoutError``)."""
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
        raise ClientGone()
    raise TimeoutError()


async def _disconnected(request: Request) -> None:
    # After the body is read, the next ASGI message on a connection is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class RequestRun:
    """One generation request in flight: its engine requests, its choices so far, and its
    place in the admission queue (given back once, by `close`)."""

    def __init__(self, state: ServerState, kind: str, prepared: Prepared) -> None:
        self.state, self.kind, self.prepared = state, kind, prepared
        sequences = len(prepared.params)
        self.request_id = f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex}"
        self.choices = [Choice(prompt_index=k // prepared.n) for k in range(sequences)]
        requests = [
            EngineRequest(
                request_id=f"{self.request_id}-{k}",
                prompt_token_ids=prepared.prompts[k // prepared.n],
                params=prepared.params[k],
                logprobs=prepared.logprobs,
                processors=prepared.processors[k],
                ignore_eos=prepared.ignore_eos,
                prompt_logprobs=prepared.logprobs if prepared.echo else None,
                adapter=prepared.adapter,
            )
            for k in range(sequences)
        ]
        self.fanout = Fanout(state.engine, prepared.model, requests)
        timeout = state.request_timeout
        self.deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self._queued = sequences

    def record(self, index: int, output: RequestOutput) -> RequestOutput:
        """Add an engine output to its choice; returns it as the client should see it."""
        if output.finished:
            self.state.metrics.observe_finished(self.prepared.model, output)
        return self.choices[index].add(output, score_only=self.prepared.score_only)

    async def collect(self) -> None:
        async for index, output in self.fanout:
            self.record(index, output)

    async def close(self) -> None:
        if self._queued:
            self.state.queue.leave(self._queued)
            self._queued = 0
        await self.fanout.aclose()

    def stop(self, index: int) -> None:
        """Stop one choice's engine request (a guard ended it); the others run on."""
        self.fanout.tasks[index].cancel()

    def check_not_aborted(self) -> None:
        if any(c.finish_reason == "abort" for c in self.choices):
            raise OpenAIError(503, "the request was aborted by the server (shutting down); retry", "server_error")


async def run(
    state: ServerState, kind: str, prepared: Prepared, request: Request, guard_events: Sequence[Any] = ()
) -> dict | Response:
    """Run a prepared request and answer it: a whole body, or a stream of events.
    ``guard_events``: what the input guards did before (reported with the answer)."""
    sequences = len(prepared.params)
    if not state.queue.try_enter(sequences):
        raise OpenAIError(
            429,
            f"the server is at capacity ({state.queue.capacity} sequences in flight); retry shortly",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    job = RequestRun(state, kind, prepared)
    # Until the response starts, a client disconnect is noticed by watching the connection
    # (once streaming, Starlette cancels the response itself when the client goes away).
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        first = await race(job.collect() if not prepared.stream else job.fanout.__anext__(), watcher, job.deadline)
    except BaseException as err:
        await job.close()
        if isinstance(err, ClientGone):
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        if isinstance(err, StopAsyncIteration):
            raise OpenAIError(500, "the engine returned no output", "server_error") from None
        raise engine_error(err, state.request_timeout) from None
    finally:
        watcher.cancel()
    route = route_label(request)
    guards = state.guards
    if not prepared.stream:
        await job.close()
        job.check_not_aborted()
        events = list(guard_events)
        if guards is not None and guards.filters_output:
            events += await guards.filter_choices(job.choices)
        state.metrics.http_requests.labels(route, "200").inc()
        body = full_response(kind, job.request_id, prepared, job.choices, state.tokenizers[prepared.model])
        if guards is None:
            return body
        body["guard"] = report(events)
        return JSONResponse(body, headers={GUARD_HEADER: header_value(events)})
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    stream_guard = None
    if guards is not None:
        headers[GUARD_HEADER] = header_value(guard_events)
        if guards.filters_output:
            stream_guard = guards.stream_guard(len(job.choices))
    return StreamingResponse(
        _events(job, first, route, stream_guard, list(guard_events)), media_type="text/event-stream", headers=headers
    )


async def _events(
    job: RequestRun,
    first: tuple[int, RequestOutput],
    route: str,
    guard: StreamGuard | None = None,
    guard_events: list | None = None,
) -> AsyncIterator[str]:
    """The events of a streamed response, from its first output on; errors once the headers
    are sent are reported in-band, as an error event before ``[DONE]``. With a ``guard``, each
    choice's text is held back until checked; the chunk that finishes a choice carries the
    guards' report in a ``guard`` field."""
    state = job.state
    chunks = StreamChunks(job.kind, job.request_id, job.prepared, job.choices, state.tokenizers[job.prepared.model])
    try:
        for event in chunks.opening():
            yield event
        item = first
        while True:
            index, output = item
            if guard is None:
                for event in chunks.output(index, job.record(index, output)):
                    yield event
            elif not guard.stopped(index):  # outputs already queued for a stopped choice are dropped
                for event in await _guarded_output(job, chunks, guard, guard_events or [], index, output):
                    yield event
            try:
                async with asyncio.timeout_at(job.deadline):
                    item = await job.fanout.__anext__()
            except StopAsyncIteration:
                break
        for event in chunks.closing():
            yield event
        state.metrics.http_requests.labels(route, "200").inc()
    except OpenAIError as err:
        yield sse(err.body())
    except (asyncio.CancelledError, GeneratorExit):
        raise  # the client went away: the finally below aborts the engine requests
    except Exception as err:  # the headers are sent: report in-band
        error = engine_error(err, state.request_timeout)
        if not isinstance(error, OpenAIError):  # a real fault: logged, and a 500-shaped event
            log.error("internal error while streaming %s", job.request_id, exc_info=err)
            error = internal_error(err)
            state.metrics.http_requests.labels(route, "500").inc()
        yield sse(error.body())
    finally:
        await job.close()
    yield DONE_EVENT


async def _guarded_output(
    job: RequestRun, chunks: StreamChunks, guard: StreamGuard, guard_events: list, index: int, output: RequestOutput
) -> list[str]:
    """The events for one engine output after the output guards: released text only, and a
    ``content_filter`` finish (and the engine request stopped) when a guard stops the choice."""
    shown = job.record(index, output)
    text, stopped, _ = await guard.feed(index, shown.text, shown.finished)
    if stopped:
        job.choices[index].finish_reason = "content_filter"
        job.stop(index)
        shown = dataclasses.replace(shown, text="", finished=True, finish_reason="content_filter")
    else:
        shown = dataclasses.replace(shown, text=text)
    extra = None
    if shown.finished:
        events = guard_events + [e for e in guard.events if e.detail.get("choice") == index]
        extra = {"guard": report(events)}
    return list(chunks.output(index, shown, extra))
