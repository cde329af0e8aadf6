"""Prometheus metrics of the server, in the exposition format ``prometheus_client`` writes.

Two kinds of numbers:

- state read from the engine at scrape time (``AsyncEngine.stats``): running and waiting
  requests, KV-cache blocks in use, prefix-cache queries and hits, preemptions, and the
  engine's own prompt and generation token totals, swap preemptions and bytes swapped, and
  the engine's step time and computed tokens per phase (prefill, decode, recompute, swap,
  schedule: `phases.py`) with the latest step's share of each. A custom collector reads them when
  Prometheus scrapes, so they are never stale and cost nothing between scrapes;
- latency distributions observed by the API from each request's ``RequestOutput``
  timestamps: time to first token (TTFT), time per output token after the first (TPOT),
  and end-to-end latency, the three numbers serving papers and vLLM's benchmark report.

Every app gets its own ``CollectorRegistry``, so several servers in one process (tests)
do not clash on metric names.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST", "route_label"]

# Seconds. TTFT and e2e span a few milliseconds (tiny models, cached prefixes) to minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Reads ``engine.stats(model)`` for every served model when scraped."""

    def __init__(self, engine, models) -> None:
        self.engine = engine
        self.models = list(models)

    def describe(self):
        return []  # the metrics are dynamic; an empty describe keeps registration from calling collect early

    def collect(self):
        gauges = {
            "running": GaugeMetricFamily(
                "genforge_requests_running", "Sequences in the running batch", labels=["model"]
            ),
            "waiting": GaugeMetricFamily(
                "genforge_requests_waiting", "Sequences waiting for KV-cache blocks", labels=["model"]
            ),
            "used": GaugeMetricFamily("genforge_kv_cache_blocks_used", "KV-cache blocks in use", labels=["model"]),
            "total": GaugeMetricFamily("genforge_kv_cache_blocks_total", "KV-cache blocks", labels=["model"]),
            "usage": GaugeMetricFamily(
                "genforge_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", labels=["model"]
            ),
            "hit_rate": GaugeMetricFamily(
                "genforge_prefix_cache_hit_rate",
                "Prefix-cache hits over queries since start, in blocks",
                labels=["model"],
            ),
        }
        counters = {
            "queries": CounterMetricFamily(
                "genforge_prefix_cache_queries", "Prefix-cache block lookups", labels=["model"]
            ),
            "hits": CounterMetricFamily("genforge_prefix_cache_hits", "Prefix-cache block hits", labels=["model"]),
            "preemptions": CounterMetricFamily(
                "genforge_preemptions", "Sequences preempted for lack of blocks", labels=["model"]
            ),
            "prompt": CounterMetricFamily("genforge_prompt_tokens", "Prompt tokens processed", labels=["model"]),
            "generation": CounterMetricFamily("genforge_generation_tokens", "Tokens generated", labels=["model"]),
            "swapped": CounterMetricFamily(
                "genforge_preemptions_swapped",
                "Preemptions that swapped KV blocks out instead of recomputing",
                labels=["model"],
            ),
            "swap_bytes": CounterMetricFamily(
                "genforge_kv_swap_bytes",
                "KV-cache bytes swapped, by direction (out, in)",
                labels=["model", "direction"],
            ),
            "spills": CounterMetricFamily(
                "genforge_kv_swap_disk_spills", "Swapped sequences written to disk", labels=["model"]
            ),
            "phase_seconds": CounterMetricFamily(
                "genforge_engine_phase_seconds",
                "Engine step time by phase (prefill, decode, recompute, swap, schedule)",
                labels=["model", "phase"],
            ),
            "phase_tokens": CounterMetricFamily(
                "genforge_engine_phase_tokens",
                "Token positions the engine computed, by phase (prefill, decode, recompute)",
                labels=["model", "phase"],
            ),
            "step_seconds": CounterMetricFamily("genforge_engine_step_seconds", "Engine step time", labels=["model"]),
            "steps": CounterMetricFamily("genforge_engine_steps", "Engine steps that ran the model", labels=["model"]),
            "mixed_steps": CounterMetricFamily(
                "genforge_engine_mixed_steps", "Steps computing prompt tokens and decodes together", labels=["model"]
            ),
        }
        gauges["share"] = GaugeMetricFamily(
            "genforge_engine_last_step_phase_share",
            "Share of the latest step's time by phase",
            labels=["model", "phase"],
        )
        for model in self.models:
            s = self.engine.stats(model)
            gauges["running"].add_metric([model], s.running)
            gauges["waiting"].add_metric([model], s.waiting)
            gauges["used"].add_metric([model], s.kv_blocks_used)
            gauges["total"].add_metric([model], s.kv_blocks_total)
            gauges["usage"].add_metric([model], s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
            queries = s.prefix_cache_queries
            gauges["hit_rate"].add_metric([model], s.prefix_cache_hits / queries if queries else 0.0)
            counters["queries"].add_metric([model], queries)
            counters["hits"].add_metric([model], s.prefix_cache_hits)
            counters["preemptions"].add_metric([model], s.preemptions)
            counters["prompt"].add_metric([model], s.prompt_tokens_total)
            counters["generation"].add_metric([model], s.generation_tokens_total)
            counters["swapped"].add_metric([model], s.swap_preemptions)
            if s.swap is not None:
                counters["swap_bytes"].add_metric([model, "out"], s.swap.bytes_out)
                counters["swap_bytes"].add_metric([model, "in"], s.swap.bytes_in)
                counters["spills"].add_metric([model], s.swap.spilled)
            if s.phases is not None:
                for phase, seconds in s.phases.seconds.items():
                    counters["phase_seconds"].add_metric([model, phase], seconds)
                    gauges["share"].add_metric([model, phase], s.phases.last_step_share[phase])
                for phase, tokens in s.phases.tokens.items():
                    counters["phase_tokens"].add_metric([model, phase], tokens)
                counters["step_seconds"].add_metric([model], s.phases.step_seconds)
                counters["steps"].add_metric([model], s.phases.steps)
                counters["mixed_steps"].add_metric([model], s.phases.mixed_steps)
        yield from gauges.values()
        yield from counters.values()


class ServerMetrics:
    """The metrics of one app: engine state plus the API's latency histograms and counters."""

    def __init__(self, engine=None, models=(), registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Called as listener(model, output) for each finished sequence, in the request's own
        # context (genforge.ops reads per-request outcomes this way).
        self.finish_listeners: list = []
        if engine is not None:
            self.registry.register(_EngineCollector(engine, models))
        self.ttft = Histogram(
            "genforge_time_to_first_token_seconds",
            "Arrival to first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "genforge_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "genforge_e2e_request_latency_seconds",
            "Arrival to the last token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "genforge_requests_finished",
            "Finished sequences by finish reason",
            ["model", "finish_reason"],
            registry=self.registry,
        )
        self.request_prompt_tokens = Counter(
            "genforge_request_prompt_tokens", "Prompt tokens of finished sequences", ["model"], registry=self.registry
        )
        self.request_generation_tokens = Counter(
            "genforge_request_generation_tokens",
            "Generated tokens of finished sequences",
            ["model"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "genforge_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.queue = Gauge(
            "genforge_api_sequences_in_flight",
            "Sequences admitted by the API and not yet finished",
            registry=self.registry,
        )

    def observe_finished(self, model: str, output, finish_time: float | None = None) -> None:
        """Record a sequence's latencies from its last ``RequestOutput`` (``finished`` set)."""
        finish_time = time.monotonic() if finish_time is None else finish_time
        self.e2e.labels(model).observe(max(0.0, finish_time - output.arrival_time))
        if output.first_token_time is not None:
            self.ttft.labels(model).observe(max(0.0, output.first_token_time - output.arrival_time))
            if output.completion_tokens > 1:
                per_token = (finish_time - output.first_token_time) / (output.completion_tokens - 1)
                self.tpot.labels(model).observe(max(0.0, per_token))
        self.finished.labels(model, output.finish_reason or "unknown").inc()
        self.request_prompt_tokens.labels(model).inc(output.prompt_tokens)
        self.request_generation_tokens.labels(model).inc(output.completion_tokens)
        for listener in self.finish_listeners:
            listener(model, output)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_label(request) -> str:
    """The route template a request matched (``/v1/models/{model_id}``), for metric labels: raw
    paths would give every probed URL its own time series."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"
