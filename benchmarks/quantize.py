"""Decode speed of quantized models: genforge's quantized layers against llama.cpp's GGUF types.

Two model shapes with random weights (benchmarks/decode.py's): GPT-2 124M and SmolLM 135M (a
Llama). For each, a 128-token prompt and 128 greedy new tokens at batch 1 on `--threads`
threads, timed as decode.py times them (tokens/s over the whole request, prefill included;
the decode step alone beside it):

- genforge fp32 (the model as loaded, packed for the CPU), then each quantized variant of
  `GENFORGE_VARIANTS`, each quantized with `quantize.methods.quantize_model`, saved with
  `save_quantized`, loaded back with `load_quantized` and packed, as `genforge generate` runs it;
- llama.cpp through llama-cpp-python on the same model written by `genforge export gguf` at
  f32, q8_0 and q4_0. GGUF export writes the Llama family only, so these rows are for SmolLM;
  they are skipped, with a note, where `llama_cpp` is not installed.

Every variant of a shape is loaded first and the runs then alternate between them, so a
machine changing pace hits them alike; the median of `--repeats` runs is kept. Sizes are the
bytes of the saved tensors (genforge) and of the .gguf file (llama.cpp, which also holds the
vocabulary). Random weights make the tokens meaningless; the f32 rows check that genforge and
llama.cpp pick the same first greedy tokens, so that both compute the same model.

    PYTHONPATH=src python benchmarks/quantize.py            # writes benchmarks/results/quantize.{json,md}
    PYTHONPATH=src python benchmarks/quantize.py --quick    # a short check of every code path
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from decode import SHAPES, genforge_generate
from machine import describe, write_results

from genforge.checkpoint import load_model
from genforge.inference import pack_for_cpu_inference
from genforge.quantize.gguf_export import export_gguf
from genforge.quantize.methods import QuantizeOptions, model_bytes, quantize_model
from genforge.quantize.saved import load_quantized, save_quantized

# genforge's quantized variants: label -> quantize.methods method name.
GENFORGE_VARIANTS = {"int8": "int8", "int4": "int4", "nf4": "nf4"}
# llama.cpp's GGUF types, written by `genforge export gguf`.
GGUF_TYPES = ("f32", "q8_0", "q4_0")
# The shapes GGUF export writes (the Llama family).
GGUF_SHAPES = ("smollm-135m",)
# Greedy tokens compared between genforge fp32 and llama.cpp f32.
CHECKED_TOKENS = 8


def llama_cpp_module():
    """`llama_cpp`, or None where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def byte_level_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer (GGUF export writes the tokenizer into the file); the
    model's larger embedding is padded with unused tokens. Prompts are token ids, so its
    vocabulary does not matter beyond being one llama.cpp reads."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from genforge.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([Path(statistics.__file__).read_text(encoding="utf-8")], trainer)
    special = "<|endoftext|>"
    return Tokenizer(backend, {"bos_token": special, "eos_token": special})


class GenforgeRunner:
    """A genforge model, packed for the CPU, run as decode.py runs it."""

    def __init__(self, model, size_bytes: int) -> None:
        self.model, self.size_bytes = model, size_bytes

    def run(self, prompt: torch.Tensor, new_tokens: int, timings: list) -> list[int]:
        with torch.inference_mode():
            return genforge_generate(self.model, prompt, new_tokens, timings)[0].tolist()


class LlamaCppRunner:
    """A GGUF file in llama.cpp (llama-cpp-python), greedy, the whole prompt in one batch."""

    def __init__(self, llama_cpp, path: Path, threads: int, context: int) -> None:
        self.size_bytes = path.stat().st_size
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=context,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    def run(self, prompt: torch.Tensor, new_tokens: int, timings: list) -> list[int]:
        self.llm.reset()  # no reuse of the previous run's cached prompt
        tokens = []
        start = time.perf_counter()
        first = None
        for token in self.llm.generate(prompt[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0):
            tokens.append(token)
            if first is None:
                first = time.perf_counter()
            if len(tokens) == new_tokens:
                break
        timings.append((first - start, time.perf_counter() - first))
        return tokens


def build_runners(shape: str, directory: Path, threads: int, context: int, llama_cpp, notes: list) -> dict:
    """Every variant of `shape`, by label: genforge fp32 and quantized, llama.cpp per GGUF type."""
    config = SHAPES[shape]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model_dir = directory / shape
    hf.save_pretrained(model_dir)
    del hf
    byte_level_tokenizer().save(model_dir)
    fp32 = load_model(model_dir)
    runners = {}
    for label, method in GENFORGE_VARIANTS.items():
        quantized = copy.deepcopy(fp32)
        # INT4's largest group that divides every layer: 128 for GPT-2, 64 for SmolLM's 576 features.
        group = 128 if all(m.in_features % 128 == 0 for m in quantized.modules() if hasattr(m, "in_features")) else 64
        quantize_model(quantized, method, options=QuantizeOptions(group_size=group if method == "int4" else None))
        saved = save_quantized(quantized, directory / f"{shape}-{label}", method=method)
        del quantized
        loaded = load_quantized(saved)  # as `genforge generate` loads it
        size = model_bytes(loaded)  # counted before packing hides the fp weights in opaque buffers
        runners[f"genforge {label}"] = GenforgeRunner(pack_for_cpu_inference(loaded), size)
    size = model_bytes(fp32)
    runners = {"genforge fp32": GenforgeRunner(pack_for_cpu_inference(fp32), size)} | runners
    if shape not in GGUF_SHAPES:
        notes.append(f"{shape}: no llama.cpp rows; genforge's GGUF export writes the Llama family only")
    elif llama_cpp is None:
        notes.append(f"{shape}: no llama.cpp rows; llama-cpp-python (`import llama_cpp`) is not installed")
    else:
        for gguf_type in GGUF_TYPES:
            path = export_gguf(model_dir, directory / f"{shape}-{gguf_type}.gguf", gguf_type).path
            runners[f"llama.cpp {gguf_type}"] = LlamaCppRunner(llama_cpp, path, threads, context)
    return runners


def run(shape: str, args, llama_cpp, notes: list) -> list[dict]:
    config = SHAPES[shape]
    context = args.prompt_tokens + args.new_tokens
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as directory:
        runners = build_runners(shape, Path(directory), args.threads, context, llama_cpp, notes)
        first_tokens = {label: runner.run(prompt, CHECKED_TOKENS, []) for label, runner in runners.items()}
        times = {label: [] for label in runners}
        steps = {label: [] for label in runners}
        for runner in runners.values():  # one untimed run each
            runner.run(prompt, args.new_tokens, [])
        for _ in range(args.repeats):
            for label, runner in runners.items():
                start = time.perf_counter()
                runner.run(prompt, args.new_tokens, steps[label])
                times[label].append(time.perf_counter() - start)
    baseline = args.new_tokens / statistics.median(times["genforge fp32"])
    rows = []
    for label, runner in runners.items():
        tokens_per_s = args.new_tokens / statistics.median(times[label])
        row = {
            "model": shape,
            "variant": label,
            "tokens_per_s": round(tokens_per_s, 2),
            "vs_genforge_fp32": round(tokens_per_s / baseline, 3),
            "prefill_ms": round(statistics.median(first for first, _ in steps[label]) * 1e3, 1),
            "decode_step_ms": round(
                statistics.median(rest for _, rest in steps[label]) / (args.new_tokens - 1) * 1e3, 2
            ),
            "size_mb": round(runner.size_bytes / 1e6, 1),
        }
        if label == "llama.cpp f32":
            row["same_first_tokens_as_genforge_fp32"] = first_tokens[label] == first_tokens["genforge fp32"]
        print(row, flush=True)
        rows.append(row)
    return rows


def markdown(result: dict, args) -> str:
    machine = result["machine"]
    lines = [
        f"Quantized decode on {machine['cpu']}, {args.threads} threads, torch {machine['torch']}, llama-cpp-python "
        f"{machine['llama_cpp']}; random weights, batch 1, greedy, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens; median of {args.repeats}, variants alternating. tokens/s is over the whole "
        "request (prefill included); size is the saved tensors (genforge) or the .gguf file (llama.cpp).",
        "",
        "| model | variant | tokens/s | vs genforge fp32 | prefill ms | decode step ms | size MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['vs_genforge_fp32']:.2f}x | "
            f"{r['prefill_ms']} | {r['decode_step_ms']} | {r['size_mb']} |"
        )
    checks = [r for r in result["results"] if "same_first_tokens_as_genforge_fp32" in r]
    for r in checks:
        lines.append(
            f"\n{r['model']}: llama.cpp f32 and genforge fp32 pick the same first {CHECKED_TOKENS} greedy tokens: "
            f"{r['same_first_tokens_as_genforge_fp32']}."
        )
    lines += [f"\nNote: {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model", action="append", choices=list(SHAPES), help="shapes (default all)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short check of every code path: 16-token prompt, 8 new tokens, one repeat; writes quantize-quick.*",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 16, 8, 1
    torch.set_num_threads(args.threads)
    llama_cpp = llama_cpp_module()
    notes: list[str] = []
    rows = []
    for shape in args.model or list(SHAPES):
        rows += run(shape, args, llama_cpp, notes)
    result = {
        "machine": describe(
            transformers=transformers.__version__, llama_cpp=getattr(llama_cpp, "__version__", "not installed")
        ),
        "settings": {
            "threads": args.threads,
            "batch": 1,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
        },
        "results": rows,
        "notes": notes,
    }
    text = markdown(result, args)
    write_results(args.out, "quantize-quick" if args.quick else "quantize", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
