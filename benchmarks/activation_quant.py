"""Activation quantization of one 768 x 3072 product (GPT-2's MLP up-projection): the error of
each method against fp32 and its time at batch 1 and 64 against fp32 `F.linear`, with
torch.ao's dynamic linear and bitsandbytes' Linear8bitLt as the peers, and NF4 (weight-only)
for the weight-versus-activation trade.

Inputs are N(0, 1) with three channels scaled 20x in every row ("outlier channels", as large
models' hidden states have), and plain N(0, 1). Static and SmoothQuant calibrate on other rows
of the same distribution. Every time is the median of repeated calls, all in one run, so the
ratios compare like with like; the machine may be shared, so absolute times are indicative.

    PYTHONPATH=src:benchmarks python benchmarks/activation_quant.py
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from machine import describe, write_results
from torch import nn

from genforge.onednn import linear as onednn_linear
from genforge.quantize import NF4Linear
from genforge.quantize.llm_int8 import Int8MixedLinear
from genforge.quantize.observers import make_observer
from genforge.quantize.smoothquant import smoothing_factors
from genforge.quantize.w8a8 import DynamicInt8Linear, StaticInt8Linear

IN_FEATURES, OUT_FEATURES = 768, 3072
OUTLIER_CHANNELS = [7, 300, 611]
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def inputs(rows: int, outliers: bool, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN_FEATURES, generator=generator)
    if outliers:
        x[:, OUTLIER_CHANNELS] *= 20
    return x


def median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(linear: nn.Linear, calibration: torch.Tensor) -> dict:
    """name -> (module, input transform): SmoothQuant divides the input by its factors, which a
    model folds into the norm before the layer (no run-time cost)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_ao = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]
    observer = make_observer("minmax")
    observer.observe(calibration)
    bitsandbytes = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, has_fp16_weights=False, threshold=6.0)
    bitsandbytes.load_state_dict(linear.state_dict())
    bitsandbytes = bitsandbytes.to("cpu").eval()
    factors = smoothing_factors(calibration.abs().amax(dim=0), [linear.weight])
    smoothed = nn.Linear(IN_FEATURES, OUT_FEATURES)
    with torch.no_grad():
        smoothed.weight.copy_(linear.weight * factors)
        smoothed.bias.copy_(linear.bias)
    smooth_observer = make_observer("minmax")
    smooth_observer.observe(calibration / factors)
    same = lambda x: x  # noqa: E731
    return {
        "fp32 F.linear": (linear, same),
        "fp32 oneDNN (genforge.onednn.linear)": (lambda x: onednn_linear(x, linear.weight, linear.bias), same),
        "NF4 weight-only (dequantize + F.linear)": (NF4Linear.from_linear(linear), same),
        "dynamic, per token": (DynamicInt8Linear.from_linear(linear), same),
        "dynamic, per tensor (torch.ao numerics)": (
            DynamicInt8Linear.from_linear(linear, activation="per_tensor", weight_granularity="per_channel"),
            same,
        ),
        "torch.ao quantize_dynamic (fbgemm)": (torch_ao, same),
        "static, min-max": (StaticInt8Linear.from_linear(linear, observer.range()), same),
        "SmoothQuant + static, min-max": (
            StaticInt8Linear.from_linear(smoothed, smooth_observer.range()),
            lambda x: x / factors,
        ),
        "LLM.int8() (genforge)": (Int8MixedLinear.from_linear(linear), same),
        "bitsandbytes Linear8bitLt (threshold 6)": (bitsandbytes, same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="passes over all methods")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method per pass")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    rows = {}
    with torch.no_grad():
        for outliers in (True, False):
            # Static and SmoothQuant calibrate on other rows of the same kind of input.
            methods = build(linear, inputs(256, outliers, seed=1))
            x = inputs(64, outliers, seed=2)
            exact = F.linear(x, linear.weight, linear.bias)
            for name, (module, transform) in methods.items():
                error = float((module(transform(x)).float() - exact).norm() / exact.norm())
                rows.setdefault(name, {"method": name})["error_outliers" if outliers else "error_plain"] = error
        # Timing: rounds over every method in turn, so that load from other processes falls
        # on all of them alike; the median per method over the rounds.
        for batch in (1, 64):
            x = inputs(batch, outliers=True, seed=3)
            calls = {name: (module, transform(x)) for name, (module, transform) in methods.items()}
            times = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, (module, given) in calls.items():
                    times[name].append(median_seconds(lambda m=module, g=given: m(g), args.repeats))
            for name in calls:
                rows[name][f"us_batch_{batch}"] = 1e6 * statistics.median(times[name])
    rows = list(rows.values())
    base = rows[0]
    for row in rows:
        for batch in (1, 64):
            row[f"vs_fp32_batch_{batch}"] = base[f"us_batch_{batch}"] / row[f"us_batch_{batch}"]
    lines = [
        "| method | error, outlier channels | error, plain | batch 1 (us) | vs fp32 | batch 64 (us) | vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['error_outliers']:.4f} | {row['error_plain']:.4f} | "
            f"{row['us_batch_1']:.0f} | {row['vs_fp32_batch_1']:.2f}x | {row['us_batch_64']:.0f} | "
            f"{row['vs_fp32_batch_64']:.2f}x |"
        )
    machine = describe(bitsandbytes=bnb.__version__)
    markdown = (
        "\n".join(lines) + f"\n\nMachine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}.\n"
    )
    print(markdown)
    write_results(args.out, "activation_quant", {"machine": machine, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
