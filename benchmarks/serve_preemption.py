"""Preemption by swapping against recomputing: when does each win?

genforge's engine alone (no HTTP) serves workloads whose KV-cache pool is too small for all
their requests at once, so running sequences are preempted, under each `preemption_mode`:

- recompute: a preempted sequence's blocks are freed and its tokens prefilled again on resume;
- swap: its computed blocks are copied to host memory (spilling to disk when the host swap
  space is short) and copied back on resume;
- auto: per preemption, whichever the measured costs say is cheaper (`serve/swap.py`).

Workloads (all requests waiting at once, greedy, every request runs to its length):

- long-unique: long distinct prompts, short outputs; a recompute prefills the whole prompt again;
- shared-prefix: one long system prompt and short distinct suffixes; a recompute finds the
  prefix in the prefix cache (other running requests hold it), so it costs little;
- short-long: short prompts, long outputs; what is recomputed is mostly generated tokens;
- long-unique, disk: as long-unique with a host swap space of a few blocks and disk allowed, so
  swaps spill to files.

Per workload and mode: wall time, output tokens/s, preemptions (swapped / recomputed), tokens
recomputed, bytes swapped, and the engine's step time by phase (`serve/phases.py`); modes run
alternately `--repeats` times and the median run is reported. Every mode must return the same
tokens (checked). Results: results/serve_preemption.json and .md.

    python benchmarks/serve_preemption.py
    python benchmarks/serve_preemption.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe, write_results

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("recompute", "swap", "auto")


def workloads(vocab: int, seed: int) -> dict[str, dict]:
    rng = random.Random(seed)

    def tokens(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    system = tokens(448)
    # "fits": the pool holds this many of the workload's longest sequences; the shared prefix
    # is held once, so there the pool is sized as the prefix and ~3 sequences' own blocks.
    return {
        "long-unique": {"prompts": [tokens(384) for _ in range(12)], "output": 128, "fits": 4},
        "shared-prefix": {"prompts": [system + tokens(32) for _ in range(12)], "output": 128, "num_blocks": 64},
        "short-long": {"prompts": [tokens(32) for _ in range(12)], "output": 224, "fits": 4},
    }


def run(model, prompts, output_len, num_blocks, max_len, mode, swap_space, swap_disk_space, swap_dir) -> dict:
    from genforge.generate.sampling import SamplingParams
    from genforge.serve.engine import Engine, Request

    engine = Engine(
        model,
        None,
        block_size=16,
        num_blocks=num_blocks,
        max_num_seqs=len(prompts),
        max_num_batched_tokens=512,
        max_model_len=max_len,
        preemption_mode=mode,
        swap_space=swap_space,
        swap_disk_space=swap_disk_space,
        swap_dir=swap_dir,
    )
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0, max_new_tokens=output_len)
        engine.add_request(Request(str(i), prompt, params, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    seconds = time.perf_counter() - start
    stats = engine.stats()
    phases = stats.phases
    engine.close()
    total = sum(phases.seconds.values())
    swap = stats.swap
    return {
        "seconds": seconds,
        "output_tokens_per_s": sum(len(t) for t in tokens.values()) / seconds,
        "preemptions": stats.preemptions,
        "swapped": stats.swap_preemptions,
        "recomputed": stats.preemptions - stats.swap_preemptions,
        "spilled_to_disk": swap.spilled if swap else 0,
        "recomputed_tokens": phases.tokens["recompute"],
        "swap_bytes_out": swap.bytes_out if swap else 0,
        "swap_seconds": phases.seconds["swap"],
        "phase_share": {phase: round(s / total, 4) for phase, s in phases.seconds.items()},
        "prefill_ms_per_token": 1e3 * phases.prefill_seconds_per_token(),
        "swap_ms_per_block_round_trip": (
            1e3 * engine.swap_space.seconds_per_block("host") if engine.swap_space is not None else None
        ),
        "tokens": tokens,
    }


def markdown(results: dict) -> str:
    machine = ", ".join(f"{k} {v}" for k, v in results["machine"].items())
    load = results["load_average"]
    lines = [
        f"Machine: {machine}. Model: {results['model']}. Torch threads: {results['threads']}; 1-minute load "
        f"average {load['before']} before and {load['after']} after (a shared machine: compare rows of one "
        "workload with each other). Median of "
        f"{results['repeats']} alternating runs per mode; every mode returned the same tokens.",
        "",
        "| workload | KV pool | mode | wall s | out tok/s | vs recompute | preemptions (swapped / recomputed) "
        "| disk spills | tokens recomputed | MiB swapped out | step share: prefill / decode / recompute / swap |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for name, entry in results["workloads"].items():
        base = entry["runs"]["recompute"]["output_tokens_per_s"]
        for mode, r in entry["runs"].items():
            share = r["phase_share"]
            lines.append(
                f"| {name} | {entry['num_blocks']} blocks ({entry['fits']} seqs) | {mode} | {r['seconds']:.2f} "
                f"| {r['output_tokens_per_s']:.1f} | {r['output_tokens_per_s'] / base:.2f}x "
                f"| {r['preemptions']} ({r['swapped']} / {r['recomputed']}) | {r['spilled_to_disk']} "
                f"| {r['recomputed_tokens']} | {r['swap_bytes_out'] / 2**20:.1f} "
                f"| {share['prefill']:.2f} / {share['decode']:.2f} / {share['recompute']:.2f} / {share['swap']:.3f} |"
            )
    lines += [
        "",
        "Measured costs behind auto's choice (its median run per workload): prefill ms per token, and ms to move "
        "one block (16 tokens, every layer's keys and values) out and back through host memory:",
        "",
    ]
    for name, entry in results["workloads"].items():
        r = entry["runs"]["auto"]
        per_block = r["swap_ms_per_block_round_trip"]
        lines.append(
            f"- {name}: prefill {r['prefill_ms_per_token']:.3f} ms/token (x16 = {16 * r['prefill_ms_per_token']:.2f} "
            f"ms per block), swap {per_block:.3f} ms/block round trip"
            if per_block is not None
            else f"- {name}: prefill {r['prefill_ms_per_token']:.3f} ms/token, no swap measured"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory (default: a random 4-layer Llama, d=256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help="directory for serve_preemption.json and .md")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from serve import default_model_dir

    from genforge.checkpoint import load_model
    from genforge.inference import pack_for_cpu_inference
    from genforge.serve.paged_cache import PagedKVCache

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.model) if args.model else default_model_dir(Path(tmp), args.seed)
        model = pack_for_cpu_inference(load_model(directory).eval())
        per_block = PagedKVCache.bytes_per_block(model.config, 16, model.dtype)
        load_before = os.getloadavg()[0]
        cases = workloads(model.config.vocab_size, args.seed)
        cases["long-unique, disk"] = dict(cases["long-unique"], disk=True)
        out: dict[str, dict] = {}
        for name, case in cases.items():
            prompts, output_len = case["prompts"], case["output"]
            longest = max(len(p) for p in prompts) + output_len
            num_blocks = case.get("num_blocks") or case["fits"] * -(-longest // 16)
            disk = case.get("disk", False)
            # Disk: host room for 4 blocks only, so every swap of a longer sequence spills.
            swap_space, swap_disk = (4 * per_block, 1 << 30) if disk else (1 << 30, 0)
            runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for repeat in range(args.repeats):
                order = MODES if repeat % 2 == 0 else MODES[::-1]
                for mode in order:
                    result = run(
                        model,
                        prompts,
                        output_len,
                        num_blocks,
                        longest,
                        mode,
                        swap_space,
                        swap_disk,
                        Path(tmp) / "spill",
                    )
                    runs[mode].append(result)
                    print(
                        f"{name:<18} {mode:<9} repeat {repeat + 1}: {result['seconds']:.2f} s, "
                        f"{result['preemptions']} preemptions ({result['swapped']} swapped, "
                        f"{result['spilled_to_disk']} to disk), {result['recomputed_tokens']} tokens recomputed",
                        flush=True,
                    )
            reference = runs["recompute"][0]["tokens"]
            for mode, results in runs.items():
                for result in results:
                    if result.pop("tokens") != reference:
                        raise AssertionError(f"{name}: {mode} returned other tokens than recompute")
            chosen = {}
            for mode, results in runs.items():
                median = sorted(results, key=lambda r: r["seconds"])[(len(results) - 1) // 2]
                chosen[mode] = {**median, "seconds_repeats": [round(r["seconds"], 3) for r in results]}
            out[name] = {
                "requests": len(prompts),
                "prompt_tokens_mean": statistics.mean(len(p) for p in prompts),
                "output_tokens": output_len,
                "fits": round(num_blocks / -(-longest // 16), 1),
                "num_blocks": num_blocks,
                "host_swap_bytes": swap_space,
                "disk_swap_bytes": swap_disk,
                "runs": chosen,
            }
            assert not any((Path(tmp) / "spill").glob("*")), "spill files left behind"
    results = {
        "machine": describe(),
        "model": args.model or "random Llama d=256 L=4 vocab=8192 (packed for CPU inference)",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "bytes_per_block": per_block,
        "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "workloads": out,
    }
    report = markdown(results)
    write_results(args.out, "serve_preemption", results, report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
