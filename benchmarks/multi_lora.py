"""Multi-LoRA serving benchmark: what serving several adapters in one batch costs over the base.

The same workload (every request waiting at once, greedy, each output run to its length) is
served by genforge's engine over the same packed base model, as `genforge serve` loads it, in
these ways:

- base: every request on the bare base (no adapter layer anywhere);
- base, adapters loaded: the same requests on the base while 4 adapters are loaded (their
  layers wrap the base layers but no row uses them: the wrapper's own cost);
- 1 adapter: every request on one adapter (one group per layer: no gathering);
- 4 adapters mixed: the requests spread round-robin over 4 adapters, all in the same batches
  (each adapted layer: the base product once, then per adapter a gather, two small products
  and a scatter-add);
- merged: one adapter merged into a copy of the base (`merge_and_unload`), the cost of one
  adapter served the usual way, and the ceiling of the rows above.

Each adapter has rank `--rank` on q, k, v, o, gate, up and down (PEFT's all-linear targets),
with random weights. The rows run in alternating order, `--repeats` times; the report gives each
row's best and median output tokens/s and their ratios to the base's. On a machine shared with
other work, the best run is the steadier figure: contention only ever slows a run down.

    python benchmarks/multi_lora.py                       # a random 4-layer Llama, d=256
    python benchmarks/multi_lora.py --hidden 576 --layers 30 --intermediate 1536 --heads 9   # SmolLM-135M-shaped
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe

from genforge.atomic import atomic_write_text
from genforge.checkpoint import load_model, save_model
from genforge.config import Config
from genforge.finetune.lora import LoraConfig, apply_lora, load_adapter, merge_and_unload, save_adapter
from genforge.finetune.multi_lora import MultiLora
from genforge.generate.sampling import SamplingParams
from genforge.inference import pack_for_cpu_inference
from genforge.model import Transformer
from genforge.serve.engine import Engine, Request

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args, tmp: Path) -> tuple[Path, list[Path]]:
    """A random base model directory and `--adapters` random adapters over it."""
    torch.manual_seed(args.seed)
    config = Config(
        family="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=2048,
    )
    base = Transformer(config).eval()
    base_dir = save_model(base, tmp / "base")
    adapters = []
    for i in range(args.adapters):
        model = apply_lora(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, r=args.rank, lora_alpha=args.rank))
        torch.manual_seed(args.seed + 1 + i)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:  # B starts at zero; a served adapter has been trained
                    parameter.normal_(0, 0.02)
        adapters.append(save_adapter(model, tmp / f"adapter{i}"))
    return base_dir, adapters


def serve(engine: Engine, prompts: list[list[int]], lengths: list[int], adapters: list[str | None]) -> float:
    """Serve every request at once; returns output tokens per second."""
    for i, (prompt, length, adapter) in enumerate(zip(prompts, lengths, adapters)):
        params = SamplingParams(temperature=0, max_new_tokens=length)
        engine.add_request(Request(f"r{i}", prompt, params, adapter=adapter, ignore_eos=True))
    start = time.perf_counter()
    tokens = 0
    while engine.has_unfinished():
        tokens += sum(len(out.token_ids) for out in engine.step())
    return tokens / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "multi_lora"), help="results path without extension")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base_dir, adapter_dirs = build(args, Path(tmp))
        names = [f"adapter{i}" for i in range(args.adapters)]
        # The served model, as `genforge serve` loads it: MultiLora on the model as loaded, then packed.
        served = load_model(base_dir).eval()
        multi = MultiLora(served)
        pack_for_cpu_inference(served)
        bare = pack_for_cpu_inference(load_model(base_dir).eval())
        merged = pack_for_cpu_inference(merge_and_unload(load_adapter(load_model(base_dir), adapter_dirs[0])).eval())
        for name, directory in zip(names, adapter_dirs):
            multi.load(name, directory)

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    lengths = [args.output_len] * args.num_requests
    no_adapter = [None] * args.num_requests
    systems = {
        "base": (bare, no_adapter),
        f"base, {args.adapters} adapters loaded": (served, no_adapter),
        "1 adapter": (served, [names[0]] * args.num_requests),
        f"{args.adapters} adapters mixed": (served, [names[i % len(names)] for i in range(args.num_requests)]),
        "merged (1 adapter)": (merged, no_adapter),
    }
    options = dict(max_num_seqs=args.num_requests, max_num_batched_tokens=512, eos_token_ids=[])
    engines = {
        name: Engine(model, None, adapters=multi if model is served else None, **options)
        for name, (model, _) in systems.items()
    }
    warm = [[rng.randrange(args.vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    for name, (_, adapters) in systems.items():  # warm-up: allocator, oneDNN primitives, resident buffers
        serve(engines[name], warm, [8] * args.num_requests, adapters)
    speeds: dict[str, list[float]] = {name: [] for name in systems}
    for repeat in range(args.repeats):
        order = list(systems) if repeat % 2 == 0 else list(reversed(systems))
        for name in order:
            speeds[name].append(serve(engines[name], prompts, lengths, systems[name][1]))
            print(f"repeat {repeat + 1}: {name}: {speeds[name][-1]:.1f} output tokens/s", file=sys.stderr)

    best_base, median_base = max(speeds["base"]), statistics.median(speeds["base"])
    results = {
        "machine": describe(),
        "settings": vars(args),
        "results": {
            name: {
                "best_output_tokens_per_s": max(runs),
                "median_output_tokens_per_s": statistics.median(runs),
                "best_vs_base": max(runs) / best_base,
                "median_vs_base": statistics.median(runs) / median_base,
                "runs": runs,
            }
            for name, runs in speeds.items()
        },
    }
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['threads']}, torch "
        f"{machine['torch']}. Model: random Llama d={args.hidden} L={args.layers} vocab={args.vocab}, fp32, packed "
        f"for the CPU. {args.adapters} adapters of rank {args.rank} on q, k, v, o, gate, up, down. Workload: "
        f"{args.num_requests} requests at once, {args.input_len} prompt and {args.output_len} output tokens each, "
        f"greedy. {args.repeats} alternating runs each.",
        "",
        "| served as | best output tokens/s | vs base | median | vs base | runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, row in results["results"].items():
        runs = ", ".join(f"{r:.0f}" for r in row["runs"])
        lines.append(
            f"| {name} | {row['best_output_tokens_per_s']:.1f} | {row['best_vs_base']:.2f}x | "
            f"{row['median_output_tokens_per_s']:.1f} | {row['median_vs_base']:.2f}x | {runs} |"
        )
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    atomic_write_text(out.with_suffix(".md"), "# Multi-LoRA serving\n\n" + markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
