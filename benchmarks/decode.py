"""Decode throughput: genforge against transformers `generate`, and against the bandwidth roofline.

Two model shapes with random weights in fp32: GPT-2 124M and SmolLM 135M (a Llama). For each,
a 128-token prompt and 128 greedy new tokens at batch 1 and batch 8, on `--threads` threads.
Both libraries run in the same process, alternating, and the median of `--repeats` runs is
kept. Greedy outputs are compared too, so the speed is for the same tokens.

Roofline: a decode step at batch 1 must read every weight once, so its time is at least
weight bytes / memory bandwidth. The bandwidth is measured here with a large matrix-vector
product (the operation a decode step is made of), and the script reports
achieved decode tokens/s x weight bytes / bandwidth.

Kernel floor: a forward pass's matrix products and attention calls alone, run back to back on
the model's own packed weights (for a decode step, over caches of the mean decode length; for
the prefill, over the prompt), with nothing else a pass does (norms, rotations, residual adds,
cache writes, Python). It separates what the
kernels cost from what genforge adds around them, and bounds what any implementation built on
these kernels can reach: the "ceiling" columns are the tokens/s and speed-up of a run whose
prefill and every decode step took their floors. The floors are measured in every repeat, after
the two libraries' runs, and their medians kept, as for the runs themselves.

    python benchmarks/decode.py            # writes benchmarks/results/decode.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from machine import describe

from genforge.checkpoint import load_model
from genforge.generate.generator import stream
from genforge.generate.sampling import SamplingParams
from genforge.inference import PackedLinear, can_pack, pack_for_cpu_inference

SHAPES = {
    "gpt2-124m": transformers.GPT2Config(n_positions=1024),
    "smollm-135m": transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def machine() -> dict:
    return describe(transformers=transformers.__version__)


def median_seconds(run, repeats: int, warmup: int = 3) -> float:
    """Median wall time of `run()` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemv_bandwidth(repeats: int = 20) -> dict[str, float]:
    """Bytes/s of fp32 matrix-vector products over a 256 MB matrix (far larger than any cache),
    through each kernel available: MKL's `torch.mv` and oneDNN with a pre-packed weight. The
    roofline uses the fastest, so no implementation can look better than the memory allows."""
    weight, x = torch.randn(16384, 4096), torch.randn(1, 4096)
    kernels = {"mkl_mv": lambda: torch.mv(weight, x[0])}
    if can_pack(torch.nn.Linear(1, 1)):
        packed = PackedLinear(torch.nn.Linear(4096, 16384, bias=False))
        packed.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 128)
        kernels["onednn_packed"] = lambda: packed(x)
    return {name: weight.numel() * 4 / median_seconds(kernel, repeats) for name, kernel in kernels.items()}


def hf_generate(model, prompts, new_tokens):
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, prompts.shape[1] :]


def genforge_generate(model, prompts, new_tokens, timings=None):
    """Greedy tokens; `timings` gets (time to first token, time of the remaining steps)."""
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    tokens = [[] for _ in range(prompts.shape[0])]
    start = time.perf_counter()
    first = None
    for event in stream(model, prompts.tolist(), params, eos_token_ids=[]):
        tokens[event.row].append(event.token_id)
        if first is None and event.row == prompts.shape[0] - 1:
            first = time.perf_counter()
    if timings is not None:
        timings.append((first - start, time.perf_counter() - first))
    return torch.tensor(tokens)


def weight_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: every matrix, norm and bias once, the vocabulary
    matrix once (it is the LM head even when tied), and a single row of each embedding."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed_") and not (name == "embed_tokens.weight" and model.config.tie_word_embeddings):
            total += p.shape[-1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def kernel_floor(model, batch: int, new: int, context: int, repeats: int) -> float:
    """Seconds of one forward pass's kernels alone (see the module docstring): every packed
    linear layer of the model on `batch` rows of `new` tokens (the LM head on the last token
    only, as generation asks), and one attention call per layer of those queries over
    `context` positions (causal when it is the whole prompt), each layer with a cache of its
    own so that it streams from memory as a real cache does. For one new token, the query
    heads sharing a key/value head are folded into one call, as the model does."""
    config = model.config
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    # One input per width, reused: a real pass's activations were just written and sit in
    # cache, and only the weights should stream from memory.
    widths = {m.in_features for m in linears}
    activations = {width: torch.randn(batch, new, width) for width in widths}
    head_input = torch.randn(batch, 1, model.lm_head.in_features)
    inputs = [head_input if m is model.lm_head else activations[m.in_features] for m in linears]
    kv_shape = (batch, config.num_kv_heads, context, config.head_dim)
    caches = [(torch.randn(kv_shape), torch.randn(kv_shape)) for _ in range(config.num_layers)]
    if new == 1:
        query = torch.randn(batch, config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim)
    else:
        query = torch.randn(batch, config.num_heads, new, config.head_dim)
    gqa = new > 1 and config.num_kv_heads != config.num_heads

    def forward() -> None:
        for linear, x in zip(linears, inputs):
            linear(x)
        for keys, values in caches:
            F.scaled_dot_product_attention(query, keys, values, is_causal=new > 1, enable_gqa=gqa)

    with torch.inference_mode():
        return median_seconds(forward, repeats)


def run(shape: str, batches, prompt_len: int, new_tokens: int, repeats: int) -> list[dict]:
    config = SHAPES[shape]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = load_model(directory)
    weights = weight_bytes(ours)  # counted before packing hides the matrices in opaque buffers
    pack_for_cpu_inference(ours)
    rows = []
    for batch in batches:
        prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            same = torch.equal(hf_generate(hf, prompts, 8), genforge_generate(ours, prompts, 8))
        hf_times, gf_times, steps, floors, prefill_floors = [], [], [], [], []
        # Alternate, so that a machine changing pace hits both libraries and the floors alike.
        for _ in range(repeats):
            with torch.inference_mode():
                start = time.perf_counter()
                hf_generate(hf, prompts, new_tokens)
                hf_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                genforge_generate(ours, prompts, new_tokens, steps)
                gf_times.append(time.perf_counter() - start)
            floors.append(kernel_floor(ours, batch, 1, prompt_len + new_tokens // 2, repeats=10))
            prefill_floors.append(kernel_floor(ours, batch, prompt_len, prompt_len, repeats=2))
        hf_tps = batch * new_tokens / statistics.median(hf_times)
        gf_tps = batch * new_tokens / statistics.median(gf_times)
        decode_step = statistics.median(rest for _, rest in steps) / (new_tokens - 1)
        floor, prefill_floor = statistics.median(floors), statistics.median(prefill_floors)
        ceiling_tps = batch * new_tokens / (prefill_floor + (new_tokens - 1) * floor)
        row = {
            "model": shape,
            "batch": batch,
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "transformers_tokens_per_s": round(hf_tps, 2),
            "genforge_tokens_per_s": round(gf_tps, 2),
            "speedup": round(gf_tps / hf_tps, 3),
            "greedy_tokens_identical": same,
            "genforge_decode_step_ms": round(decode_step * 1e3, 2),
            "genforge_prefill_ms": round(statistics.median(first for first, _ in steps) * 1e3, 1),
            "kernel_floor_prefill_ms": round(prefill_floor * 1e3, 1),
            "kernel_floor_step_ms": round(floor * 1e3, 2),
            "ceiling_tokens_per_s": round(ceiling_tps, 2),
            "ceiling_speedup": round(ceiling_tps / hf_tps, 3),
            "weight_mb": round(weights / 1e6, 1),
            "weight_bytes": weights,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    parser.add_argument("--model", action="append", choices=list(SHAPES), help="shapes (default all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The bandwidth is measured before each model and after the last, and the roofline uses the
    # highest of all: it drifts by 20% between runs on a shared machine, and a low reading would
    # flatter every roofline share.
    measurements = []

    def measure() -> None:
        measurements.append(gemv_bandwidth())
        print(
            f"GEMV bandwidth: {', '.join(f'{k} {v / 1e9:.1f} GB/s' for k, v in measurements[-1].items())}", flush=True
        )

    rows = []
    for shape in args.model or list(SHAPES):
        measure()
        rows += run(shape, args.batch or [1, 8], args.prompt_tokens, args.new_tokens, args.repeats)
    measure()
    kernels = {name: max(m[name] for m in measurements) for name in measurements[0]}
    bandwidth = max(kernels.values())
    for r in rows:
        roofline_step = r["weight_bytes"] / bandwidth
        r["roofline_step_ms"] = round(roofline_step * 1e3, 2)
        r["roofline_fraction"] = (
            round(roofline_step / (r["genforge_decode_step_ms"] / 1e3), 3) if r["batch"] == 1 else None
        )
    result = {
        "machine": machine(),
        "gemv_bandwidth_gb_s": {k: round(v / 1e9, 2) for k, v in kernels.items()},
        "gemv_bandwidth_measurements_gb_s": [{k: round(v / 1e9, 2) for k, v in m.items()} for m in measurements],
        "results": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Decode benchmark on {result['machine']['cpu']}, {args.threads} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; fp32, random weights, greedy, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens; median of {args.repeats}. Roofline at the fastest GEMV bandwidth measured "
        f"before each model and after the last, {bandwidth / 1e9:.1f} GB/s "
        f"({', '.join(f'{k} {v / 1e9:.1f}' for k, v in kernels.items())}; the readings ranged "
        f"{min(max(m.values()) for m in measurements) / 1e9:.1f}-{bandwidth / 1e9:.1f}).",
        "",
        "| model | batch | transformers tok/s | genforge tok/s | speedup | decode step ms | kernel floor ms | "
        "ceiling speedup | roofline ms | roofline % | ceiling roofline % | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fraction = f"{100 * r['roofline_fraction']:.0f}%" if r["roofline_fraction"] else "-"
        at_floor = f"{100 * r['roofline_step_ms'] / r['kernel_floor_step_ms']:.0f}%" if r["roofline_fraction"] else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['transformers_tokens_per_s']:.1f} | {r['genforge_tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['genforge_decode_step_ms']} | {r['kernel_floor_step_ms']} | "
            f"{r['ceiling_speedup']:.2f}x | {r['roofline_step_ms']} | {fraction} | {at_floor} | "
            f"{r['greedy_tokens_identical']} |"
        )
    (out / "decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
