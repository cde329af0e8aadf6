"""Serving benchmark: genforge's engine against static batching and one-at-a-time serving.

Modelled on vLLM's serving benchmark with its "random" dataset: requests arrive as a
Poisson process at each rate (inf = all at once), at most `--max-concurrency` in flight;
prompt and output lengths are drawn uniformly in len * [1 - range_ratio, 1 + range_ratio];
outputs run to their drawn length (no early EOS), so every system does the same work.
Three systems run on the same model weights and the same workload, in this process:

- genforge: the continuous-batching engine over the paged KV cache (`genforge.serve.Engine`);
- static: transformers `generate`, padded batches of whatever requests are waiting (up to
  the concurrency), each batch run to its longest output before the next starts;
- sequential: transformers `generate` on one request at a time.

Reported per system and rate: time to first token (TTFT), time per output token after the
first (TPOT), inter-token latency (ITL) and end-to-end latency, p50 and p99; request
throughput and output tokens/s. Static batching's tokens are timed as it produces them
(a logits processor records each step), which flatters it: a real static server answers
only when the batch ends.

With every request waiting at once (rate inf), genforge serves the workload once more,
untimed, with its two kernels (attention through SDPA, and the packed linear layers) timed:
a run made of those kernels alone bounds what any engine built on them could reach, and the
report gives that ceiling as a multiple of static batching's median run.

Before any timing, each system serves a warm-up workload (other prompts, all at once), as
a server that has been running would have: allocator, oneDNN primitive caches and, for
genforge, the engine's resident key/value buffers are warm. genforge gets a fresh engine per
rate, warmed the same way, so its prefix cache never holds a timed prompt.

    python benchmarks/serve.py                      # default: a random 4-layer Llama
    python benchmarks/serve.py --model DIR --num-requests 200 --rates 2,8,inf
    python benchmarks/serve.py --profile-step --threads 1   # where one 32-row decode step goes
    python benchmarks/serve.py --kv-budget-mib 16 --max-concurrency 64 --num-requests 64

`--kv-budget-mib` runs, instead, genforge's engine alone at one KV-cache memory budget with an
fp32 and with an int8 KV cache (`kv_cache_dtype`), all requests waiting at once, alternating
the two `--repeats` times: the blocks the budget buys, the most sequences running in one step,
preemptions and output tokens/s (results/serve_kv_int8.json and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from machine import describe, write_results

from genforge.serve.bench import RequestRecord, markdown_report, poisson_offsets, summarize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Workload:
    arrivals: list[float]  # seconds after the start
    prompts: list[list[int]]
    output_lengths: list[int]


@dataclass
class Trace:
    """Per request: arrival and the time each output token appeared (seconds from start)."""

    arrival: list[float]
    token_times: list[list[float]] = field(default_factory=list)
    max_running: int = 0  # genforge: the most sequences that ran in one step


def make_workload(
    num: int, rate: float, input_len: int, output_len: int, range_ratio: float, vocab: int, seed: int
) -> Workload:
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return rng.randint(max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio))))

    prompts = [[rng.randrange(vocab) for _ in range(length(input_len))] for _ in range(num)]
    return Workload(poisson_offsets(num, rate, seed), prompts, [length(output_len) for _ in range(num)])


# ------------------------------------------------------------------------------ systems
def warmed_engine(
    model,
    warmup: Workload,
    max_concurrency: int,
    token_budget: int,
    resident_kv_memory: int | None = None,
    **engine_options,
):
    """A new engine that has served `warmup` (untimed); `engine_options` go to `Engine`."""
    from genforge.serve.engine import Engine

    engine = Engine(
        model,
        None,
        max_num_seqs=max_concurrency,
        max_num_batched_tokens=token_budget,
        eos_token_ids=[],
        resident_kv_memory=resident_kv_memory,
        **engine_options,
    )
    run_genforge(engine, warmup, max_concurrency)
    return engine


def run_genforge(engine, workload: Workload, max_concurrency: int) -> Trace:
    from genforge.generate.sampling import SamplingParams
    from genforge.serve.engine import Request

    trace = Trace(list(workload.arrivals), [[] for _ in workload.prompts])
    pending = list(range(len(workload.prompts)))
    in_flight = 0
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and workload.arrivals[pending[0]] <= now and in_flight < max_concurrency:
            i = pending.pop(0)
            params = SamplingParams(temperature=0, max_new_tokens=workload.output_lengths[i])
            engine.add_request(Request(str(i), workload.prompts[i], params))
            in_flight += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, workload.arrivals[pending[0]] - now))
            continue
        outputs = engine.step()
        stamp = time.perf_counter() - start
        ran = len(engine.scheduler.running) + sum(out.finished for out in outputs)
        trace.max_running = max(trace.max_running, ran)
        for out in outputs:
            trace.token_times[int(out.request_id)].extend([stamp] * len(out.token_ids))
            in_flight -= out.finished
    return trace


class _StepClock:
    """A transformers logits processor that only records when each decoding step happens."""

    def __init__(self, start: float) -> None:
        self.start, self.times = start, []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter() - self.start)
        return scores


def _hf_generate(model, prompts: list[list[int]], new_tokens: int, clock: _StepClock) -> None:
    from transformers import LogitsProcessorList

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0,
            eos_token_id=None,
        )


def run_static(hf_model, workload: Workload, max_batch: int) -> Trace:
    """Padded batches of the waiting requests, each run to its longest output."""
    trace = Trace(list(workload.arrivals), [[] for _ in workload.prompts])
    pending = list(range(len(workload.prompts)))
    start = time.perf_counter()
    while pending:
        now = time.perf_counter() - start
        if workload.arrivals[pending[0]] > now:
            time.sleep(workload.arrivals[pending[0]] - now)
            now = time.perf_counter() - start
        batch = [i for i in pending if workload.arrivals[i] <= now][:max_batch]
        pending = [i for i in pending if i not in batch]
        clock = _StepClock(start)
        _hf_generate(
            hf_model, [workload.prompts[i] for i in batch], max(workload.output_lengths[i] for i in batch), clock
        )
        for i in batch:
            trace.token_times[i] = clock.times[: workload.output_lengths[i]]
    return trace


def run_sequential(hf_model, workload: Workload) -> Trace:
    return run_static(hf_model, workload, max_batch=1)


# --------------------------------------------------------------------------- profiling
@contextmanager
def timed_calls(targets, clock=time.perf_counter):
    """Wrap each (owner, attribute, part) of `targets` so that its calls add their duration
    (by `clock`) to the yielded dict under `part`; the originals are put back on exit."""
    spent: dict[str, float] = {}
    restore = []
    for owner, name, part in targets:
        original = getattr(owner, name)

        def wrapper(*args, _original=original, _part=part, **kwargs):
            start = clock()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_part] = spent.get(_part, 0.0) + clock() - start

        restore.append((owner, name, original))
        setattr(owner, name, wrapper)
    try:
        yield spent
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


def kernel_seconds(model, workload: Workload, warmup: Workload, args) -> dict[str, float]:
    """Seconds that a genforge run of `workload` spends inside its two kernels: attention
    (SDPA) and the packed linear layers, from an extra, untimed run with both wrapped.

    Every output token must attend over its context and pass through every layer whatever
    the schedule (another schedule cuts the same work into other calls), so with the requests
    all waiting at once this is close to a floor for any engine built on these kernels.
    """
    import torch.nn.functional as F

    from genforge.inference import PackedLinear

    engine = warmed_engine(model, warmup, args.max_concurrency, args.token_budget, args.resident_kv_memory)
    targets = [(F, "scaled_dot_product_attention", "attention"), (PackedLinear, "forward", "linear layers")]
    with timed_calls(targets) as spent:
        start = time.perf_counter()
        run_genforge(engine, workload, args.max_concurrency)
        whole = time.perf_counter() - start
    kernels = spent.get("attention", 0.0) + spent.get("linear layers", 0.0)
    return {
        **{part: round(seconds, 3) for part, seconds in spent.items()},
        "kernels alone": round(kernels, 3),
        "whole run": round(whole, 3),
    }


def profile_step(model, num_rows: int, steps: int, resident_kv_memory: int | None, seed: int) -> dict[str, float]:
    """Thread CPU milliseconds per decode step, by part, with `num_rows` running decodes.

    Requests with prompts of 13-243 tokens are prefilled, then decode 100 steps before the
    measured ones. Each part is timed by wrapping the function that does it (the engine's
    scheduler, cache views and sampling; the model's mask building; SDPA; the gather of
    blocks; the packed linear layers), so the parts are exclusive of each other except that
    "model forward" contains the model's parts; "other model ops" is what remains of it.
    """
    import torch.nn.functional as F

    from genforge.generate.sampling import SamplingParams
    from genforge.inference import PackedLinear
    from genforge.model import Transformer
    from genforge.serve.engine import Engine, Request
    from genforge.serve.paged_cache import PagedBatch

    rng = random.Random(seed)
    engine = Engine(
        model,
        None,
        max_num_seqs=num_rows,
        max_num_batched_tokens=512,
        eos_token_ids=[],
        resident_kv_memory=resident_kv_memory,
    )
    for i in range(num_rows):
        prompt = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(13, 243))]
        engine.add_request(Request(str(i), prompt, SamplingParams(temperature=0, max_new_tokens=100 + 2 * steps)))
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(100):
        engine.step()

    targets = [
        (engine.scheduler, "schedule", "scheduler"),
        (engine.cache, "batch", "cache view"),
        (engine, "_sample", "sampling and outputs"),
        (Transformer, "_masks", "attention mask"),
        (F, "scaled_dot_product_attention", "attention (SDPA)"),
        (PagedBatch, "_gather", "gather"),
        (PackedLinear, "forward", "linear layers"),
        (Transformer, "forward", "model forward"),
    ]
    if engine.resident is not None:
        targets.append((engine.resident, "batch", "cache view"))
    with timed_calls(targets, time.thread_time) as spent:
        start = time.thread_time()
        for _ in range(steps):
            engine.step()
        total = time.thread_time() - start
    per_step = {part: 1e3 * seconds / steps for part, seconds in spent.items()}
    inside = sum(per_step.get(p, 0.0) for p in ("attention (SDPA)", "gather", "linear layers", "attention mask"))
    per_step["other model ops"] = per_step.pop("model forward", 0.0) - inside
    per_step["whole step"] = 1e3 * total / steps
    return per_step


# ------------------------------------------------------------------ KV cache dtype
def kv_cache_dtype_comparison(model, args) -> dict:
    """genforge at one KV memory budget with an fp32 and with an int8 KV cache: the same
    all-at-once workload, each cache `args.repeats` times, alternating; a fresh engine per run,
    warmed on other prompts. Per cache: blocks, the most sequences running in one step,
    preemptions, and the run with the median output tokens/s."""
    from genforge.serve.paged_cache import PagedKVCache

    budget = int(args.kv_budget_mib * 2**20)
    config = model.config
    lengths = (args.input_len, args.output_len, args.range_ratio, config.vocab_size)
    workload = make_workload(args.num_requests, float("inf"), *lengths, args.seed)
    warmup = make_workload(args.max_concurrency, float("inf"), *lengths, args.seed + 1)
    # The engine keeps room for one sequence of max_model_len, which at the model's own context
    # (2048 for the default model: 16 MiB in fp32) could be the whole budget: serve the
    # workload's longest instead.
    longest = max(len(p) + n for w in (workload, warmup) for p, n in zip(w.prompts, w.output_lengths))
    runs: dict[str, list[dict]] = {"auto": [], "int8": []}
    for repeat in range(args.repeats):
        for kv_cache_dtype in ("auto", "int8") if repeat % 2 == 0 else ("int8", "auto"):
            engine = warmed_engine(
                model,
                warmup,
                args.max_concurrency,
                args.token_budget,
                args.resident_kv_memory,
                kv_cache_memory=budget,
                kv_cache_dtype=kv_cache_dtype,
                max_model_len=longest,
            )
            preempted = engine.scheduler.num_preemptions
            trace = run_genforge(engine, workload, args.max_concurrency)
            summary = summarize_trace(trace, workload)
            summary |= {
                "kv_blocks": engine.blocks.num_blocks,
                "bytes_per_block": PagedKVCache.bytes_per_block(
                    config, engine.blocks.block_size, model.dtype, kv_cache_dtype
                ),
                "max_running": trace.max_running,
                "preemptions": engine.scheduler.num_preemptions - preempted,
            }
            runs[kv_cache_dtype].append(summary)
            print(
                f"kv {kv_cache_dtype:>4} repeat {repeat + 1}: {summary['kv_blocks']} blocks, "
                f"{trace.max_running} running at most, {summary['preemptions']} preemptions, "
                f"{summary['output_tokens_per_s']:7.1f} output tok/s",
                flush=True,
            )
    chosen = {}
    for name, summaries in runs.items():
        median = sorted(summaries, key=lambda r: r["output_tokens_per_s"])[(len(summaries) - 1) // 2]
        chosen[name] = {**median, "output_tokens_per_s_repeats": [r["output_tokens_per_s"] for r in summaries]}
    ratios = [i["output_tokens_per_s"] / a["output_tokens_per_s"] for i, a in zip(runs["int8"], runs["auto"])]
    return {
        "kv_budget_bytes": budget,
        "max_model_len": longest,
        "block_size": engine.blocks.block_size,
        "runs": chosen,
        "int8_over_fp32_tokens_per_s_repeats": [round(r, 3) for r in ratios],
        "int8_over_fp32_max_running": chosen["int8"]["max_running"] / chosen["auto"]["max_running"],
    }


def kv_markdown(results: dict) -> str:
    comparison = results["kv_cache"]
    machine = ", ".join(f"{k} {v}" for k, v in results["machine"].items())
    load = results["load_average"]
    ratios = comparison["int8_over_fp32_tokens_per_s_repeats"]
    lines = [
        f"Machine: {machine}. Model: {results['model']}. Workload: {results['workload']}. Torch threads: "
        f"{results['threads']}; 1-minute load average {load['before']} before the run and {load['after']} after "
        "(the machine was shared with other jobs: compare the two rows with each other, not with other results).",
        "",
        f"## genforge engine at a {comparison['kv_budget_bytes'] / 2**20:g} MiB KV-cache budget: fp32 vs int8 KV cache",
        "",
        "| KV cache | bytes per block | blocks | most running at once | preemptions | out tok/s (median) "
        "| out tok/s (repeats) | TTFT p50 | TPOT p50 | e2e p50 |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, label in (("auto", "fp32 (auto)"), ("int8", "int8")):
        run = comparison["runs"][name]
        repeats = ", ".join(f"{t:.0f}" for t in run["output_tokens_per_s_repeats"])
        lines.append(
            f"| {label} | {run['bytes_per_block']} | {run['kv_blocks']} | {run['max_running']} | {run['preemptions']} "
            f"| {run['output_tokens_per_s']:.1f} | {repeats} | {run['ttft']['p50_ms']:.0f} ms "
            f"| {run['tpot']['p50_ms']:.1f} ms | {run['e2e']['p50_ms']:.0f} ms |"
        )
    lines += [
        "",
        f"int8 runs {comparison['int8_over_fp32_max_running']:.2f}x the sequences at once; its output tokens/s "
        f"over fp32's, repeat by repeat: {', '.join(f'{r:.2f}x' for r in ratios)}.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- metrics
def summarize_trace(trace: Trace, workload: Workload) -> dict:
    """vLLM's serving metrics (genforge.serve.bench.summarize) from per-token timestamps."""
    records = [
        RequestRecord.from_token_times(arrival, times, len(prompt))
        for arrival, times, prompt in zip(trace.arrival, trace.token_times, workload.prompts)
    ]
    duration = max(t[-1] for t in trace.token_times) - min(trace.arrival)
    return summarize(records, duration)


# -------------------------------------------------------------------------------- main
def default_model_dir(tmp: Path, seed: int) -> Path:
    """A random Llama (4 layers, d=256, vocab 8192): small enough for a CPU run, shaped like a real one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    directory = tmp / "model"
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def median_run(repeats: dict[str, list[dict]], name: str) -> dict:
    """The repeat of `name` with the median output tokens/s, with every repeat's throughput and,
    when genforge ran too, genforge's speed-up over it in each repeat (the same repeat's runs)."""
    runs = repeats[name]
    chosen = sorted(runs, key=lambda r: r["output_tokens_per_s"])[(len(runs) - 1) // 2]
    entry = {**chosen, "output_tokens_per_s_repeats": [r["output_tokens_per_s"] for r in runs]}
    if "genforge" in repeats:
        entry["genforge_speedup_repeats"] = [
            g["output_tokens_per_s"] / r["output_tokens_per_s"] for g, r in zip(repeats["genforge"], runs)
        ]
    return entry


def markdown(results: dict) -> str:
    runs = []
    for rate, systems in results["runs"].items():
        for name, summary in systems.items():
            label = name
            ratios = sorted(summary.get("genforge_speedup_repeats", []))
            if ratios:
                label += f" (genforge {statistics.median(ratios):.2f}x"
                label += f", {ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ")"
            runs.append({**summary, "rate": rate, "label": label})
    machine = ", ".join(f"{k} {v}" for k, v in results["machine"].items())
    header = f"Machine: {machine}. Model: {results['model']}. Workload: {results['workload']}."
    if "load_average" in results:
        load = results["load_average"]
        header += (
            f" Torch threads: {results['threads']}; 1-minute load average {load['before']} before the run and "
            f"{load['after']} after."
        )
    header += (
        f" Each system ran {results.get('repeats', 1)} times per rate, alternating; a row is its run with"
        " the median output tokens/s, and the label gives genforge's speed-up over it: the median of"
        " the per-repeat ratios, with their range.\n\n"
    )
    report = header + markdown_report(runs, title="genforge engine vs static batching vs one at a time")
    for rate, kernels in results.get("kernel_seconds", {}).items():
        report += (
            f"\nKernel floor at rate {rate}: in an extra run of the same workload, genforge spent "
            f"{kernels['attention']:.2f} s in attention (SDPA) and {kernels['linear layers']:.2f} s in its "
            f"linear layers, of {kernels['whole run']:.2f} s. A run made of those kernels alone, with "
            f"nothing around them, would take {kernels['kernels alone']:.2f} s: "
            f"{kernels['ceiling_speedup_over_static']:.2f}x the median static batching run.\n"
        )
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory (default: a random 4-layer Llama)")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--rates", default="4,inf", help="comma-separated request rates in req/s; inf = all at once")
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.9)
    parser.add_argument("--token-budget", type=int, default=512, help="genforge's max batched tokens per step")
    parser.add_argument("--systems", default="genforge,static,sequential")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of every system per rate (medians are reported)"
    )
    parser.add_argument("--out", default=str(RESULTS / "serve"), help="results path without extension")
    parser.add_argument(
        "--profile-step",
        action="store_true",
        help="instead of the benchmark: print where one decode step with --max-concurrency rows goes",
    )
    parser.add_argument(
        "--resident-kv-memory",
        type=int,
        default=None,
        help="genforge's resident K/V buffer limit in bytes (default: the block pool's size; "
        "0: gather blocks every step)",
    )
    parser.add_argument(
        "--kv-budget-mib",
        type=float,
        default=None,
        help="instead of the benchmark: genforge alone at this KV-cache memory budget, fp32 against int8 KV cache",
    )
    args = parser.parse_args(argv)
    if args.kv_budget_mib is not None and args.kv_budget_mib <= 0:
        parser.error("--kv-budget-mib must be > 0")
    if args.resident_kv_memory is not None and args.resident_kv_memory < 0:
        parser.error("--resident-kv-memory must be >= 0 bytes")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM

    from genforge.checkpoint import load_model
    from genforge.inference import pack_for_cpu_inference

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.model) if args.model else default_model_dir(Path(tmp), args.seed)
        # As `genforge serve` runs it on CPU: oneDNN-packed linear layers (genforge.inference).
        ours = pack_for_cpu_inference(load_model(directory).eval())
        theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    if args.profile_step:
        steps = 60
        parts = profile_step(ours, args.max_concurrency, steps, args.resident_kv_memory, args.seed)
        print(
            f"one decode step with {args.max_concurrency} rows, thread CPU ms (mean of {steps} steps, "
            f"{torch.get_num_threads()} threads):"
        )
        for part, ms in sorted(parts.items(), key=lambda item: -item[1]):
            print(f"  {part:<22} {ms:7.2f}")
        return 0
    if args.kv_budget_mib is not None:
        load_before = os.getloadavg()[0]
        results = {
            "machine": describe(),
            "model": args.model or "random Llama d=256 L=4 vocab=8192",
            "workload": (
                f"{args.num_requests} requests all at once, input {args.input_len} and output {args.output_len} "
                f"tokens +-{args.range_ratio:.0%}, max concurrency {args.max_concurrency}, greedy, fp32 model"
            ),
            "kv_cache": kv_cache_dtype_comparison(ours, args),
            "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
        }
        text = kv_markdown(results)
        write_results(Path(args.out).parent, "serve_kv_int8", results, text)
        print(text)
        return 0
    systems = args.systems.split(",")
    results = {
        "machine": describe(transformers=transformers.__version__),
        "model": args.model or "random Llama d=256 L=4 vocab=8192",
        "workload": (
            f"{args.num_requests} requests, input {args.input_len} and output {args.output_len} tokens "
            f"+-{args.range_ratio:.0%}, max concurrency {args.max_concurrency}, greedy, fp32"
        ),
        "runs": {},
    }
    load_before = os.getloadavg()[0]
    unknown = sorted(set(systems) - {"genforge", "static", "sequential"})
    if unknown:
        parser.error(f"unknown system(s) {unknown}; accepted: genforge, static, sequential")
    # Other prompts than the timed ones (another seed), so no prefix is cached for them.
    warmup = make_workload(
        args.max_concurrency,
        float("inf"),
        args.input_len,
        args.output_len,
        args.range_ratio,
        ours.config.vocab_size,
        args.seed + 1,
    )
    if "static" in systems:
        run_static(theirs, warmup, args.max_concurrency)
    if "sequential" in systems:
        run_sequential(theirs, Workload(warmup.arrivals[:4], warmup.prompts[:4], warmup.output_lengths[:4]))
    for rate_text in args.rates.split(","):
        rate = float(rate_text)
        workload = make_workload(
            args.num_requests,
            rate,
            args.input_len,
            args.output_len,
            args.range_ratio,
            ours.config.vocab_size,
            args.seed,
        )
        repeats: dict[str, list[dict]] = {name: [] for name in systems}
        for repeat in range(args.repeats):
            # The order flips every repeat, so a drifting machine does not always favour the same system.
            for name in systems if repeat % 2 == 0 else systems[::-1]:
                if name == "genforge":
                    engine = warmed_engine(
                        ours, warmup, args.max_concurrency, args.token_budget, args.resident_kv_memory
                    )
                    trace = run_genforge(engine, workload, args.max_concurrency)
                elif name == "static":
                    trace = run_static(theirs, workload, args.max_concurrency)
                else:
                    trace = run_sequential(theirs, workload)
                summary = summarize_trace(trace, workload)
                repeats[name].append(summary)
                print(
                    f"rate {rate_text:>4} repeat {repeat + 1} {name:>10}: {summary['output_tokens_per_s']:7.1f} "
                    f"output tok/s, TTFT p50 {summary['ttft']['p50_ms']:.0f} ms",
                    flush=True,
                )
        results["runs"][rate_text] = {name: median_run(repeats, name) for name in systems}
        if rate == float("inf") and {"genforge", "static"} <= set(systems):
            kernels = kernel_seconds(ours, workload, warmup, args)
            static_seconds = results["runs"][rate_text]["static"]["duration_s"]
            kernels["ceiling_speedup_over_static"] = round(static_seconds / kernels["kernels alone"], 2)
            results.setdefault("kernel_seconds", {})[rate_text] = kernels
            print(f"rate {rate_text:>4} genforge kernels: {kernels}", flush=True)
    # Other jobs on a shared machine slow every system; the 1-minute load average before and
    # after says how busy it was (the ratios are within one run).
    results["load_average"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    results["threads"] = torch.get_num_threads()
    results["repeats"] = args.repeats
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
