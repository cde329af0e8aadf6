"""`genforge serve` (the OpenAI-compatible server) and `genforge bench serve` (its load test),
registered by `genforge.cli`."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from ..cache import KV_CACHE_DTYPES
from ..console import console


def _named_dirs(values: list[str], flag: str) -> dict[str, str]:
    """`NAME=DIR` or `DIR` (named after the directory) -> {name: dir}, refusing duplicates. DIR
    may be a registry reference, `registry:MODEL@ALIAS` or `registry:MODEL/VERSION` (named MODEL),
    resolved here to the version's directory."""
    from ..ops.registry import is_registry_ref, parse_ref, resolve_model_ref

    named: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep:
            name, directory = Path(value.rstrip("/")).name, value
            if is_registry_ref(value):
                name = parse_ref(value)[0]
        if not name or not directory:
            raise ValueError(f"{flag} takes DIR or NAME=DIR, got {value!r}")
        if name in named:
            raise ValueError(f"{flag}: the name {name!r} is given twice; name them apart with NAME=DIR")
        directory = str(resolve_model_ref(directory))
        if not (Path(directory) / "config.json").is_file():
            raise ValueError(f"{flag} {value}: {directory} is not a model directory (no config.json)")
        named[name] = directory
    return named


def _lora_dirs(values: list[str], models: list[str]) -> dict[str, dict[str, str]]:
    """`--lora [MODEL:]NAME=DIR` values -> {model: {adapter name: dir}}; MODEL may be left out
    when one model is served."""
    from ..ops.registry import resolve_model_ref

    loras: dict[str, dict[str, str]] = {}
    for value in values:
        target, sep, directory = value.partition("=")
        model, colon, name = target.rpartition(":")
        if not sep or not name or not directory:
            raise ValueError(f"--lora takes NAME=DIR or MODEL:NAME=DIR (a PEFT adapter directory), got {value!r}")
        if not colon:
            if len(models) > 1:
                raise ValueError(
                    f"--lora {value}: several models are served ({', '.join(models)}); give MODEL:NAME=DIR"
                )
            model = models[0]
        if model not in models:
            raise ValueError(f"--lora {value}: no served model is named {model!r}; served: {', '.join(models)}")
        if name in loras.get(model, {}):
            raise ValueError(f"--lora: the adapter name {name!r} is given twice for {model!r}")
        directory = str(resolve_model_ref(directory))
        if not (Path(directory) / "adapter_config.json").is_file():
            raise ValueError(f"--lora {value}: {directory} is not a PEFT adapter directory (no adapter_config.json)")
        loras.setdefault(model, {})[name] = directory
    return loras


def _api_keys(args) -> list[str]:
    keys = list(args.api_key)
    keys += [k.strip() for k in os.environ.get("GENFORGE_API_KEYS", "").split(",") if k.strip()]
    return keys


def _rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            rate = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            raise ValueError(f"--rates takes comma-separated requests/s (or inf), got {part!r}") from None
        if not rate > 0:
            raise ValueError(f"--rates values must be > 0, got {part}")
        rates.append(rate)
    return rates


def _guard_config(args):
    """`--guard` and `--guard-config` -> a `GuardConfig` (None: no guards). The file's settings
    come first; `--guard` adds guards to it."""
    if not args.guard and not args.guard_config:
        return None
    from ..safety.guards import GuardConfig

    config = GuardConfig.from_file(args.guard_config) if args.guard_config else GuardConfig()
    if args.guard:
        for name in GuardConfig.from_spec(args.guard).enabled:
            setattr(config, name, True)
    return config


def cmd_serve(args) -> int:
    import uvicorn

    from ..ops.serving import install_from_args
    from .api import app_from_directories
    from .limits import parse_rate_limit
    from .playground import app_options as playground_options

    models = _named_dirs(args.model, "--model")
    loras = _lora_dirs(args.lora, list(models))
    embedders = _named_dirs(args.embedding_model, "--embedding-model")
    rate_limit = parse_rate_limit(args.rate_limit, args.rate_limit_burst) if args.rate_limit else None
    for flag, value in (
        ("--max-queue", args.max_queue),
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-num-batched-tokens", args.max_num_batched_tokens),
        ("--block-size", args.block_size),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    keys = _api_keys(args)
    guards = _guard_config(args)
    engine_options = {
        "block_size": args.block_size,
        "num_blocks": args.num_blocks,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": not args.no_prefix_caching,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    if args.max_model_len is not None:
        engine_options["max_model_len"] = args.max_model_len
    for flag, value in (("--swap-space-gib", args.swap_space_gib), ("--swap-disk-gib", args.swap_disk_gib)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0 GiB, got {value}")
    engine_options["preemption_mode"] = args.preemption_mode
    engine_options["swap_space"] = int(args.swap_space_gib * 2**30)
    engine_options["swap_disk_space"] = int(args.swap_disk_gib * 2**30)
    engine_options["swap_dir"] = args.swap_dir
    if args.resident_kv_mib is not None:
        if args.resident_kv_mib < 0:
            raise ValueError(
                f"--resident-kv-mib must be >= 0 (0 turns resident buffers off), got {args.resident_kv_mib}"
            )
        engine_options["resident_kv_memory"] = int(args.resident_kv_mib * 2**20)
    with console.status(f"loading {', '.join(models)}"):
        app = app_from_directories(
            models,
            loras=loras,
            embedding_models=embedders,
            dtype=args.dtype,
            device=args.device,
            engine_options=engine_options,
            api_keys=keys,
            rate_limit=rate_limit,
            max_queue=args.max_queue,
            request_timeout=args.timeout,
            drain_timeout=args.drain_timeout,
            guards=guards,
            **playground_options(args),
        )
    ops = install_from_args(app, args)  # routing, outcome log, drift monitor (genforge.ops)
    if ops is not None:
        for route in ops.router.routes.values() if ops.router else ():
            console.print(f"route {route.describe()} (sticky per user or key)")
        if ops.monitor is not None:
            console.print(f"drift monitor on: every {args.monitor_every} requests, gauges genforge_drift_*")
    if guards is not None:
        console.print(f"guards on: {', '.join(guards.enabled) or 'none'} (report: x-genforge-guard header)")
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]warning: listening on {args.host} without API keys: anyone who can reach the port "
            "can use the models (--api-key or GENFORGE_API_KEYS)[/yellow]"
        )
    adapters = [f"{model}:{name}" for model, named in loras.items() for name in named]
    console.print(
        f"serving {', '.join([*models, *adapters, *embedders])} on http://{args.host}:{args.port}/v1 "
        f"({'API keys required' if keys else 'no API key needed'}); Ctrl-C or SIGTERM drains and stops"
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout
    )
    return 0


def cmd_bench_serve(args) -> int:
    from ..atomic import atomic_write_text
    from .bench import benchmark_serving, markdown_report

    rates = _rates(args.rates)
    key = args.api_key or next(
        (k.strip() for k in os.environ.get("GENFORGE_API_KEYS", "").split(",") if k.strip()), None
    )
    with console.status(f"benchmarking {args.url} at {args.rates} requests/s"):
        report = benchmark_serving(
            args.url,
            model=args.model,
            rates=rates,
            num_requests=args.num_requests,
            input_len=args.input_len,
            output_len=args.output_len,
            range_ratio=args.range_ratio,
            endpoint=args.endpoint,
            max_concurrency=args.max_concurrency,
            ignore_eos=not args.no_ignore_eos,
            api_key=key,
            seed=args.seed,
            timeout=args.timeout,
        )
    markdown = markdown_report(report["results"], title=f"Serving benchmark: {report['settings']['model']}")
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "serve_bench.json", json.dumps(report, indent=2))
        atomic_write_text(out / "serve_bench.md", markdown)
        console.print(f"[dim]wrote {out / 'serve_bench.json'} and {out / 'serve_bench.md'}[/dim]")
    failed = sum(r["failed"] for r in report["results"])
    if failed:
        errors = {e for r in report["results"] for e in r["errors"]}
        console.print(f"[yellow]{failed} request(s) failed: {'; '.join(sorted(errors))}[/yellow]")
    return 0 if not failed else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge serve` and `bench` to the top-level parser."""
    from ..ops.serving import add_serve_arguments
    from .playground import add_arguments as add_playground_arguments

    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (continuous batching, paged KV cache)",
        description="Serve one or more models over the OpenAI API: /v1/completions, /v1/chat/completions, "
        "/v1/embeddings, /v1/models, /health and Prometheus /metrics (see docs/serving.md).",
    )
    models = serve.add_argument_group("models")
    models.add_argument(
        "--model",
        action="append",
        default=[],
        required=True,
        metavar="[NAME=]DIR",
        help="a causal model directory to serve (repeatable); clients pick it by NAME, default the directory's name",
    )
    models.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="[MODEL:]NAME=DIR",
        help="a PEFT LoRA adapter directory to serve over MODEL (repeatable; MODEL may be left out with one "
        "--model); requests pick it with model='MODEL:NAME' (or NAME, or a 'lora' field), in the same batches "
        "as the base. More load at run time: POST /v1/load_lora_adapter",
    )
    models.add_argument(
        "--embedding-model",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="an encoder (sentence-transformers or BERT directory) for /v1/embeddings (repeatable)",
    )
    models.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16 or auto")
    models.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    net = serve.add_argument_group("network and admission")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this Bearer key (repeatable; also GENFORGE_API_KEYS=k1,k2); none: no auth",
    )
    net.add_argument(
        "--rate-limit",
        default=None,
        metavar="N/UNIT",
        help="per-key token bucket, e.g. 60/min, 5/s, 1000/hour (a bare N is per minute)",
    )
    net.add_argument(
        "--rate-limit-burst",
        type=int,
        default=None,
        help="bucket size: requests allowed at once (default: N of --rate-limit)",
    )
    net.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="sequences in flight (running + waiting) before new requests get 429 (default 256)",
    )
    net.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    net.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on shutdown, seconds to let in-flight requests finish (default 30)",
    )
    net.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    safety = serve.add_argument_group("safety guards (docs/safety.md)")
    safety.add_argument(
        "--guard",
        default=None,
        metavar="GUARDS",
        help="comma-separated guards to turn on: input (prompt-injection scan: 400 on injection), output "
        "(moderation while streaming: stops with finish_reason content_filter), pii (redact PII in outputs and logs)",
    )
    safety.add_argument(
        "--guard-config",
        default=None,
        metavar="FILE",
        help="guard settings as JSON, TOML or YAML: {guards: [...], input: {action: block|flag, threshold}, "
        "output: {action, categories, thresholds}, pii: {style, types, redact_input}, hold_chars}",
    )
    engine = serve.add_argument_group("engine")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    engine.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="KV-cache blocks per model (default: enough for --max-num-seqs full contexts, within 2 GiB)",
    )
    engine.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch at most (default 64)")
    engine.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="token budget per step; longer prompts are prefilled in chunks (default 512)",
    )
    engine.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length served (default and maximum: the model's; a model with dynamic RoPE scaling "
        "defaults to factor x its trained context and may be given more)",
    )
    engine.add_argument(
        "--no-prefix-caching", action="store_true", help="do not share KV blocks between requests with a common prefix"
    )
    engine.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="what the KV cache stores: auto (the model's dtype) or int8 (int8 codes with an fp32 scale per token "
        "and head: ~3.8x the blocks, and concurrent sequences, in the same memory at head_dim 64)",
    )
    engine.add_argument(
        "--resident-kv-mib",
        type=float,
        default=None,
        help="memory for contiguous per-sequence copies of running sequences' keys and values, "
        "so decode steps read them without gathering blocks; grown as the batch needs and "
        "kept once grown (default: as much as the block pool; 0 turns them off and gathers "
        "blocks every step)",
    )
    engine.add_argument(
        "--preemption-mode",
        choices=("auto", "swap", "recompute"),
        default="auto",
        help="what a preempted sequence does: recompute (free its KV blocks, prefill again on resume), swap (copy "
        "them to host memory and back) or auto (swap when the measured copy costs less than the prefill it "
        "saves; default)",
    )
    engine.add_argument(
        "--swap-space-gib",
        type=float,
        default=4.0,
        help="host memory per model for swapped KV blocks (pinned on a GPU; default 4)",
    )
    engine.add_argument(
        "--swap-disk-gib",
        type=float,
        default=0.0,
        help="disk per model for swapped KV blocks when the host swap space is full (default 0: recompute instead)",
    )
    engine.add_argument(
        "--swap-dir", default=None, help="directory for KV blocks spilled to disk (default: a temporary directory)"
    )
    add_serve_arguments(serve)  # --route, --outcome-log, --monitor*: genforge.ops
    add_playground_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks", description="Benchmark commands.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    load = bench_sub.add_parser(
        "serve",
        help="load-test an OpenAI-compatible endpoint",
        description="Poisson arrivals at each rate, random prompt and output lengths, streamed requests; reports "
        "TTFT, TPOT, ITL and e2e latency (p50/p99), request throughput and output tokens/s as Markdown "
        "(and JSON with --out).",
    )
    load.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    load.add_argument("--model", default=None, help="model name (default: the first /v1/models lists)")
    load.add_argument("--rates", default="inf", help="comma-separated requests/s, inf = all at once (default inf)")
    load.add_argument("--num-requests", type=int, default=64, help="requests per rate (default 64)")
    load.add_argument("--input-len", type=int, default=128, help="mean prompt length in words (~tokens)")
    load.add_argument("--output-len", type=int, default=128, help="mean max_tokens per request")
    load.add_argument(
        "--range-ratio", type=float, default=0.5, help="lengths are uniform in mean x [1 - r, 1 + r] (default 0.5)"
    )
    load.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    load.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos (for servers that refuse vLLM's extensions)",
    )
    load.add_argument("--api-key", default=None, help="Bearer key (default: the first of GENFORGE_API_KEYS)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    load.add_argument("--out", default=None, help="directory for serve_bench.json and serve_bench.md")
    load.set_defaults(func=cmd_bench_serve)
