"""Tool calling through genforge serve: valid calls under `tool_choice="required"`, and what the
constrained decoding costs per generated token.

A random Llama over a byte-level BPE tokenizer trained here on the Python standard library
(32k tokens by default: the size of the token mask matters, not the weights), with a
Hermes/Qwen-style chat template, is served by `genforge serve`'s app in a child process
(uvicorn; the client's parsing does not share the server's interpreter). The official `openai`
client sends `--requests` chat requests, `--concurrency` at a time, each offering three tools
(small schemas: a bounded string and an enum, two bounded integers, a boolean, an array and a
nested `$ref` object), streamed with `logprobs` on so that every generated token arrives as
its own chunk and is timed:

- tools: `tool_choice="required"`, `parallel_tool_calls=false`, temperature 1, one seed per
  request. A request is valid when it ends with `finish_reason: "tool_calls"` and its one call
  (the streamed deltas joined) parses and validates against its function's schema (jsonschema).
- baseline: the same requests (the same prompts, tools rendered in them) with
  `tool_choice="none"`, no constraint, `ignore_eos` and `max_tokens` set to the number of tokens
  the tools run generated for that request: the same work, without the grammar.

Time per output token (TPOT) of a request: from its first generated token to its last, per
token; the medians of the two runs give the overhead, `TPOT_tools / TPOT_baseline - 1`. The
rounds alternate which run goes first. The server also times, from inside the engine, each
step's logits processing (`Engine._process`: in the tools run the grammar masks and the per-row
path constrained rows take) and the grammar processor alone (`GrammarConstraint.__call__`): the
extra processing per step over the baseline's TPOT is the overhead seen without the noise of
the rest of the step. The machine is shared with other jobs while this runs: read the ratios of one
round, measured minutes apart, rather than absolute times.

    python benchmarks/tools.py                           # 48 requests, 16 at a time, 2 rounds
    python benchmarks/tools.py --requests 96 --rounds 3 --hidden 768 --layers 12

Writes benchmarks/results/tools.json and tools.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from machine import describe, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "tools-bench"

TEMPLATE = """\
{%- if tools %}<|im_start|>system
You can call these functions:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one by writing <tool_call>
{"name": <name>, "arguments": <object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -999, "maximum": 999},
                    "b": {"type": "integer", "minimum": -999, "maximum": 999},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_lights",
            "description": "Switch the lights of some rooms.",
            "parameters": {
                "type": "object",
                "properties": {
                    "on": {"type": "boolean"},
                    "rooms": {"type": "array", "items": {"enum": ["hall", "kitchen", "attic"]}, "maxItems": 3},
                    "where": {"$ref": "#/$defs/Place"},
                },
                "required": ["on", "where"],
                "additionalProperties": False,
                "$defs": {
                    "Place": {
                        "type": "object",
                        "properties": {"floor": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["floor"],
                        "additionalProperties": False,
                    }
                },
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = [
    "Is it raining in Lisbon?",
    "What is 17 plus 25?",
    "Turn on the kitchen lights, please.",
    "How cold is it in Oslo, in fahrenheit?",
    "Add -4 and 90.",
    "Switch off every light on the second floor.",
    "Weather in Kyoto tomorrow?",
    "Lights on in the hall and the attic.",
]


# ------------------------------------------------------------------------------ model and server


def build_model_dir(directory: Path, args) -> Path:
    """A byte-level BPE of ``args.vocab`` tokens trained on the standard library, the call tags as
    added tokens (as Qwen2.5 has them), and a random Llama over it."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    from genforge.checkpoint import save_model
    from genforge.config import Config
    from genforge.model import Transformer
    from genforge.quickstart import stdlib_source_files
    from genforge.tokenizer import Tokenizer

    texts = [p.read_text(encoding="utf-8", errors="ignore") for p in stdlib_source_files(3_000_000)]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        special_tokens=["<|im_end|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in ("<tool_call>", "</tool_call>")])
    tokenizer = Tokenizer(backend, {"eos_token": "<|im_end|>", "chat_template": TEMPLATE})
    config = Config(
        family="llama",
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128),
        intermediate_size=int(args.hidden * 2.75) // 16 * 16,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    return save_model(Transformer(config), directory / "model", tokenizer=tokenizer)


def _serve(model_dir: str, port: int, concurrency: int) -> None:
    """The server process: genforge's app over the model, the grammar processor timed."""
    import uvicorn

    from genforge.generate.constrained import GrammarConstraint
    from genforge.serve.api import app_from_directories
    from genforge.serve.engine import Engine

    spent = {"seconds": 0.0, "rows": 0, "processing_seconds": 0.0, "steps": 0}
    call, process = GrammarConstraint.__call__, Engine._process

    def timed_grammar(self, logits, ctx):
        start = time.perf_counter()
        try:
            return call(self, logits, ctx)
        finally:
            spent["seconds"] += time.perf_counter() - start
            spent["rows"] += logits.shape[0]

    def timed_processing(self, raw, seqs, states):
        # A step's logits processing, every row: the grammar, and the per-row path it puts its rows on.
        start = time.perf_counter()
        try:
            return process(self, raw, seqs, states)
        finally:
            spent["processing_seconds"] += time.perf_counter() - start
            spent["steps"] += 1

    GrammarConstraint.__call__, Engine._process = timed_grammar, timed_processing
    app = app_from_directories(
        {MODEL: model_dir},
        engine_options={"max_num_seqs": concurrency, "max_num_batched_tokens": 2048},
        max_queue=None,
        request_timeout=None,
    )

    @app.get("/bench/constraint")
    async def constraint_time():
        return dict(spent)

    @app.post("/bench/constraint/reset")
    async def reset_constraint_time():
        spent.update(seconds=0.0, rows=0, processing_seconds=0.0, steps=0)
        return dict(spent)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, process, timeout: float = 300.0) -> None:
    import httpx2

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError("the server process exited during start-up")
        try:
            if httpx2.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


# -------------------------------------------------------------------------------------- requests


@dataclass
class Record:
    """One streamed request: when each generated token arrived, and what came back."""

    token_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    calls: dict[int, dict] = field(default_factory=dict)
    content: str = ""

    def tpot(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    def valid(self) -> bool:
        if self.finish_reason != "tool_calls" or len(self.calls) != 1:
            return False
        import jsonschema

        call = self.calls[0]
        if call["name"] not in SCHEMAS:
            return False
        try:
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True


async def _one(client, index: int, mode: str, max_tokens: int) -> Record:
    extra = {"tool_choice": "required", "parallel_tool_calls": False}
    if mode == "baseline":
        extra = {"tool_choice": "none", "extra_body": {"ignore_eos": True}}
    record = Record()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        tools=TOOLS,
        max_tokens=max_tokens,
        temperature=1.0,
        seed=index,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        **extra,
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            record.completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                record.token_times.extend([now] * len(choice.logprobs.content))
            if choice.finish_reason:
                record.finish_reason = choice.finish_reason
            if choice.delta.content:
                record.content += choice.delta.content
            for delta in choice.delta.tool_calls or []:
                call = record.calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    return record


async def run_requests(url: str, mode: str, lengths: list[int], concurrency: int) -> tuple[list[Record], float]:
    """All requests, ``concurrency`` in flight; ``lengths``: each request's max_tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def limited(i):
        async with gate:
            return await _one(client, i, mode, lengths[i])

    start = time.perf_counter()
    records = await asyncio.gather(*(limited(i) for i in range(len(lengths))))
    wall = time.perf_counter() - start
    await client.close()
    return list(records), wall


def summarize(records: list[Record], wall: float) -> dict:
    tpots = [t for t in (r.tpot() for r in records) if t is not None]
    tokens = sum(r.completion_tokens for r in records)
    return {
        "requests": len(records),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1),
        "tpot_ms_median": round(1000 * statistics.median(tpots), 3),
        "tpot_ms_mean": round(1000 * statistics.fmean(tpots), 3),
    }


# ------------------------------------------------------------------------------------------- main


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# Tool calling through genforge serve",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_capability']}), {machine['cores']} cores, "
        f"{results['server_threads']} torch threads in the server; torch {machine['torch']}, "
        f"llguidance {machine['llguidance']}. Shared with other jobs while it ran: one run, noisy numbers.",
        "",
        f"Model: {results['model']}. Workload: {results['workload']}.",
        "",
        f'Valid calls with `tool_choice="required"`: **{results["valid_calls"]} of {results["tool_requests"]}** '
        f"({100 * results['valid_rate']:.1f}%).",
        "",
        "| round | run | output tokens | wall s | tokens/s | TPOT median ms | TPOT mean ms | logits processing "
        "ms/step | overhead: TPOT | overhead: processing |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for number, round_ in enumerate(results["rounds"], 1):
        for name in round_["order"]:
            run = round_[name]
            overhead = f"{100 * round_['overhead']:+.1f}%" if name == "tools" else ""
            processing = f"{100 * round_['processing_overhead']:+.1f}%" if name == "tools" else ""
            lines.append(
                f"| {number} | {name} | {run['output_tokens']} | {run['wall_s']} | {run['output_tokens_per_s']} | "
                f"{run['tpot_ms_median']} | {run['tpot_ms_mean']} | {run['processing_ms_per_step']} | {overhead} | "
                f"{processing} |"
            )
    grammar = results["grammar"]
    lines += [
        "",
        "Constrained-decoding overhead per token, as a share of the baseline's decode time per token (its median "
        "TPOT), median over rounds (goal: at most +15%):",
        "",
        f"- end to end, the tools run's median TPOT against the baseline's: **{100 * results['overhead_median']:+.1f}%** "
        "(the load of the shared machine moves this by more than the effect itself);",
        "- inside the step, the extra logits-processing time per step (the grammar masks, and the per-row path "
        f"constrained rows take): **{100 * results['processing_overhead_median']:+.1f}%**.",
        "",
        f"The grammar processor alone (llguidance's mask and applying it), timed in the server: "
        f"{grammar['us_per_token']} µs per constrained token, {grammar['rows']} rows in all; with "
        f"{results['concurrency']} rows in a step that is {grammar['share_of_baseline_tpot']:.1%} of the baseline's "
        "median TPOT.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    import llguidance

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp), args)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(str(model_dir), port, args.concurrency), daemon=True
        )
        process.start()
        try:
            _wait_until_up(url, process)
            vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
            results = measure(url, args)
        finally:
            process.terminate()
            process.join(30)
    results = {
        "machine": describe(llguidance=llguidance.__version__)
        | {"cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "server_threads": torch.get_num_threads(),
        "model": f"random Llama, hidden {args.hidden}, {args.layers} layers, vocabulary {vocab} (byte-level BPE "
        "trained on the standard library), Hermes/Qwen-style template",
        "workload": f"{args.requests} chat requests, {args.concurrency} at a time, 3 tools offered, temperature 1, "
        f"max_tokens {args.max_tokens}, streamed with logprobs",
        "concurrency": args.concurrency,
        **results,
    }
    print(json.dumps(results, indent=2))
    write_results(args.out, "tools", results, markdown(results))
    return 0


def measure(url: str, args) -> dict:
    import httpx2

    # Warm-up: the allocator, oneDNN's primitive caches, llguidance's token trie, the prefix cache.
    warm = [args.max_tokens] * min(args.requests, args.concurrency)
    asyncio.run(run_requests(url, "tools", warm, args.concurrency))
    asyncio.run(run_requests(url, "baseline", [16] * len(warm), args.concurrency))

    rounds, lengths, valid = [], None, None
    for number in range(args.rounds):
        order = ["tools", "baseline"] if number % 2 == 0 else ["baseline", "tools"]
        round_: dict = {"order": order}
        for name in order:
            httpx2.post(url + "/bench/constraint/reset", timeout=10)
            if name == "tools":
                records, wall = asyncio.run(
                    run_requests(url, "tools", [args.max_tokens] * args.requests, args.concurrency)
                )
                if lengths is None:
                    lengths = [max(2, r.completion_tokens) for r in records]
                    valid = sum(r.valid() for r in records)
            else:
                records, wall = asyncio.run(run_requests(url, "baseline", lengths, args.concurrency))
            timers = httpx2.get(url + "/bench/constraint", timeout=10).json()
            if name == "tools":
                round_["grammar"] = {"seconds": timers["seconds"], "rows": timers["rows"]}
            round_[name] = summarize(records, wall)
            round_[name]["processing_ms_per_step"] = round(
                1000 * timers["processing_seconds"] / max(1, timers["steps"]), 3
            )
            print(f"round {number + 1} {name}: {round_[name]}", file=sys.stderr)
        round_["overhead"] = round_["tools"]["tpot_ms_median"] / round_["baseline"]["tpot_ms_median"] - 1
        # The same cost seen from inside the step: the extra logits processing per step.
        extra = round_["tools"]["processing_ms_per_step"] - round_["baseline"]["processing_ms_per_step"]
        round_["processing_overhead"] = extra / round_["baseline"]["tpot_ms_median"]
        rounds.append(round_)
    grammar_seconds = sum(r["grammar"]["seconds"] for r in rounds)
    grammar_rows = sum(r["grammar"]["rows"] for r in rounds)
    baseline_tpot = statistics.median(r["baseline"]["tpot_ms_median"] for r in rounds)
    us_per_token = 1e6 * grammar_seconds / max(1, grammar_rows)
    return {
        "tool_requests": args.requests,
        "valid_calls": valid,
        "valid_rate": valid / args.requests,
        "rounds": rounds,
        "overhead_median": statistics.median(r["overhead"] for r in rounds),
        "processing_overhead_median": statistics.median(r["processing_overhead"] for r in rounds),
        "grammar": {
            "seconds": round(grammar_seconds, 3),
            "rows": grammar_rows,
            "us_per_token": round(us_per_token, 1),
            "share_of_baseline_tpot": args.concurrency * us_per_token / 1000 / baseline_tpot,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
