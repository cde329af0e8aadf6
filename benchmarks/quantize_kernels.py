"""Weight-only INT8/INT4 products against fp32 on decode shapes: which kernel to use, measured.

A decode step of a small model is a chain of one-row (or few-row) products whose time is the
time to stream the weights. This script times, on the shapes of GPT-2's and SmolLM-135M's
layers, at batch 1 and 8:

    fp32            genforge's `inference.PackedLinear` (oneDNN, packed): what genforge decodes with today
    fbgemm-dyn-int8 torch.ao's dynamic INT8 (`quantized.linear_dynamic`, prepacked): it also
                    quantizes the activations, so it is not weight-only (a reference for speed)
    aten-int8pack   `aten._weight_int8pack_mm` (weight-only INT8, per-channel scales)
    aten-int4pack   `aten._weight_int4pack_mm_for_cpu` (weight-only INT4, groups of 128)
    gf-*            genforge's kernels (`quantize.kernels`) through `Int8Linear`/`Int4Linear`
                    (groups of 128, or 64 where 128 does not divide the inputs): the AVX-512
                    and AVX2 builds (the pure-torch path is timed in the crossover section)

Each product rotates over enough copies of its weight to exceed the last-level cache, as the
weights of a whole model do. Then a whole decode step's products (every linear layer of the
model once, batch 1 and 8) in fp32, INT8 and INT4, with the LM head quantized and kept in fp32,
against the ceiling (the bytes a step reads over the machine's streaming bandwidth, measured
here). Then where the kernels stop paying (more rows of x: dequantize + oneDNN wins), which
sets `quantize.kernels.NATIVE_MAX_ROWS`. Last, what quantizing the head costs in quality: the
held-out perplexity of a small model pretrained on standard-library source, with and without.

Results: benchmarks/results/quantize_kernels.{json,md}. Timings on a shared machine are noisy:
methods take turns and the fastest pass counts; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from machine import describe, write_results
from torch import nn

from genforge.inference import PackedLinear
from genforge.quantize import kernels
from genforge.quantize.weight_only import Int4Linear, Int8Linear

# (in_features, out_features) of decode layers: GPT-2 (qkv, o, up, down, head), SmolLM-135M (up/gate, down, head).
SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (576, 1536), (1536, 576), (768, 50257), (576, 49152)]
# Every linear layer of one decode step: (in, out, count); the head last.
MODELS = {
    "gpt2": {"layers": [(768, 2304, 12), (768, 768, 12), (768, 3072, 12), (3072, 768, 12)], "head": (768, 50257)},
    "smollm-135m": {
        "layers": [(576, 960, 30), (576, 576, 30), (576, 3072, 30), (1536, 576, 30)],
        "head": (576, 49152),
    },
}
# Copies of a weight are rotated until they hold this many bytes: twice the 32 MiB L3 of the
# EPYC this ran on, so each call reads its weight from memory, as in a real decode step.
ROTATION_BYTES = 64 << 20
GROUP_SIZE = 128


def group_for(in_features: int) -> int:
    """Groups of 128 where they divide the layer, else 64 (SmolLM's hidden size is 576 = 4.5 x 128)."""
    return GROUP_SIZE if in_features % GROUP_SIZE == 0 else 64


# Methods far slower than fp32 on a one-row product (measured), timed on two copies only.
SLOW_METHODS = ("aten-int8pack", "aten-int4pack")


def linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02)
    return layer.requires_grad_(False)


def weight_bytes(method: str, in_features: int, out_features: int) -> int:
    n = in_features * out_features
    if method in ("fp32",):
        return 4 * n
    if "int8" in method:
        return n + 4 * out_features
    return n // 2 + (4 + 1) * n // group_for(in_features)  # codes, fp32 scales and uint8 zeros per group


def forced(path: str, module: nn.Module) -> Callable:
    def call(x: torch.Tensor) -> torch.Tensor:
        kernels.set_kernel_path(path)  # cheaper than the context manager: these calls are microseconds
        return module(x)

    return call


def product_factories() -> dict[str, Callable[[nn.Linear], Callable[[torch.Tensor], torch.Tensor]]]:
    """method -> (fp32 layer -> product of x)."""

    def fbgemm(layer: nn.Linear):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = layer.weight
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
            q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(q, None)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)

    def int8pack(layer: nn.Linear):
        q = Int8Linear.from_linear(layer)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, q.weight, q.weight_scale)

    def int4pack(layer: nn.Linear):
        if layer.out_features % 16:
            return None  # aten's INT4 packing needs a multiple of 16 output rows (not the 50257 head)
        group = group_for(layer.in_features)
        q = Int4Linear.from_linear(layer, group)
        codes = q.grid().codes.to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # aten's grid: w = (code - 8) * scale + zero, scales and zeros stacked as (groups, out, 2).
        scales = q.weight_scale.t().contiguous()
        zeros = (8 - q.weight_zeros.float()).t() * scales
        scales_zeros = torch.stack([scales, zeros], dim=-1).contiguous()
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)

    factories = {
        "fp32": lambda layer: PackedLinear(layer),
        "fbgemm-dyn-int8": fbgemm,
        "aten-int8pack": int8pack,
        "aten-int4pack": int4pack,
    }
    for path in ("avx512", "avx2"):  # the torch path: time_crossover
        factories[f"gf-int8-{path}"] = lambda layer, path=path: forced(path, Int8Linear.from_linear(layer))
        factories[f"gf-int4-{path}"] = lambda layer, path=path: forced(
            path, Int4Linear.from_linear(layer, group_for(layer.in_features))
        )
    return factories


def best_pass_us(calls: dict[str, list[Callable[[], object]]], rounds: int) -> dict[str, float]:
    """Microseconds per call of each method's calls: the fastest of `rounds` passes over all of
    them, the methods taking turns so that the machine's load meets them alike."""
    spent: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for group in calls.values():
            for call in group:
                call()
        for _ in range(rounds):
            for name, group in calls.items():
                started = time.perf_counter()
                for call in group:
                    call()
                spent[name].append((time.perf_counter() - started) / len(group))
    return {name: 1e6 * min(times) for name, times in spent.items()}


def stream_bandwidth_gbs(rounds: int = 7) -> float:
    """Reading a 512 MiB fp32 tensor (a sum), in GB/s: the memory bandwidth the decode products share."""
    data = torch.ones(128 << 20)
    data.sum()
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def time_shapes(methods: list[str], batches: list[int], rounds: int) -> list[dict]:
    factories = product_factories()
    rows = []
    for in_features, out_features in SHAPES:
        for batch in batches:
            x = torch.randn(batch, in_features)
            calls = {}
            for method in methods:
                copies = max(2, math.ceil(ROTATION_BYTES / weight_bytes(method, in_features, out_features)))
                if method in SLOW_METHODS:  # compute bound, 3-40x slower than fp32: the cache hardly matters
                    copies = 2
                products = [factories[method](linear(in_features, out_features, seed)) for seed in range(copies)]
                if products[0] is None:
                    continue
                calls[method] = [lambda p=p, x=x: p(x) for p in products]
            times = best_pass_us(calls, rounds)
            del calls
            row = {"in": in_features, "out": out_features, "batch": batch, "us": times}
            row["vs_fp32"] = {m: times["fp32"] / t for m, t in times.items()}
            times.update({m: math.nan for m in methods if m not in times})
            row["fp32_gbs"] = weight_bytes("fp32", in_features, out_features) / times["fp32"] / 1e3
            rows.append(row)
            print(
                f"{in_features}->{out_features} b{batch}: "
                + ", ".join(
                    f"{m} {t:.0f}us ({row['vs_fp32'][m]:.2f}x)" for m, t in times.items() if m in row["vs_fp32"]
                ),
                flush=True,
            )
    return rows


def step_layers(model: str, fmt: str, head_quantized: bool) -> list[nn.Module]:
    """One decode step's linear layers of `model` as `fmt` ("fp32", "int8", "int4") modules."""
    spec = MODELS[model]
    shapes = [(i, o) for i, o, count in spec["layers"] for _ in range(count)]
    layers = []
    for index, (in_features, out_features) in enumerate([*shapes, spec["head"]]):
        plain = linear(in_features, out_features, index)
        is_head = index == len(shapes)
        if fmt == "fp32" or (is_head and not head_quantized):
            layers.append(PackedLinear(plain))
        elif fmt == "int8":
            layers.append(Int8Linear.from_linear(plain))
        else:
            layers.append(Int4Linear.from_linear(plain, group_for(in_features)))
    return layers


def layer_bytes(layer: nn.Module) -> int:
    if isinstance(layer, PackedLinear):
        return 4 * layer.in_features * layer.out_features
    return sum(b.numel() * b.element_size() for name, b in layer.named_buffers() if name.startswith("weight"))


def time_steps(batches: list[int], rounds: int, bandwidth: float, threads: int) -> list[dict]:
    kernels.set_kernel_path("auto")
    torch.set_num_threads(threads)
    rows = []
    variants = [("fp32", True), ("int8", True), ("int8", False), ("int4", True), ("int4", False)]
    for model in MODELS:
        steps = {f"{fmt}{'' if head else ' (fp32 head)'}": step_layers(model, fmt, head) for fmt, head in variants}
        for batch in batches:
            inputs = {}
            for layers in steps.values():
                for layer in layers:
                    inputs.setdefault(layer.in_features, torch.randn(batch, layer.in_features))

            def step(layers, inputs=inputs):
                for layer in layers:
                    layer(inputs[layer.in_features])

            calls = {name: [lambda layers=layers: step(layers)] for name, layers in steps.items()}
            times = best_pass_us(calls, rounds)
            fp32 = times["fp32"]
            for name, us in times.items():
                read = sum(layer_bytes(layer) for layer in steps[name])
                ceiling_us = read / bandwidth / 1e3
                rows.append(
                    {
                        "model": model,
                        "threads": threads,
                        "batch": batch,
                        "format": name,
                        "ms": us / 1e3,
                        "speedup": fp32 / us,
                        "bytes": read,
                        "gbs": read / us / 1e3,
                        "ceiling_ms": ceiling_us / 1e3,
                        "ceiling_speedup": fp32 / ceiling_us,
                    }
                )
                print(
                    f"{model} t{threads} b{batch} {name}: {us / 1e3:.2f} ms ({fp32 / us:.2f}x), {read / us / 1e3:.1f} GB/s"
                )
        del steps
    return rows


def time_crossover(batches: list[int], rounds: int) -> list[dict]:
    """The kernels (best build) against dequantize + oneDNN as the rows of x grow."""
    rows = []
    for in_features, out_features in [(768, 3072), (3072, 768), (768, 50257)]:
        layers = {
            fmt: [cls.from_linear(linear(in_features, out_features, seed), **extra) for seed in range(copies)]
            for fmt, cls, extra, copies in (
                ("int8", Int8Linear, {}, 3),
                ("int4", Int4Linear, {"group_size": group_for(in_features)}, 5),
            )
        }
        for batch in batches:
            x = torch.randn(batch, in_features)
            calls = {}
            for fmt, group in layers.items():
                for path in ("avx512", "avx2", "torch"):
                    products = [forced(path, q) for q in group]
                    calls[f"{fmt}-{path}"] = [lambda product=product, x=x: product(x) for product in products]
            times = best_pass_us(calls, rounds)
            rows.append({"in": in_features, "out": out_features, "batch": batch, "us": times})
            print(
                f"crossover {in_features}->{out_features} b{batch}: "
                + ", ".join(f"{m} {t:.0f}" for m, t in times.items())
            )
    return rows


def quality(args) -> dict:
    """Held-out perplexity of a small pretrained model: fp32, INT8 and INT4 (groups of 64, as
    SmolLM takes, and 32), each with the head quantized and kept in fp32."""
    torch.set_num_threads(args.threads)
    import copy
    import tempfile

    from finetune_base import pretrain_base

    from genforge.checkpoint import load_model
    from genforge.evaluate import perplexity
    from genforge.quantize.weight_only import quantize_weights
    from genforge.quickstart import stdlib_source_files
    from genforge.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="quantize-kernels-") as scratch:
        base = pretrain_base(
            Path(scratch), args.corpus_bytes, args.vocab, args.hidden, args.layers, args.pretrain_steps
        )
        model = load_model(scratch).eval()
        tokenizer = Tokenizer.from_dir(scratch)
    trained = set(stdlib_source_files(args.corpus_bytes))
    held_out = [p for p in stdlib_source_files(args.corpus_bytes * 2) if p not in trained]
    ids: list[int] = []
    for path in held_out:
        ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        if len(ids) >= args.held_out_tokens:
            break
    ids_tensor = torch.tensor(ids[: args.held_out_tokens])

    def ppl(m: nn.Module) -> float:
        with torch.inference_mode():
            return perplexity(m, ids_tensor, max_length=128, stride=128, show_progress=False).perplexity

    rows = [{"format": "fp32", "ppl": ppl(model)}]
    for method, group in (("int8", 128), ("int4", 64), ("int4", 32)):
        for head in (True, False):
            quantized = copy.deepcopy(model)
            quantize_weights(quantized, method, group, exclude=() if head else ("lm_head",))
            name = method if method == "int8" else f"int4 g{group}"
            rows.append({"format": name + ("" if head else " (fp32 head)"), "ppl": ppl(quantized)})
    for row in rows:
        row["vs_fp32"] = row["ppl"] / rows[0]["ppl"]
        print(f"quality {row['format']}: ppl {row['ppl']:.3f} ({row['vs_fp32']:.4f}x)")
    base = {k: v for k, v in base.items() if k != "files"}
    return {"base": base, "held_out_tokens": len(ids_tensor), "rows": rows}


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        "# Weight-only INT8/INT4 kernels against fp32",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_capability']}), {machine['cores']} CPUs, {machine['threads']} "
        f"torch thread(s), torch {machine['torch']}. Load average (1 min) {result['load_before']:.1f} before and "
        f"{result['load_after']:.1f} after: the machine was shared, so compare within this run. Streaming read "
        f"bandwidth {result['bandwidth_gbs']:.1f} GB/s (the sum of a 512 MiB tensor).",
        "",
        "## One product (microseconds per call, ratio to fp32)",
        "",
        "Each call reads its weight from memory (copies rotated past the 32 MiB L3; the methods 3-40x slower "
        f"than fp32 use two copies). INT4 in groups of {GROUP_SIZE} (64 where 128 does not divide the inputs, "
        "as SmolLM's 576). fbgemm's dynamic INT8 quantizes the activations too (not weight-only).",
        "",
    ]
    methods = list(result["shapes"][0]["us"])
    lines += ["| in -> out | batch | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for row in result["shapes"]:
        cells = [
            "n/a"
            if m not in row["vs_fp32"]
            else f"{row['us'][m]:.0f}"
            if m == "fp32"
            else f"{row['us'][m]:.0f} ({row['vs_fp32'][m]:.2f}x)"
            for m in methods
        ]
        lines.append(f"| {row['in']} -> {row['out']} | {row['batch']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## A whole decode step's products",
        "",
        "Every linear layer of the model once (GPT-2: 12 blocks of qkv, o, up, down and the 50257 x 768 head; "
        "SmolLM-135M: 30 blocks of qkv, o, gate/up, down and the 49152 x 576 head), through the layer modules. "
        "Ceiling: the bytes the step's weights take over the streaming bandwidth; its speed-up is fp32's "
        "measured time over that ceiling.",
        "",
        "| model | threads | batch | format | ms | speed-up | GB/s | weight bytes | ceiling ms | ceiling speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["steps"]:
        lines.append(
            f"| {row['model']} | {row['threads']} | {row['batch']} | {row['format']} | {row['ms']:.2f} | {row['speedup']:.2f}x | "
            f"{row['gbs']:.1f} | {row['bytes'] / 1e6:.0f} MB | {row['ceiling_ms']:.2f} | {row['ceiling_speedup']:.2f}x |"
        )
    lines += [
        "",
        "## Where the kernels stop paying (microseconds per call)",
        "",
        "`torch` is the pure-torch path: dequantize the weight, then oneDNN's fp32 product.",
        "",
    ]
    cross = list(result["crossover"][0]["us"])
    lines += ["| in -> out | batch | " + " | ".join(cross) + " |", "|---|---|" + "---|" * len(cross)]
    for row in result["crossover"]:
        lines.append(
            f"| {row['in']} -> {row['out']} | {row['batch']} | "
            + " | ".join(f"{row['us'][m]:.0f}" for m in cross)
            + " |"
        )
    if result.get("quality"):
        q = result["quality"]
        lines += [
            "",
            "## What quantizing the head costs",
            "",
            f"Held-out perplexity ({q['held_out_tokens']:,} tokens of standard-library source the model did not "
            f"train on) of a {q['base']['parameters'] / 1e6:.2f}M-parameter Llama-style model (hidden "
            f"{q['base']['hidden']}, {q['base']['layers']} layers, vocabulary {q['base']['vocab']}, tied head) "
            f"pretrained for {q['base']['steps']} steps. Round-to-nearest.",
            "",
            "| format | perplexity | vs fp32 |",
            "|---|---|---|",
        ]
        lines += [f"| {r['format']} | {r['ppl']:.3f} | {r['vs_fp32']:.4f}x |" for r in q["rows"]]
    lines += [
        "",
        f"Whole script: {result['seconds']:.0f}s. Reproduce: `PYTHONPATH=src python benchmarks/quantize_kernels.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--step-threads",
        type=int,
        nargs="+",
        default=[2, 1],
        help="thread counts for the whole-step timing (1 is steadier on a shared machine)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per method; the fastest counts")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--crossover-batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--no-quality", action="store_true", help="skip the perplexity of a pretrained model")
    parser.add_argument("--corpus-bytes", type=int, default=1_500_000)
    parser.add_argument("--held-out-tokens", type=int, default=16_384)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=192)  # MLP 512: groups of 64 divide every layer
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not kernels.native_available():
        raise SystemExit("the quantized kernels did not build here; nothing to measure against")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    bandwidth = stream_bandwidth_gbs()
    print(f"streaming bandwidth {bandwidth:.1f} GB/s", flush=True)
    methods = list(product_factories())
    result = {
        "machine": describe() | {"cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "load_before": load_before,
        "bandwidth_gbs": bandwidth,
        "group_size": GROUP_SIZE,
        "shapes": time_shapes(methods, args.batches, args.rounds),
        "steps": [
            row for threads in args.step_threads for row in time_steps(args.batches, args.rounds, bandwidth, threads)
        ],
    }
    torch.set_num_threads(args.threads)
    result["crossover"] = time_crossover(args.crossover_batches, args.rounds)
    result["bandwidth_gbs_after"] = stream_bandwidth_gbs()
    if not args.no_quality:
        result["quality"] = quality(args)
    result["load_after"] = os.getloadavg()[0]
    result["seconds"] = time.perf_counter() - started
    result["median_fp32_gbs"] = statistics.median(row["fp32_gbs"] for row in result["shapes"])
    text = markdown(result)
    print(text)
    if not args.no_write:
        write_results(args.out, "quantize_kernels", result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
