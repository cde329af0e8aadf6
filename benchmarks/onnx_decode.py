"""Decode throughput: genforge against onnxruntime running genforge's ONNX export of the same model.

The two shapes of `decode.py` (GPT-2 124M and SmolLM 135M, random weights, fp32), each
exported with `genforge.quantize.onnx_export.export_onnx` (logits for the last position only,
what generation reads, as genforge's `logits_to_keep=1`). Batch 1, a 128-token prompt and 128
greedy new tokens on `--threads` threads. genforge runs as `decode.py` runs it (weights packed
for oneDNN, `generate.generator.stream`); onnxruntime runs the graph in a greedy loop with IO
binding: each step's presents stay onnxruntime values and are bound as the next step's past,
never copied to numpy (and its threads do not spin between runs, where genforge's threads run). Both run in the same process, alternating, and the median of
`--repeats` runs is kept; the greedy tokens of the two are compared too.

    python benchmarks/onnx_decode.py               # writes benchmarks/results/onnx_decode.{json,md}
    python benchmarks/onnx_decode.py --threads 1   # ... onnx_decode_1threads.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from decode import SHAPES, genforge_generate, weight_bytes
from machine import describe, write_results

from genforge.checkpoint import load_model
from genforge.inference import pack_for_cpu_inference
from genforge.quantize.onnx_export import export_onnx


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's threads spin between runs by default; genforge's threads run in the same
    # process in between, on the same cores, and would be slowed by them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_generate(session: ort.InferenceSession, prompt: np.ndarray, new_tokens: int, timings=None) -> list[int]:
    """Greedy tokens from the graph; `timings` gets (prefill seconds, seconds of the remaining steps)."""
    past_inputs = session.get_inputs()[2:]
    present_names = [o.name for o in session.get_outputs()[1:]]
    batch = prompt.shape[0]
    binding = session.io_binding()
    start = time.perf_counter()
    past = [
        ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)) for i in past_inputs
    ]
    step_ids, length, tokens, first = prompt, prompt.shape[1], [], None
    for _ in range(new_tokens):
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(step_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((batch, length), np.int64))
        for graph_input, value in zip(past_inputs, past):
            binding.bind_ortvalue_input(graph_input.name, value)
        binding.bind_output("logits", "cpu")
        for name in present_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        logits, *past = binding.get_outputs()
        token = int(logits.numpy()[0, -1].argmax())
        tokens.append(token)
        if first is None:
            first = time.perf_counter()
        step_ids, length = np.array([[token]]), length + 1
    if timings is not None:
        timings.append((first - start, time.perf_counter() - first))
    return tokens


def run(shape: str, prompt_len: int, new_tokens: int, repeats: int, threads: int, workdir: Path) -> dict:
    config = SHAPES[shape]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model_dir = workdir / shape
    hf.save_pretrained(model_dir)
    del hf
    start = time.perf_counter()
    exported = export_onnx(model_dir, workdir / f"{shape}.onnx", last_logits_only=True)
    export_seconds = time.perf_counter() - start
    ours = load_model(model_dir)
    weights = weight_bytes(ours)
    pack_for_cpu_inference(ours)
    session = ort_session(exported.path, threads)

    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        genforge_tokens = genforge_generate(ours, prompt, new_tokens)[0].tolist()
    ort_tokens = ort_generate(session, prompt.numpy(), new_tokens)
    differ = [i for i, (a, b) in enumerate(zip(genforge_tokens, ort_tokens)) if a != b]
    for _ in range(2):  # warm-up: thread pools, oneDNN's kernel choice, onnxruntime's allocations
        with torch.inference_mode():
            genforge_generate(ours, prompt, 8)
        ort_generate(session, prompt.numpy(), 8)

    gf_times, ort_times, gf_steps, ort_steps = [], [], [], []
    # Alternate, so that a machine changing pace hits both alike.
    for _ in range(repeats):
        with torch.inference_mode():
            start = time.perf_counter()
            genforge_generate(ours, prompt, new_tokens, gf_steps)
            gf_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ort_generate(session, prompt.numpy(), new_tokens, ort_steps)
        ort_times.append(time.perf_counter() - start)
    gf_tps = new_tokens / statistics.median(gf_times)
    ort_tps = new_tokens / statistics.median(ort_times)
    row = {
        "model": shape,
        "batch": 1,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "genforge_tokens_per_s": round(gf_tps, 2),
        "onnxruntime_tokens_per_s": round(ort_tps, 2),
        "onnxruntime_over_genforge": round(ort_tps / gf_tps, 3),
        "genforge_prefill_ms": round(statistics.median(first for first, _ in gf_steps) * 1e3, 1),
        "onnxruntime_prefill_ms": round(statistics.median(first for first, _ in ort_steps) * 1e3, 1),
        "genforge_decode_step_ms": round(statistics.median(rest for _, rest in gf_steps) / (new_tokens - 1) * 1e3, 2),
        "onnxruntime_decode_step_ms": round(
            statistics.median(rest for _, rest in ort_steps) / (new_tokens - 1) * 1e3, 2
        ),
        "greedy_tokens_identical": not differ,
        "first_differing_token": differ[0] if differ else None,
        "onnx_bytes": exported.num_bytes,
        "weight_bytes": weights,
        "export_seconds": round(export_seconds, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model", action="append", choices=list(SHAPES), help="shapes (default all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The load average says whether other jobs shared the cores: genforge's OpenMP threads slow
    # down far more than onnxruntime's pool when the cores are oversubscribed.
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        rows = [
            run(shape, args.prompt_tokens, args.new_tokens, args.repeats, args.threads, Path(workdir))
            for shape in args.model or list(SHAPES)
        ]
    result = {
        "machine": describe(onnxruntime=ort.__version__, transformers=transformers.__version__),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "results": rows,
    }
    lines = [
        f"ONNX decode benchmark on {result['machine']['cpu']}, {args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; fp32, random weights, batch 1, greedy, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens; median of {args.repeats}, the two alternating in one process. onnxruntime "
        "runs genforge's ONNX export (last-position logits) with IO binding. Load average (1 min) "
        f"{result['load_average_1min']['before']} before, {result['load_average_1min']['after']} after "
        f"on {result['machine']['cores']} cores.",
        "",
        "| model | genforge tok/s | onnxruntime tok/s | onnxruntime / genforge | genforge step ms | "
        "onnxruntime step ms | genforge prefill ms | onnxruntime prefill ms | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "yes" if r["greedy_tokens_identical"] else f"from token {r['first_differing_token']} on, no"
        lines.append(
            f"| {r['model']} | {r['genforge_tokens_per_s']:.1f} | {r['onnxruntime_tokens_per_s']:.1f} | "
            f"{r['onnxruntime_over_genforge']:.2f}x | {r['genforge_decode_step_ms']} | "
            f"{r['onnxruntime_decode_step_ms']} | {r['genforge_prefill_ms']} | {r['onnxruntime_prefill_ms']} | {same} |"
        )
    markdown = "\n".join(lines) + "\n"
    # The default (2 threads) is the comparison; other thread counts are written beside it.
    name = "onnx_decode" if args.threads == 2 else f"onnx_decode_{args.threads}threads"
    write_results(args.out, name, result, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
