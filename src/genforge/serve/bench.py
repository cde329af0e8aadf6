"""Online serving benchmark against any OpenAI-compatible endpoint.

Modelled on vLLM's ``benchmark_serving``: requests arrive as a Poisson process at a given
rate (exponential gaps between arrivals; ``inf`` sends them all at once), with prompt and
output lengths drawn uniformly around a mean (``range_ratio``). Every request streams, so
the client sees each token as it arrives and measures

- TTFT, time to first token: from sending the request to the first chunk with text;
- ITL, inter-token latency: the gaps between successive chunks with text;
- TPOT, time per output token: ``(e2e - TTFT) / (output tokens - 1)`` per request;
- e2e latency: from sending to the last byte;

and, over the whole run, request throughput and output tokens per second. Token counts
come from the server's ``usage`` (``stream_options.include_usage``), so they are exact.

The statistics (:func:`summarize`, :func:`markdown_report`) take plain
:class:`RequestRecord` lists, so a benchmark that drives an engine in-process
(``benchmarks/serve.py``) reports the same numbers the same way.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "RequestRecord",
    "Workload",
    "random_workload",
    "poisson_offsets",
    "summarize",
    "markdown_report",
    "run_rate",
    "benchmark_serving",
]

# Common English words: a prompt of N of them is about N tokens for most tokenizers.
_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact be have do say get make go know take see come think look "
    "want give use find tell ask seem feel try leave call good new first last long great little own other "
    "old right big high different small large next early young important few public bad same able"
).split()


@dataclass
class RequestRecord:
    """What one benchmarked request did; times in seconds."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between successive text chunks
    e2e: float | None = None
    ok: bool = False
    error: str | None = None

    @classmethod
    def from_token_times(cls, arrival: float, token_times: Sequence[float], prompt_tokens: int = 0) -> RequestRecord:
        """A record from when a request arrived and when each of its tokens appeared (same clock),
        as an in-process benchmark sees them; a request with no tokens counts as failed."""
        if not token_times:
            return cls(prompt_tokens=prompt_tokens, error="no tokens")
        times = list(token_times)
        return cls(
            prompt_tokens=prompt_tokens,
            output_tokens=len(times),
            ttft=times[0] - arrival,
            itl=[b - a for a, b in zip(times, times[1:])],
            e2e=times[-1] - arrival,
            ok=True,
        )

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Workload:
    prompt: str
    max_tokens: int


def random_workload(
    num_requests: int, input_len: int, output_len: int, range_ratio: float = 0.5, seed: int = 0
) -> list[Workload]:
    """``num_requests`` prompts of about ``input_len`` words and output limits around
    ``output_len``, each drawn uniformly from ``[len * (1 - range_ratio), len * (1 + range_ratio)]``."""
    if num_requests < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_requests, input_len and output_len must all be >= 1")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def draw(mean: int) -> int:
        return rng.randint(max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio))))

    return [
        Workload(" ".join(rng.choice(_WORDS) for _ in range(draw(input_len))), draw(output_len))
        for _ in range(num_requests)
    ]


def poisson_offsets(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of ``rate`` requests/s;
    all zero for an infinite rate."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (inf: all at once), got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1.0 / rate, size=num_requests)).tolist()


def _stats(values: Sequence[float]) -> dict:
    if not values:
        return {"mean_ms": None, "p50_ms": None, "p90_ms": None, "p99_ms": None}
    array = np.asarray(values, dtype=np.float64) * 1000.0
    return {
        "mean_ms": float(array.mean()),
        "p50_ms": float(np.percentile(array, 50)),
        "p90_ms": float(np.percentile(array, 90)),
        "p99_ms": float(np.percentile(array, 99)),
    }


def summarize(records: Sequence[RequestRecord], duration: float) -> dict:
    """Latency percentiles and throughputs of one run of ``duration`` seconds."""
    done = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_tokens_per_s": output / duration if duration > 0 else 0.0,
        "input_tokens_per_s": prompt / duration if duration > 0 else 0.0,
        "total_output_tokens": output,
        "total_input_tokens": prompt,
        "ttft": _stats([r.ttft for r in done if r.ttft is not None]),
        "tpot": _stats([t for r in done if (t := r.tpot) is not None]),
        "itl": _stats([gap for r in done for gap in r.itl]),
        "e2e": _stats([r.e2e for r in done if r.e2e is not None]),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def markdown_report(results: Sequence[dict], title: str = "Serving benchmark") -> str:
    """One table row per run (each a :func:`summarize` dict with ``rate`` and ``label`` added)."""

    def ms(value):
        return "-" if value is None else f"{value:.1f}"

    header = (
        "| run | rate (req/s) | done | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | "
        "ITL p50 | ITL p99 | e2e p50 | e2e p99 |"
    )
    lines = [f"## {title}", "", header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r.get('label', '')} | {r.get('rate', '')} | {r['completed']}/{r['requests']} | "
            f"{r['request_throughput']:.2f} | {r['output_tokens_per_s']:.1f} | "
            f"{ms(r['ttft']['p50_ms'])} | {ms(r['ttft']['p99_ms'])} | {ms(r['tpot']['p50_ms'])} | "
            f"{ms(r['tpot']['p99_ms'])} | {ms(r['itl']['p50_ms'])} | {ms(r['itl']['p99_ms'])} | "
            f"{ms(r['e2e']['p50_ms'])} | {ms(r['e2e']['p99_ms'])} |"
        )
    lines += [
        "",
        (
            "Latencies in milliseconds. TTFT: time to first token; TPOT: time per output token after the "
            "first; ITL: gap between streamed chunks; e2e: whole request."
        ),
    ]
    return "\n".join(lines) + "\n"


async def _one(client, endpoint: str, model: str, item: Workload, ignore_eos: bool, headers: dict) -> RequestRecord:
    record = RequestRecord()
    body: dict = {
        "model": model,
        "max_tokens": item.max_tokens,
        "stream": True,
        "temperature": 0.0,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": item.prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = item.prompt
        path = "/v1/completions"
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's (and genforge's) extension: generate exactly max_tokens
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", path, json=body, headers=headers) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    record.error = str(payload["error"].get("message"))[:200]
                    return record
                now = time.perf_counter()
                for choice in payload.get("choices") or []:
                    text = choice.get("text") if endpoint != "chat" else (choice.get("delta") or {}).get("content")
                    if text:
                        chunks += 1
                        if record.ttft is None:
                            record.ttft = now - start
                        else:
                            record.itl.append(now - last)
                        last = now
                usage = payload.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens", 0)
                    record.output_tokens = usage.get("completion_tokens", 0)
        record.e2e = time.perf_counter() - start
        if not record.output_tokens:  # the endpoint sent no usage: count chunks as tokens
            record.output_tokens = chunks
        record.ok = True
    except Exception as err:  # a benchmark records failures and goes on
        record.error = f"{type(err).__name__}: {err}"[:200]
    return record


async def run_rate(
    url: str,
    model: str,
    workload: Sequence[Workload],
    rate: float,
    *,
    endpoint: str = "completions",
    max_concurrency: int | None = None,
    ignore_eos: bool = True,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 600.0,
) -> tuple[list[RequestRecord], float]:
    """Send ``workload`` at Poisson ``rate``; returns one record per request and the run's duration."""
    import httpx2

    offsets = poisson_offsets(len(workload), rate, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connections = max_concurrency or len(workload)
    async with httpx2.AsyncClient(
        base_url=url.rstrip("/"),
        timeout=timeout,
        limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
    ) as client:
        start = time.perf_counter()

        async def launch(offset: float, item: Workload) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            if limit is None:
                return await _one(client, endpoint, model, item, ignore_eos, headers)
            async with limit:
                return await _one(client, endpoint, model, item, ignore_eos, headers)

        records = await asyncio.gather(*(launch(o, w) for o, w in zip(offsets, workload)))
        duration = time.perf_counter() - start
    return list(records), duration


def benchmark_serving(
    url: str,
    *,
    model: str | None = None,
    rates: Sequence[float] = (math.inf,),
    num_requests: int = 64,
    input_len: int = 128,
    output_len: int = 128,
    range_ratio: float = 0.5,
    endpoint: str = "completions",
    max_concurrency: int | None = None,
    ignore_eos: bool = True,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 600.0,
) -> dict:
    """Run the same random workload at each rate; returns ``{"settings", "results"}``."""
    import httpx2

    if endpoint not in ("completions", "chat"):
        raise ValueError(f"endpoint must be 'completions' or 'chat', got {endpoint!r}")
    if model is None:  # the first model the server lists
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            listed = httpx2.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
            listed.raise_for_status()
        except httpx2.HTTPError as err:  # an OSError reaches the CLI as one line, not a traceback
            raise ConnectionError(
                f"cannot list the models of {url} ({err}); is the server running there, and is "
                "the API key right? Or name the model with --model"
            ) from None
        model = listed.json()["data"][0]["id"]
    workload = random_workload(num_requests, input_len, output_len, range_ratio, seed)
    results = []
    for rate in rates:
        records, duration = asyncio.run(
            run_rate(
                url,
                model,
                workload,
                rate,
                endpoint=endpoint,
                max_concurrency=max_concurrency,
                ignore_eos=ignore_eos,
                api_key=api_key,
                seed=seed,
                timeout=timeout,
            )
        )
        summary = summarize(records, duration)
        summary.update(rate="inf" if math.isinf(rate) else rate, label=f"{model} @ {rate:g}/s")
        results.append(summary)
    settings = {
        "url": url,
        "model": model,
        "endpoint": endpoint,
        "num_requests": num_requests,
        "input_len": input_len,
        "output_len": output_len,
        "range_ratio": range_ratio,
        "max_concurrency": max_concurrency,
        "ignore_eos": ignore_eos,
        "seed": seed,
    }
    return {"settings": settings, "results": results}


def record_dict(record: RequestRecord) -> dict:
    return {**asdict(record), "tpot": record.tpot}
