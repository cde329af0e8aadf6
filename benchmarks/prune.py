"""Sparsity against perplexity for each pruning method, with and without a short recovery
fine-tune.

Everything is made on the spot, nothing is downloaded:

- base model: a byte-level BPE tokenizer and a small Llama-style decoder (8 query heads in 2
  key/value groups), pretrained for a fixed number of steps on a deterministic sample of the
  Python standard library's source (`genforge.quickstart.stdlib_source_files`);
- held-out text: standard-library files outside that sample, scored by
  `genforge.evaluate.perplexity` in disjoint windows of the model's context.

Each method prunes a fresh copy of the base model (`genforge.quantize.prune`) at each sparsity:

    magnitude-global   smallest |w| over all the blocks' linear weights together
    magnitude-layer    the same share of smallest |w| from each layer
    2:4                2 largest |w| of every 4 consecutive input weights (50% by construction)
    neurons            MLP neurons removed by magnitude importance, the same share per layer
    heads              query heads removed from every key/value group by Michel et al.'s
                       gradient importance on calibration rows of the training text
    neurons-random,    the same removals with the neurons or heads drawn at random (seeded):
    heads-random       what the importance scores must beat

then is scored, fine-tuned for a few dozen steps on the pretraining data with
`genforge.train.Trainer` (zeroed weights held at zero by `hold_masks`), and scored again. The
dense model gets the same fine-tune, so the gain of the extra steps alone is visible. Besides the
requested sparsity, each row gives the share of the blocks' linear weights that are zero or gone,
the parameter count, and the time of one forward pass over a batch (only removal makes it faster).

    PYTHONPATH=src python benchmarks/prune.py     # writes benchmarks/results/prune.{json,md,png}
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe, write_results

from genforge.atomic import atomic_path
from genforge.checkpoint import load_model, save_model
from genforge.config import Config
from genforge.evaluate import perplexity
from genforge.model import Transformer
from genforge.quantize.prune import (
    calibration_rows,
    heads_to_remove,
    hold_masks,
    prune_heads,
    prune_model,
    prune_neurons,
)
from genforge.quickstart import stdlib_source_files
from genforge.train import TokenDataset, TrainConfig, Trainer
from genforge.train.tokenizer_training import train_tokenizer

SEQ_LEN = 128
SEED = 0
METHODS = ("magnitude-global", "magnitude-layer", "2:4", "neurons", "heads", "neurons-random", "heads-random")


# ------------------------------------------------------------------------------ the base model
def corpus(args) -> tuple[list[str], list[str]]:
    """Training texts (the stdlib sample of `corpus_bytes`) and held-out texts (at least
    `held_out_bytes` of the files that follow in the sample's order)."""
    train_files = stdlib_source_files(args.corpus_bytes)
    budget, held_files = args.corpus_bytes, []
    # The sample's last file may overshoot its budget: widen until the new files are enough.
    while sum(path.stat().st_size for path in held_files) < args.held_out_bytes:
        budget += args.held_out_bytes
        held_files = sorted(set(stdlib_source_files(budget)) - set(train_files))

    def read(files):
        return [path.read_text(encoding="utf-8", errors="replace") for path in files]

    return read(train_files), read(held_files)


def pretrain_base(directory: Path, texts: list[str], args) -> tuple[dict, list[int]]:
    """A tokenizer and a small decoder trained on `texts`; saved to `directory`. Returns its
    description and the training token ids."""
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab, model_max_length=SEQ_LEN).tokenizer
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
    config = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=args.hidden * 8 // 3 // 16 * 16,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = Transformer(config)
    train_config = TrainConfig(
        out_dir=directory.parent / "pretrain-run",
        max_steps=args.pretrain_steps,
        batch_size=16,
        lr=1e-2,
        warmup_steps=max(1, args.pretrain_steps // 20),
        seed=SEED,
        progress=False,
        export=False,
    )
    result = Trainer(model, TokenDataset(ids, SEQ_LEN), train_config).train()
    save_model(model, directory, tokenizer)
    described = {
        "parameters": config.num_parameters(),
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": "8 query heads, 2 key/value heads",
        "intermediate_size": config.intermediate_size,
        "vocab": tokenizer.vocab_size,
        "corpus_tokens": len(ids),
        "steps": args.pretrain_steps,
        "final_train_loss": result.losses[-1][1],
        "seconds": time.perf_counter() - started,
    }
    return described, ids


# ------------------------------------------------------------------------------- measurement
def block_weights(model: Transformer) -> tuple[int, int]:
    """(nonzero, total) over the blocks' linear weights."""
    weights = [m.weight for name, m in model.named_modules() if name.startswith("blocks.") and hasattr(m, "weight")]
    weights = [w for w in weights if w.dim() == 2]
    return sum(int(w.count_nonzero()) for w in weights), sum(w.numel() for w in weights)


def forward_ms(models: list[Transformer], batch: torch.Tensor, repeats: int) -> list[float]:
    """The fastest of `repeats` forward passes of each model over `batch`, in ms. The models
    take turns, so a load that comes and goes on the shared machine meets them all alike."""
    times = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(batch)  # warm-up
        for _ in range(repeats):
            for model, spent in zip(models, times):
                started = time.perf_counter()
                model(batch)
                spent.append(time.perf_counter() - started)
    # The fastest run: other work on the machine only ever adds time.
    return [1000 * min(spent) for spent in times]


def shape_of(config: Config) -> tuple[int, int, int]:
    return (config.intermediate_size, config.num_heads, config.num_kv_heads)


def time_shapes(base: Config, rows: list[dict], args) -> None:
    """forward_ms of each row and of the dense model, measured at the end with all shapes
    taking turns (so the shared machine's load meets them alike). A forward pass costs the same
    whatever the weights' values: each shape is timed once, on a model built with it. Zeroed
    weights (magnitude, N:M) keep the dense shape."""
    shapes = list(dict.fromkeys(tuple(row["shape"]) for row in rows))
    models = []
    for intermediate, heads, kv_heads in shapes:
        torch.manual_seed(SEED)
        config = dataclasses.replace(base, intermediate_size=intermediate, num_heads=heads, num_kv_heads=kv_heads)
        models.append(Transformer(config).eval())
    batch = torch.randint(0, base.vocab_size, (args.timing_batch, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    by_shape = dict(zip(shapes, forward_ms(models, batch, args.timing_repeats)))
    dense_ms = by_shape[shape_of(base)]
    for row in rows:
        row["forward_ms"] = by_shape[tuple(row["shape"])]
        row["speedup"] = dense_ms / row["forward_ms"]


def held_out_ppl(model: Transformer, ids: torch.Tensor) -> float:
    # Disjoint windows of the whole context: every token but each window's first is scored once.
    return perplexity(model, ids, max_length=SEQ_LEN, stride=SEQ_LEN, show_progress=False).perplexity


def recover(model: Transformer, masks: dict, train: TokenDataset, out_dir: Path, args) -> float:
    """A short fine-tune on the pretraining data, pruned weights held at zero; returns seconds."""
    started = time.perf_counter()
    handles = hold_masks(model, masks)
    config = TrainConfig(
        out_dir=out_dir,
        max_steps=args.recovery_steps,
        batch_size=args.recovery_batch,
        lr=args.recovery_lr,
        warmup_steps=max(1, args.recovery_steps // 10),
        seed=SEED,
        progress=False,
        export=False,
    )
    Trainer(model, train, config).train()
    for handle in handles:
        handle.remove()
    return time.perf_counter() - started


def measure(label: str, sparsity: float, model: Transformer, masks: dict, context: dict, args) -> dict:
    nonzero, total = block_weights(model)
    row = {
        "method": label,
        "sparsity": sparsity,
        "removed_share": 1 - nonzero / context["block_weights"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "shape": shape_of(model.config),
        "ppl": held_out_ppl(model, context["held_out"]),
    }
    work = context["work"] / f"recover-{label.replace(':', '-')}-{sparsity}"
    row["recovery_seconds"] = recover(model, masks, context["train"], work, args)
    row["ppl_recovered"] = held_out_ppl(model, context["held_out"])
    nonzero_after, _ = block_weights(model)
    row["nonzero_kept"] = nonzero_after == nonzero  # the pruned weights stayed zero
    print(
        f"  {label:<17} sparsity {sparsity:<5g} removed {row['removed_share']:6.1%}  ppl {row['ppl']:9.2f} -> "
        f"{row['ppl_recovered']:8.2f} after {args.recovery_steps} steps",
        flush=True,
    )
    return row


def random_choice(base_dir: Path, method: str, sparsity: float) -> Transformer:
    """The base model with as many neurons or heads removed as `method` removes at `sparsity`,
    chosen at random (seeded): what the importance scores must beat."""
    model = load_model(base_dir)
    generator = torch.Generator().manual_seed(SEED)
    config = model.config
    if method == "neurons":
        prune_neurons(model, sparsity, torch.rand(config.num_layers, config.intermediate_size, generator=generator))
    else:
        count = heads_to_remove(config.num_heads, config.num_kv_heads, sparsity)
        prune_heads(model, count, torch.rand(config.num_layers, config.num_heads, generator=generator))
    return model


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="prune-"))
    started = time.perf_counter()
    train_texts, held_texts = corpus(args)
    base_dir = work / "base"
    print("pretraining the base model on standard-library source ...", flush=True)
    base, train_ids = pretrain_base(base_dir, train_texts, args)
    print(f"  {base['parameters'] / 1e6:.2f}M parameters, {base['seconds']:.0f}s", flush=True)

    from genforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(base_dir)
    held_ids: list[int] = []
    for text in held_texts:
        held_ids.extend(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
    held_out = torch.tensor(held_ids[: args.held_out_tokens])
    generator = torch.Generator().manual_seed(SEED)
    train = TokenDataset(train_ids, SEQ_LEN)
    calibration_start = int(
        torch.randint(0, len(train_ids) - args.calibration_rows * SEQ_LEN, (1,), generator=generator)
    )
    calibration = calibration_rows(train_ids[calibration_start:], SEQ_LEN, args.calibration_rows)
    dense = load_model(base_dir)
    context = {
        "work": work,
        "train": train,
        "held_out": held_out,
        "block_weights": block_weights(dense)[1],
    }
    rows = [measure("dense", 0.0, dense, {}, context, args)]
    for method in args.methods:
        for sparsity in [0.5] if method == "2:4" else args.sparsities:
            model = load_model(base_dir)
            name, scope = ("magnitude", method.split("-")[1]) if method.startswith("magnitude") else (method, "global")
            try:
                _, masks = prune_model(
                    model, name, None if name == "2:4" else sparsity, calibration if name == "heads" else None, scope
                )
            except ValueError as err:  # a sparsity this shape cannot take (e.g. every head)
                print(f"  {method} at {sparsity}: skipped ({err})", flush=True)
                continue
            rows.append(measure(method, sparsity, model, masks, context, args))
    for method in args.random_baselines:
        for sparsity in args.random_sparsities:
            rows.append(
                measure(f"{method}-random", sparsity, random_choice(base_dir, method, sparsity), {}, context, args)
            )
    print("timing a forward pass of each shape ...", flush=True)
    time_shapes(load_model(base_dir).config, rows, args)
    result = {
        "machine": describe() | {"cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "base": base,
        "held_out_tokens": len(held_out),
        "calibration": f"{len(calibration)} rows of {SEQ_LEN} tokens of the training text",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "no_write")},
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    return result


# ---------------------------------------------------------------------------------- reports
def plot(result: dict, path: Path) -> None:
    """Perplexity against the share of the blocks' linear weights removed, one colour per
    method, solid after pruning, dashed after the recovery fine-tune."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["rows"]
    dense = rows[0]
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = dict(
        zip(METHODS, ("tab:blue", "tab:cyan", "tab:purple", "tab:orange", "tab:green", "tab:brown", "tab:olive"))
    )
    for method in dict.fromkeys(row["method"] for row in rows[1:]):
        points = [dense] + [row for row in rows if row["method"] == method]
        x = [100 * row["removed_share"] for row in points]
        colour = colours.get(method)
        axes.plot(x, [row["ppl"] for row in points], marker="o", color=colour, label=method)
        axes.plot(x, [row["ppl_recovered"] for row in points], marker="x", linestyle="--", color=colour)
    axes.axhline(dense["ppl"], color="grey", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xlabel("blocks' linear weights zeroed or removed (%)")
    axes.set_ylabel("held-out perplexity (log scale)")
    axes.set_title(f"solid: pruned; dashed: + {result['settings']['recovery_steps']} recovery steps")
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")


def markdown(result: dict) -> str:
    machine, base, settings = result["machine"], result["base"], result["settings"]
    dense = result["rows"][0]
    lines = [
        "# Pruning: sparsity against held-out perplexity",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_capability']}), {machine['cores']} CPUs, "
        f"{machine['threads']} torch thread(s), torch {machine['torch']}, Python {machine['python']}.",
        "",
        f"Base: a {base['parameters'] / 1e6:.2f}M-parameter Llama-style decoder (hidden {base['hidden']}, "
        f"{base['layers']} layers, {base['heads']}, MLP {base['intermediate_size']}, byte-level BPE of "
        f"{base['vocab']} tokens) pretrained for {base['steps']} steps on {base['corpus_tokens']:,} tokens of "
        f"standard-library source. Held-out: {result['held_out_tokens']:,} tokens of other standard-library "
        f"files, disjoint windows of {SEQ_LEN}. Heads are scored on {result['calibration']}.",
        "",
        f"Recovery: {settings['recovery_steps']} steps of `Trainer` on the pretraining data (batch "
        f"{settings['recovery_batch']} x {SEQ_LEN} tokens, lr {settings['recovery_lr']:g}), zeroed weights held "
        "at zero. The dense row gets the same steps: the gain of the extra training alone. The `-random` rows "
        "remove as many neurons or heads as their method, drawn at random: what the importance scores must beat.",
        "",
        "`removed` is the share of the blocks' linear weights that are zero or gone (embeddings and the tied head "
        "are never pruned). `forward` is the fastest of a few timed runs of one forward pass over a "
        f"{settings['timing_batch']} x {SEQ_LEN} batch, once per shape with all shapes taking turns (speed-up: dense "
        "time / this time): magnitude and N:M keep the dense shapes and cost the same, and a random choice of "
        "neurons or heads has the shapes of its method's row.",
        "",
        "| method | sparsity | removed | parameters | forward (ms) | speed-up | perplexity | after recovery |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ratio = row["ppl"] / dense["ppl"]
        lines.append(
            f"| {row['method']} | {row['sparsity']:g} | {row['removed_share']:.1%} | {row['parameters']:,} | "
            f"{row['forward_ms']:.1f} | {row['speedup']:.2f}x | {row['ppl']:.2f} ({ratio:.2f}x) | {row['ppl_recovered']:.2f} "
            f"({row['ppl_recovered'] / dense['ppl_recovered']:.2f}x) |"
        )
    lines += [
        "",
        "Ratios: against the dense model before recovery, and after recovery against the dense model after "
        "the same steps.",
        "",
        "![sparsity against perplexity](prune.png)",
        "",
        f"Whole script: {result['seconds']:.0f}s. Reproduce: `PYTHONPATH=src python benchmarks/prune.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-bytes", type=int, default=1_500_000, help="standard-library source to pretrain on")
    parser.add_argument("--held-out-bytes", type=int, default=200_000, help="other standard-library source to score")
    parser.add_argument("--held-out-tokens", type=int, default=16_384)
    parser.add_argument("--vocab", type=int, default=1024)
    # 144 = 8 heads of 18; 6, 4 and 2 heads also divide it, as transformers' Llama config asks.
    parser.add_argument("--hidden", type=int, default=144)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--methods", nargs="+", choices=METHODS[:5], default=list(METHODS[:5]))
    parser.add_argument(
        "--random-baselines",
        nargs="*",
        choices=("neurons", "heads"),
        default=["neurons", "heads"],
        help="the same removals with the neurons or heads chosen at random",
    )
    parser.add_argument("--random-sparsities", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--calibration-rows", type=int, default=32)
    parser.add_argument("--recovery-steps", type=int, default=40)
    parser.add_argument("--recovery-batch", type=int, default=8)
    parser.add_argument("--recovery-lr", type=float, default=1e-3)
    parser.add_argument("--timing-batch", type=int, default=8)
    parser.add_argument("--timing-repeats", type=int, default=30)
    # One thread: at this size a step is many small products, which a second thread barely
    # speeds up and slows down several times when other jobs share the cores.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where prune.{json,md,png} go")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if not args.no_write:
        write_results(args.out, "prune", result, text)
        plot(result, Path(args.out) / "prune.png")
    return 0 if all(math.isfinite(row["ppl_recovered"]) for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
