"""Time and peak memory of one attention layer: full attention against sparse patterns, as masks
and as the banded kernel, from 512 to 8192 tokens.

Every row is one causal self-attention over random queries, keys and values (batch 1, a few
heads of a small head dimension, so that 8k tokens of full attention fit in a minute or two on
two cores):

    full-sdpa      torch's fused scaled_dot_product_attention with is_causal=True (on CPU a
                   flash-style kernel: O(n^2) time, but it never holds the n x n scores)
    full-eager     softmax(QK^T / sqrt(d) + causal mask) V written out: the n x n scores held,
                   O(n^2) time and memory, as attention is usually described
    <pattern>-mask SDPA under the pattern's boolean n x n mask (`sparse_attention.pattern_mask`),
                   built before the timing (a model builds it once per forward for all layers)
    <pattern>-kernel `sparse_attention.banded_attention`: only the band, O(n * window)

Time is the median of a few runs; memory is the growth of the process's peak resident set over
its resident set before the call (Linux: the peak is reset through /proc/self/clear_refs before
each measurement, and glibc is told to give large blocks back to the system at once, so a
freed buffer is not silently reused). The mask itself (n^2 bytes) exists before the call, so it
is not in the peak; its size is a column of its own. The slope of log(time) against log(n) over
the sizes from 1024 on is fitted per method: about 2 for full attention and the masked
patterns (a mask does not skip work), about 1 for the kernel.

    PYTHONPATH=src python benchmarks/attention_cost.py   # writes benchmarks/results/attention_cost.{json,md,png}
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe, write_results

from genforge.atomic import atomic_path
from genforge.sparse_attention import banded_attention, check_pattern, dense_pattern_mask

PATTERNS = {
    "local": {"kind": "local", "window": 256},
    "longformer": {"kind": "longformer", "window": 256, "global_tokens": 16},
    "bigbird": {"kind": "bigbird", "block_size": 64, "window_blocks": 3, "global_tokens": 64, "random_blocks": 2},
    "strided": {"kind": "strided", "stride": 128},
    "fixed": {"kind": "fixed", "stride": 128, "summary": 16},
    "dilated": {"kind": "dilated", "window": 128, "dilation": 2},
}
KERNELS = ("local", "longformer")


# ------------------------------------------------------------------------------ measuring
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth_mib(run) -> float:
    """How far the resident set rose above its level before `run()`, in MiB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def eager_causal(q, k, v):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril_()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


def methods(n: int) -> dict:
    """name -> (attention function of q, k, v; bytes of the mask it needs)."""
    table = {
        "full-sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 0),
        "full-eager": (eager_causal, 0),
    }
    for name, pattern in PATTERNS.items():
        mask = dense_pattern_mask(pattern, n, causal=True)
        table[f"{name}-mask"] = ((lambda q, k, v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m)), n * n)
    for name in KERNELS:
        pattern = check_pattern(PATTERNS[name])
        table[f"{name}-kernel"] = (
            lambda q, k, v, p=pattern: banded_attention(q, k, v, p["window"], True, p.get("global_tokens", 0)),
            0,
        )
    return table


def measure_one(attend, q, k, v, repeats: int, memory: bool) -> dict:
    """Forward and forward + backward of `attend` on (q, k, v): times, or peak memory growths."""

    def forward():
        with torch.no_grad():
            attend(q, k, v)

    def forward_backward():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        attend(*leaves).sum().backward()

    if memory:
        return {
            "forward_peak_mib": peak_growth_mib(forward),
            "forward_backward_peak_mib": peak_growth_mib(forward_backward),
        }
    return {
        "forward_ms": 1000 * median_seconds(forward, repeats),
        "forward_backward_ms": 1000 * median_seconds(forward_backward, repeats),
    }


def measure(sizes: list[int], heads: int, head_dim: int, repeats: int, memory: bool) -> list[dict]:
    """Times (memory=False) or peak memory growths (memory=True) of every method at every size."""
    rows = []
    for n in sizes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, head_dim) for _ in range(3))
        for name, (attend, mask_bytes) in methods(n).items():
            row = {"method": name, "tokens": n, "mask_mib": mask_bytes / 2**20}
            row.update(measure_one(attend, q, k, v, repeats, memory))
            rows.append(row)
            shown = {key: round(value, 1) for key, value in row.items() if key.endswith(("ms", "mib"))}
            print(n, name, shown, flush=True, file=sys.stderr)
    return rows


def memory_rows(args) -> list[dict]:
    """Peak memory growths, measured in a child process whose glibc hands every block above
    64 KiB straight to (and back from) the kernel, so that peak-RSS deltas see every buffer
    (with its default, freed buffers are kept and silently reused)."""
    command = [sys.executable, __file__, "--memory-child", "--sizes", *map(str, args.sizes)]
    command += ["--heads", str(args.heads), "--head-dim", str(args.head_dim), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout)


def fitted_slope(rows: list[dict], method: str, key: str, smallest: int) -> float | None:
    """Least-squares slope of log(key) against log(tokens) over the sizes >= `smallest`; None
    when a value is below 0.1 (a memory growth under the measurement's page-level floor)."""
    points = [(r["tokens"], r[key]) for r in rows if r["method"] == method and r["tokens"] >= smallest]
    if len(points) < 2 or min(value for _, value in points) < 0.1:
        return None
    points = [(math.log(x), math.log(y)) for x, y in points]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


# -------------------------------------------------------------------------------- reports
def plot(result: dict, path: Path) -> None:
    """Log-log time and peak memory against tokens, one line per method, slopes in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, slopes = result["rows"], result["slopes"]
    figure = Figure(figsize=(12, 5))
    FigureCanvasAgg(figure)
    for index, (key, label) in enumerate(
        (
            ("forward_backward_ms", "forward + backward time (ms)"),
            ("forward_backward_peak_mib", "peak memory growth (MiB)"),
        )
    ):
        axes = figure.add_subplot(1, 2, index + 1)
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [r for r in rows if r["method"] == method]
            style = "-" if method.startswith("full") else ("--" if method.endswith("mask") else ":")
            slope = slopes[method][key]
            suffix = f" (slope {slope:.2f})" if slope is not None else ""
            axes.plot(
                [r["tokens"] for r in points],
                [max(r[key], 1e-2) for r in points],
                style,
                marker="o",
                label=method + suffix,
                linewidth=2.5 if method.startswith("full") or method.endswith("kernel") else 1.2,
            )
        # A reference n^2 line through full-eager's first point.
        first = next(r for r in rows if r["method"] == "full-eager")
        sizes = sorted({r["tokens"] for r in rows})
        axes.plot(
            sizes,
            [max(first[key], 1e-2) * (n / sizes[0]) ** 2 for n in sizes],
            color="black",
            linewidth=0.8,
            linestyle="-.",
            label="n^2 reference",
        )
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("tokens (log scale)")
        axes.set_ylabel(label + " (log scale)")
        axes.legend(fontsize=7)
    figure.suptitle(
        f"One causal attention layer ({result['settings']['heads']} heads x {result['settings']['head_dim']}); "
        "slopes fitted from 1024 tokens on"
    )
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")


def markdown(result: dict) -> str:
    machine, settings, rows, slopes = result["machine"], result["settings"], result["rows"], result["slopes"]
    sizes = sorted({r["tokens"] for r in rows})
    lines = [
        "# Attention cost: full attention against sparse patterns",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} CPUs, {machine['threads']} torch thread(s), "
        f"torch {machine['torch']}. Shared with other jobs: compare ratios within this run, not absolute times.",
        "",
        f"One causal self-attention, batch 1, {settings['heads']} heads of dimension {settings['head_dim']}, "
        f"float32; median of {settings['repeats']} runs after a warm-up. Peak = growth of the process's peak "
        "resident set during the call (the mask, built before, is the `mask MiB` column). Slopes: "
        "log-log least squares over 1024 tokens and up.",
        "",
        "Patterns: " + "; ".join(f"{name} {pattern}" for name, pattern in PATTERNS.items()) + ".",
        "",
        "## Forward + backward time (ms)",
        "",
        "| method | " + " | ".join(str(n) for n in sizes) + " | slope |",
        "|---|" + "---:|" * (len(sizes) + 1),
    ]
    by = {(r["method"], r["tokens"]): r for r in rows}
    method_names = list(dict.fromkeys(r["method"] for r in rows))
    for method in method_names:
        cells = [f"{by[method, n]['forward_backward_ms']:.1f}" for n in sizes]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_slope(slopes[method]['forward_backward_ms'])} |")
    for title, key in (
        ("Forward time (ms)", "forward_ms"),
        ("Forward peak memory growth (MiB)", "forward_peak_mib"),
        ("Forward + backward peak memory growth (MiB)", "forward_backward_peak_mib"),
    ):
        lines += ["", f"## {title}", "", "| method | " + " | ".join(str(n) for n in sizes) + " | slope |"]
        lines.append("|---|" + "---:|" * (len(sizes) + 1))
        for method in method_names:
            cells = [f"{by[method, n][key]:.1f}" for n in sizes]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_slope(slopes[method][key])} |")
    lines += ["", "## Mask size (MiB, boolean n x n)", "", "| tokens | " + " | ".join(str(n) for n in sizes) + " |"]
    lines += ["|---|" + "---:|" * len(sizes), "| mask | " + " | ".join(f"{n * n / 2**20:.1f}" for n in sizes) + " |"]
    lines += ["", f"Total time of the benchmark: {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _slope(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier on a machine shared with other jobs)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where attention_cost.* go")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.sizes) or min(args.heads, args.head_dim, args.repeats, args.threads) < 1:
        parser.error("sizes must be >= 2 and heads, head-dim, repeats, threads >= 1")
    torch.set_num_threads(args.threads)
    args.sizes = sorted(args.sizes)
    if args.memory_child:
        print(json.dumps(measure(args.sizes, args.heads, args.head_dim, 1, memory=True)))
        return 0
    started = time.perf_counter()
    rows = measure(args.sizes, args.heads, args.head_dim, args.repeats, memory=False)
    for row, memory in zip(rows, memory_rows(args)):
        row.update(memory)
    smallest = 1024 if len([n for n in args.sizes if n >= 1024]) >= 2 else min(args.sizes)
    keys = ("forward_ms", "forward_backward_ms", "forward_peak_mib", "forward_backward_peak_mib")
    slopes = {
        method: {key: fitted_slope(rows, method, key, smallest) for key in keys}
        for method in dict.fromkeys(r["method"] for r in rows)
    }
    result = {
        "machine": describe(),
        "settings": {
            "heads": args.heads,
            "head_dim": args.head_dim,
            "repeats": args.repeats,
            "threads": args.threads,
            "patterns": PATTERNS,
        },
        "rows": rows,
        "slopes": slopes,
        "seconds": time.perf_counter() - started,
    }
    write_results(args.out, "attention_cost", result, markdown(result))
    plot(result, Path(args.out) / "attention_cost.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
