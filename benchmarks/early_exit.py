"""Early exit (CALM, Schuster et al. 2022): layers used, decode speed and quality at several
confidence thresholds, on a tiny decoder trained on the spot with the multi-layer loss.

Everything is made here, nothing is downloaded: a byte-level BPE tokenizer and a small
Llama-style decoder trained with `genforge.early_exit.EarlyExitObjective` (every layer's
next-token loss through the shared final norm + head, weighted by depth) on a deterministic
sample of the Python standard library's source (`genforge.quickstart.stdlib_source_files`),
the last 5% of its token stream held out. The same decoder trained on the plain last-layer
loss is the comparison: how much the multi-layer loss costs the full model, and what early
exit does with intermediate layers never trained to predict.

At each threshold (max-prob confidence), per model:

    layers/token   average layers run per generated token (the prompt's pass counts once,
                   for the first token, at full depth)
    tokens/s       greedy decoding of held-out prompts with `early_exit_generate`; speed-up is
                   against the same loop at threshold 1.0 (the full model), measured in the
                   same run, interleaved
    ppl            held-out perplexity read token by token as early exit decodes
                   (`early_exit_perplexity`: exits and propagated keys/values included)
    agreement      share of generated positions whose token equals the full model's greedy
                   token, and the share of continuations identical throughout

    PYTHONPATH=src python benchmarks/early_exit.py   # writes benchmarks/results/early_exit.{json,md}
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from finetune_base import train_quietly
from machine import describe, write_results

from genforge.config import Config
from genforge.early_exit import (
    EarlyExitObjective,
    LanguageModelRows,
    early_exit_generate,
    early_exit_perplexity,
    greedy_agreement,
    layer_losses,
)
from genforge.model import Transformer
from genforge.quickstart import stdlib_source_files
from genforge.train import TokenDataset
from genforge.train.tokenizer_training import train_tokenizer

SEQ_LEN = 128
THRESHOLDS = (1.0, 0.9, 0.8, 0.6, 0.4, 0.3, 0.2)


def corpus(corpus_bytes: int, vocab: int):
    files = stdlib_source_files(corpus_bytes)
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in files]
    tokenizer = train_tokenizer(texts, vocab_size=vocab, model_max_length=SEQ_LEN).tokenizer
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
    cut = int(len(ids) * 0.95)
    return tokenizer, ids[:cut], ids[cut:], len(files)


def train(tokenizer, train_ids, args, multi_layer: bool) -> tuple[Transformer, dict]:
    config = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=args.hidden * 8 // 3 // 16 * 16,
        max_position_embeddings=SEQ_LEN * 2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = Transformer(config)
    data = TokenDataset(train_ids, SEQ_LEN)
    started = time.perf_counter()
    rows, objective = (LanguageModelRows(data), EarlyExitObjective(args.layers)) if multi_layer else (data, None)
    result, _ = train_quietly(model, rows, args.steps, lr=1e-2, seed=args.seed, objective=objective)
    return model.eval(), {"final_train_loss": result.losses[-1][1], "seconds": time.perf_counter() - started}


def evaluate(model: Transformer, held_out: list[int], args) -> list[dict]:
    windows = [held_out[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(args.ppl_windows)]
    prompts = [held_out[-(i + 1) * 200 : -(i + 1) * 200 + args.prompt_tokens] for i in range(args.prompts)]
    with torch.no_grad():
        per_layer = layer_losses(model, torch.tensor(windows)).tolist()
    rows = []
    full_tokens = None
    for threshold in args.thresholds:
        ppl_sum, layers_sum = 0.0, 0.0
        for window in windows:
            ppl, layers = early_exit_perplexity(model, window, threshold, min_layers=args.min_layers)
            ppl_sum, layers_sum = ppl_sum + torch.log(torch.tensor(ppl)).item(), layers_sum + layers
        # Decode each prompt at this threshold and at 1.0 back to back, so both see the same load.
        outputs, used, seconds, full_seconds = [], [], 0.0, 0.0
        for prompt in prompts:
            started = time.perf_counter()
            result = early_exit_generate(model, prompt, args.new_tokens, threshold, min_layers=args.min_layers)
            seconds += time.perf_counter() - started
            started = time.perf_counter()
            early_exit_generate(model, prompt, args.new_tokens, 1.0)
            full_seconds += time.perf_counter() - started
            outputs.append(result.tokens)
            used.extend(result.layers_used)
        if threshold == 1.0:
            full_tokens = outputs
        generated = sum(len(tokens) for tokens in outputs)
        agreement = sum(greedy_agreement(a, b) * len(a) for a, b in zip(outputs, full_tokens)) / generated
        rows.append(
            {
                "threshold": threshold,
                "layers_per_token": sum(used) / len(used),
                "layers_per_token_ppl": layers_sum / len(windows),
                "tokens_per_s": generated / seconds,
                "speedup": full_seconds / seconds,
                "ppl": float(torch.exp(torch.tensor(ppl_sum / len(windows)))),
                "agreement": agreement,
                "identical_continuations": sum(a == b for a, b in zip(outputs, full_tokens)) / len(outputs),
            }
        )
        print(rows[-1], flush=True)
    return [{"per_layer_loss": per_layer}, *rows]


def markdown(result: dict) -> str:
    machine, settings = result["machine"], result["settings"]
    lines = [
        "# Early exit (CALM): layers, speed and quality against the confidence threshold",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} CPUs, {machine['threads']} torch thread(s), torch "
        f"{machine['torch']}. Shared with other jobs: the speed-up is a ratio measured within this run "
        "(each prompt decoded at the threshold and at 1.0 back to back), absolute tokens/s are noisy.",
        "",
        f"Model: Llama-style decoder, {settings['layers']} layers, hidden {settings['hidden']}, vocabulary "
        f"{result['vocab']}, {result['parameters']:,} parameters; trained {settings['steps']} steps (batch 16 x "
        f"{SEQ_LEN}) on {result['corpus_files']} standard-library files ({result['train_tokens']:,} tokens). "
        f"Perplexity over {settings['ppl_windows']} held-out windows of {SEQ_LEN} tokens; greedy decoding of "
        f"{settings['prompts']} held-out prompts of {settings['prompt_tokens']} tokens, {settings['new_tokens']} new "
        "tokens each. Confidence: max softmax probability of the shared head, checked from layer "
        f"{settings['min_layers']} on.",
        "",
    ]
    for name, block in result["models"].items():
        per_layer = block["rows"][0]["per_layer_loss"]
        lines += [
            f"## {name}",
            "",
            f"Training: {block['training']['seconds']:.0f} s, final train loss "
            f"{block['training']['final_train_loss']:.3f}. Held-out loss of each layer through the shared head: "
            + ", ".join(f"L{i + 1} {loss:.2f}" for i, loss in enumerate(per_layer))
            + ".",
            "",
            "| threshold | layers/token (decode) | layers/token (ppl) | tokens/s | speed-up | ppl | agreement | "
            "identical continuations |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in block["rows"][1:]:
            lines.append(
                f"| {row['threshold']:.2f} | {row['layers_per_token']:.2f} | {row['layers_per_token_ppl']:.2f} | "
                f"{row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | {row['ppl']:.2f} | {100 * row['agreement']:.1f}% | "
                f"{100 * row['identical_continuations']:.0f}% |"
            )
        lines.append("")
    lines += [f"Total time: {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-bytes", type=int, default=1_000_000)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ppl-windows", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=list(THRESHOLDS), help="1.0 (the full model) first"
    )
    parser.add_argument("--min-layers", type=int, default=1, help="layers every token runs before it may exit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the model trained on the last-layer loss")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where early_exit.* go")
    args = parser.parse_args(argv)
    if min(args.steps, args.layers, args.ppl_windows, args.prompts, args.prompt_tokens, args.new_tokens) < 1:
        parser.error("steps, layers, ppl-windows, prompts, prompt-tokens and new-tokens must be >= 1")
    if args.thresholds[0] != 1.0 or not all(0 < t <= 1 for t in args.thresholds):
        parser.error("thresholds lie in (0, 1] and start with 1.0, the full model every other is compared with")
    if not 1 <= args.min_layers <= args.layers:
        parser.error(f"min-layers must be in 1..{args.layers}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer, train_ids, held_out, num_files = corpus(args.corpus_bytes, args.vocab)
    models = {}
    for name, multi_layer in (("multi-layer loss (CALM)", True), ("last-layer loss only", False)):
        if not multi_layer and args.no_baseline:
            continue
        model, training = train(tokenizer, train_ids, args, multi_layer)
        print(name, training, flush=True)
        models[name] = {"training": training, "rows": evaluate(model, held_out, args)}
    result = {
        "machine": describe(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "vocab": tokenizer.vocab_size,
        "parameters": model.config.num_parameters(),
        "corpus_files": num_files,
        "train_tokens": len(train_ids),
        "models": models,
        "seconds": time.perf_counter() - started,
    }
    text = markdown(result)
    write_results(args.out, "early_exit", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
