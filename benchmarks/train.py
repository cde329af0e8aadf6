"""Training-step throughput: genforge's Trainer step against a plain PyTorch loop over
transformers' `LlamaForCausalLM`, same config, same initial weights, same batch, sequence
length and AdamW settings, in one process on CPU.

One step on each side is: forward, next-token cross-entropy, backward, global-norm gradient
clipping at 1.0, an AdamW update (lr 3e-4, betas (0.9, 0.95), weight decay 0.1) and zeroing
the gradients. The plain loop is what a user would write: `model(input_ids, labels=...)`,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW` with torch's defaults (the
multi-tensor `foreach` update), `zero_grad`. genforge's step is `Trainer.train_step`, which also
splits weight-decay groups and advances the learning-rate schedule; its model stops at the final
hidden states and the LM head runs inside the loss, slice by slice, with the gradients made in
the same pass (`genforge.train.losses.fused_linear_cross_entropy`).

The two sides alternate (`--repeats` rounds of `--steps` steps each after a warm-up step,
the order swapped every round so neither side always runs first) and each keeps its median
step time; the best (minimum) round is reported too, because on a machine shared with other
jobs the median carries their load and the minimum is the closest to the code's own speed. tokens/s = batch x seq_len / step time; MFU is
6 x parameters x tokens/s over the machine's peak, for which the script measures the fp32
matrix-multiply rate of this CPU (so MFU here is "of what a large matmul reaches"), the faster of
torch's default path (MKL) and oneDNN: on AMD CPUs MKL runs AVX2 code, about half of what
oneDNN's AVX-512 code reaches, and genforge's loss uses oneDNN.
The loss of the first step is compared too: both sides train the same model on the same data.

    python benchmarks/train.py               # writes benchmarks/results/train.{json,md}
    python benchmarks/train.py --loss-only   # the LM head and loss alone, printed
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
import transformers
from machine import describe

from genforge import onednn
from genforge.atomic import atomic_write_text
from genforge.checkpoint import load_model
from genforge.train import TokenDataset, TrainConfig, Trainer

LR, BETAS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0


def llama_config(args) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def machine() -> dict:
    return describe(transformers=transformers.__version__)


def matmul_peak(size: int = 1024, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a large fp32 matmul on this CPU (best of `repeats`) through torch's default
    path (MKL) and through oneDNN where torch has it; the faster is the 'peak' MFU is measured
    against. It is sampled in every round and the best kept, so it is taken at the same
    quietest moments as the best steps."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    products = {"mkl": lambda: a @ b}
    if onednn.available():
        products["onednn"] = lambda: onednn.matmul_nt(a, b)
    rates = {}
    for name, product in products.items():
        for _ in range(2):
            product()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        rates[name] = 2 * size**3 / min(times)
    return rates


class PlainLoop:
    """The reference: transformers' model and torch's optimizer, as their docs show them."""

    def __init__(self, model: transformers.LlamaForCausalLM) -> None:
        self.model = model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LR,
            betas=BETAS,
        )

    def step(self, batch: torch.Tensor) -> float:
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    config = llama_config(args)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config)
    reference.config._attn_implementation = "sdpa"  # torch's fused attention, its fastest CPU path
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = load_model(directory)  # the same initial weights
    plain = PlainLoop(reference)
    tokens = torch.randint(
        0,
        args.vocab,
        ((args.repeats + 1) * args.steps * args.batch + args.batch, args.seq_len),
        generator=torch.Generator().manual_seed(1),
    )
    data = TokenDataset(tokens.flatten(), args.seq_len)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            ours,
            data,
            TrainConfig(
                out_dir=out,
                max_steps=10**6,
                batch_size=args.batch,
                lr=LR,
                betas=BETAS,
                weight_decay=WEIGHT_DECAY,
                grad_clip=CLIP,
                progress=False,
                export=False,
            ),
        )
        sides = {"genforge": lambda b: trainer.train_step([b])["loss"], "transformers": plain.step}
        first_loss = {name: step(tokens[: args.batch]) for name, step in sides.items()}  # warm-up, same batch
        times = {name: [] for name in sides}
        peaks = [matmul_peak()]
        cursor = args.batch
        for round_number in range(args.repeats):
            peaks.append(matmul_peak())
            order = list(sides.items()) if round_number % 2 == 0 else list(sides.items())[::-1]
            for name, step in order:
                batches = [tokens[cursor + i * args.batch : cursor + (i + 1) * args.batch] for i in range(args.steps)]
                start = time.perf_counter()
                for batch in batches:
                    step(batch)
                times[name].append((time.perf_counter() - start) / args.steps)
            cursor += args.steps * args.batch
    parameters = sum(p.numel() for p in ours.parameters())
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    rates = {name: max(p[name] for p in peaks) for name in peaks[0]}
    peak = max(rates.values())
    tokens_per_step = args.batch * args.seq_len
    result = {
        "machine": machine(),
        "settings": vars(args),
        "parameters": parameters,
        "matmul_peak_flops": peak,
        "matmul_flops_by_library": rates,
        "first_step_loss": first_loss,
        "load_average": " ".join(load),
        "sides": {},
    }
    for name, samples in times.items():
        median, best = statistics.median(samples), min(samples)
        result["sides"][name] = {
            "step_s_median": median,
            "step_s_best": best,
            "step_s_all": samples,
            "tokens_per_s": tokens_per_step / median,
            "tokens_per_s_best": tokens_per_step / best,
            "mfu": 6 * parameters * tokens_per_step / median / peak,
            "mfu_best": 6 * parameters * tokens_per_step / best / peak,
        }
    ours, theirs = result["sides"]["genforge"], result["sides"]["transformers"]
    result["speedup"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    result["speedup_best"] = ours["tokens_per_s_best"] / theirs["tokens_per_s_best"]
    return result


def loss_only(args) -> str:
    """The LM head and loss alone, forward and backward, on the benchmark's shapes (batch x
    seq_len hidden states, vocab x hidden head): genforge's fused loss, the same model's unfused
    path (`F.linear` + `causal_lm_loss`), and transformers' (`lm_head` + `loss_function`). Best
    of `--repeats` rounds of `--steps` calls each, interleaved; a markdown table."""
    import torch.nn.functional as F

    from genforge.train.losses import causal_lm_loss, fused_linear_cross_entropy, shift_labels

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.seq_len, args.hidden, generator=generator)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=generator)
    reference = transformers.LlamaForCausalLM(llama_config(args))

    def backward(loss_of) -> None:
        states = hidden.clone().requires_grad_()
        loss_of(states).backward()
        head.weight.grad = None

    sides = {
        "genforge fused": lambda h: fused_linear_cross_entropy(h, head.weight, shift_labels(labels)),
        "genforge unfused": lambda h: causal_lm_loss(F.linear(h, head.weight), labels),
        "transformers": lambda h: reference.loss_function(head(h), labels, vocab_size=args.vocab),
    }
    best = {name: float("inf") for name in sides}
    for loss_of in sides.values():
        backward(loss_of)  # warm-up
    for round_number in range(args.repeats):
        order = list(sides.items()) if round_number % 2 == 0 else list(sides.items())[::-1]
        for name, loss_of in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                backward(loss_of)
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    lines = [
        f"LM head + loss, forward and backward: {args.batch * args.seq_len} tokens, hidden {args.hidden}, "
        f"vocab {args.vocab}, fp32, {args.threads} threads; best of {args.repeats} rounds of {args.steps}.",
        "",
        "| | best (ms) | vs transformers |",
        "|---|---:|---:|",
    ]
    for name, seconds in best.items():
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {best['transformers'] / seconds:.2f}x |")
    return "\n".join(lines + [""])


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        "# Training step: genforge vs a plain PyTorch loop over transformers' LlamaForCausalLM",
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads; torch {m['torch']}, transformers {m['transformers']}.",
        f"Model: Llama, {result['parameters'] / 1e6:.1f}M parameters (hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['heads']} heads / {s['kv_heads']} kv heads, MLP {s['intermediate']}, vocab {s['vocab']}), fp32.",
        f"Step: batch {s['batch']} x seq_len {s['seq_len']} = {s['batch'] * s['seq_len']} tokens; AdamW, clip 1.0. "
        f"Median of {s['repeats']} interleaved rounds of {s['steps']} steps.",
        "MFU is against this CPU's fastest measured fp32 matmul rate ("
        + ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in result["matmul_flops_by_library"].items())
        + " GFLOP/s for a 1024^3 product).",
        "",
        "| | median step (s) | tokens/s | MFU | best step (s) | best tokens/s | best MFU | first-step loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, side in result["sides"].items():
        lines.append(
            f"| {name} | {side['step_s_median']:.3f} | {side['tokens_per_s']:,.0f} | {side['mfu']:.1%} | "
            f"{side['step_s_best']:.3f} | {side['tokens_per_s_best']:,.0f} | {side['mfu_best']:.1%} | "
            f"{result['first_step_loss'][name]:.4f} |"
        )
    lines += [
        "",
        f"**genforge / transformers: {result['speedup']:.2f}x** tokens/s (medians); "
        f"{result['speedup_best']:.2f}x (best rounds).",
        "",
        f"Load average when the run ended: {result['load_average']}.",
        "",
        "Reproduce: `python benchmarks/train.py` (the machine was shared with other jobs; numbers are noisy).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (
        ("--hidden", 256),
        ("--layers", 4),
        ("--heads", 8),
        ("--kv-heads", 4),
        ("--intermediate", 688),
        ("--vocab", 8192),
        ("--seq-len", 256),
        ("--batch", 4),
        ("--steps", 2),
        ("--repeats", 12),
        ("--threads", min(2, torch.get_num_threads())),
    ):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where train.{json,md} go")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--loss-only",
        action="store_true",
        help="time the LM head and loss alone (fused, unfused, transformers); print only",
    )
    args = parser.parse_args(argv)
    if args.loss_only:
        print(loss_only(args))
        return 0
    result = run(args)
    out = {k: v for k, v in vars(args).items() if k not in ("out", "no_write", "loss_only")}
    result["settings"] = out
    text = markdown(result)
    print(text)
    if not args.no_write:
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "train.json", json.dumps(result, indent=2))
        atomic_write_text(directory / "train.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
