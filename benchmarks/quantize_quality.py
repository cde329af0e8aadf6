"""Held-out perplexity of a small model after weight quantization: fp32, round-to-nearest
INT8 and INT4 (groups of 32, 64, 128), GPTQ, AWQ and quantization-aware training INT4.

The model is made on the spot (nothing is downloaded): a byte-level BPE tokenizer and a small
Llama-style decoder pretrained on a deterministic sample of the Python standard library's
source, as `benchmarks/finetune_base.py` makes its base, with an MLP width that every INT4
group size divides. Held-out text is standard-library files the model was not trained on;
calibration rows (GPTQ, AWQ) come from the training text. Quantized weights are evaluated as
their dequantized values in an fp32 copy of the model (what an INT4 layer computes).

    python benchmarks/quantize_quality.py            # about 15 minutes on 2 shared CPU cores
    python benchmarks/quantize_quality.py --quick    # a smaller, shorter run
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from machine import describe, write_results

from genforge.config import Config
from genforge.evaluate.perplexity import perplexity
from genforge.model import Transformer
from genforge.quantize.awq import awq_quantize_model
from genforge.quantize.gptq import gptq_quantize_model
from genforge.quantize.grid import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from genforge.quantize.qat import convert_qat, prepare_qat
from genforge.quickstart import stdlib_source_files
from genforge.train import TokenDataset, TrainConfig, Trainer
from genforge.train.tokenizer_training import train_tokenizer

HELD_OUT_FILES = 12


def block_linears(model: Transformer) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)}


def with_weights(model: Transformer, weights: dict[str, torch.Tensor]) -> Transformer:
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in weights.items():
            copied.get_submodule(name).weight.copy_(weight)
    return copied


def train(model: Transformer, ids: list[int], seq_len: int, steps: int, lr: float, seed: int) -> float:
    with tempfile.TemporaryDirectory(prefix="quantize-quality-") as scratch:
        config = TrainConfig(
            out_dir=Path(scratch),
            max_steps=steps,
            batch_size=16,
            lr=lr,
            warmup_steps=max(1, steps // 20),
            seed=seed,
            progress=False,
            export=False,
        )
        return Trainer(model, TokenDataset(ids, seq_len), config).train().losses[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-bytes", type=int, default=1_500_000)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=384, help="MLP width (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--qat-steps", type=int, default=100, help="QAT and the matching fp fine-tune")
    parser.add_argument("--calibration-rows", type=int, default=64)
    parser.add_argument("--held-out-tokens", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smaller model and shorter training")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.corpus_bytes, args.pretrain_steps, args.qat_steps, args.layers = 400_000, 120, 30, 2
        args.calibration_rows, args.held_out_tokens = 16, 8_000

    started = time.perf_counter()
    files = stdlib_source_files(args.corpus_bytes)
    train_files, held_out_files = files[:-HELD_OUT_FILES], files[-HELD_OUT_FILES:]
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in train_files]
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab, model_max_length=args.seq_len).tokenizer

    def encode(paths_or_texts) -> list[int]:
        ids: list[int] = []
        for text in paths_or_texts:
            ids.extend(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
        return ids

    train_ids = encode(texts)
    held_out = encode(p.read_text(encoding="utf-8", errors="replace") for p in held_out_files)[: args.held_out_tokens]
    config = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    base = Transformer(config)
    pretrain_loss = train(base, train_ids, args.seq_len, args.pretrain_steps, 1e-2, args.seed)
    base.eval()
    pretrain_seconds = time.perf_counter() - started

    def ppl(model: Transformer) -> float:
        return perplexity(model, held_out, max_length=args.seq_len, show_progress=False).perplexity

    ids = torch.tensor(train_ids)
    starts = torch.linspace(0, ids.numel() - args.seq_len - 1, args.calibration_rows).long().tolist()
    calibration = [ids[s : s + args.seq_len] for s in starts]

    rows: list[dict] = []

    def record(method: str, bits: str, group: int | None, model: Transformer, seconds: float) -> None:
        value = ppl(model)
        rows.append({"method": method, "bits": bits, "group_size": group, "perplexity": value, "seconds": seconds})
        print(f"{method:>22} {bits:>5} {str(group or '-'):>5}  ppl {value:8.3f}  ({seconds:.1f} s)", flush=True)

    record("fp32", "32", None, base, 0.0)
    linears = block_linears(base)
    t = time.perf_counter()
    int8 = {n: dequantize_int8(quantize_int8(m.weight)) for n, m in linears.items()}
    record("RTN INT8", "8", None, with_weights(base, int8), time.perf_counter() - t)
    for group in (32, 64, 128):
        t = time.perf_counter()
        int4 = {n: dequantize_int4(quantize_int4(m.weight, group)) for n, m in linears.items()}
        record("RTN INT4", "4", group, with_weights(base, int4), time.perf_counter() - t)
    for group in (32, 128):
        model = copy.deepcopy(base)
        t = time.perf_counter()
        gptq_quantize_model(model, calibration, group_size=group)
        record("GPTQ INT4", "4", group, model, time.perf_counter() - t)
        model = copy.deepcopy(base)
        t = time.perf_counter()
        awq_quantize_model(model, calibration, group_size=group)
        record("AWQ INT4", "4", group, model, time.perf_counter() - t)

    # QAT against its fair baseline: the same extra training steps in fp, then RTN.
    fine_tuned = copy.deepcopy(base).train()
    t = time.perf_counter()
    train(fine_tuned, train_ids, args.seq_len, args.qat_steps, 3e-3, args.seed + 1)
    fine_tuned.eval()
    record(f"fp32 +{args.qat_steps} steps", "32", None, fine_tuned, time.perf_counter() - t)
    int4 = {n: dequantize_int4(quantize_int4(m.weight, 128)) for n, m in block_linears(fine_tuned).items()}
    record(f"fp32 +{args.qat_steps} steps, RTN INT4", "4", 128, with_weights(fine_tuned, int4), 0.0)
    qat = copy.deepcopy(base).train()
    t = time.perf_counter()
    prepare_qat(qat, group_size=128)
    train(qat, train_ids, args.seq_len, args.qat_steps, 3e-3, args.seed + 1)
    grids = convert_qat(qat)
    qat.eval()
    record(
        f"QAT INT4 ({args.qat_steps} steps)",
        "4",
        128,
        with_weights(qat, {n: dequantize_int4(g) for n, g in grids.items()}),
        time.perf_counter() - t,
    )

    fp32 = rows[0]["perplexity"]
    for row in rows:
        row["vs_fp32"] = row["perplexity"] / fp32 - 1
    result = {
        "machine": describe(),
        "model": {
            "parameters": config.num_parameters(),
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "vocab": tokenizer.vocab_size,
            "pretrain_steps": args.pretrain_steps,
            "pretrain_final_loss": pretrain_loss,
            "pretrain_seconds": pretrain_seconds,
        },
        "held_out_tokens": len(held_out),
        "calibration_rows": len(calibration),
        "seq_len": args.seq_len,
        "quantized": "the blocks' linear layers; embeddings and the tied head stay fp32",
        "rows": rows,
    }
    lines = [
        "# Weight quantization: held-out perplexity",
        "",
        f"A {config.num_parameters():,}-parameter Llama-style model ({args.layers} layers, hidden {args.hidden}), "
        f"pretrained {args.pretrain_steps} steps on standard-library source; perplexity on {len(held_out):,} tokens "
        f"of held-out standard-library files; GPTQ/AWQ calibrated on {len(calibration)} rows of {args.seq_len} "
        "training tokens. The blocks' linear layers are quantized; embeddings and the tied head stay fp32.",
        "",
        "| method | bits | group | perplexity | vs fp32 | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['bits']} | {row['group_size'] or '-'} | {row['perplexity']:.3f} | "
            f"{row['vs_fp32']:+.2%} | {row['seconds']:.1f} |"
        )
    machine = result["machine"]
    lines += ["", f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}."]
    name = "quantize_quality_quick" if args.quick else "quantize_quality"
    write_results(args.out, name, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
