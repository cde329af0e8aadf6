"""Switch routing's dropped tokens against the capacity factor (Fedus et al. 2022).

A tiny decoder-only Switch model (top-1 routing over `--experts` experts in every layer,
capacity factor 1.25 in training, router jitter and z-loss) is trained on standard-library
source twice: with the Switch load-balancing loss (coefficient 0.01) and without it. Each is
then evaluated on held-out files at capacity factors 1.0, 1.25 and 2.0: the share of tokens
dropped (sent to an expert that was full, so only the residual carries them) and the
perplexity. The data and tokenizer are those of `alibi_extrapolation.py`.

    python benchmarks/switch_capacity.py   # writes benchmarks/results/switch_capacity.{json,md}
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from alibi_extrapolation import stdlib_tokens
from finetune_base import train_quietly
from machine import describe, write_results

from genforge.config import Config
from genforge.model import MixtureOfExperts, Transformer, dropped_token_share
from genforge.train import TokenDataset

FACTORS = (1.0, 1.25, 2.0)


def switch_decoder(vocab: int, seq_len: int, hidden: int, layers: int, experts: int, seed: int) -> Transformer:
    config = Config(
        family="mixtral",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=seq_len,
        num_experts=experts,
        num_experts_per_token=1,
        router="switch",
        expert_capacity_factor=1.25,
        router_jitter_noise=0.01,
        router_z_loss_coef=1e-3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Transformer(config)


def set_capacity_factor(model: Transformer, factor: float) -> None:
    for module in model.modules():
        if isinstance(module, MixtureOfExperts):
            module.capacity_factor = factor


@torch.no_grad()
def evaluate(model: Transformer, ids: torch.Tensor, seq_len: int) -> tuple[float, float]:
    """(perplexity, dropped-token share) over `ids` cut into windows of `seq_len`."""
    model.eval()
    dropped_token_share(model)  # start counting here
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    nll, count = 0.0, 0
    for batch in windows.split(16):
        logits = model(batch).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(nll / count), dropped_token_share(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-bytes", type=int, default=300_000)
    parser.add_argument("--eval-bytes", type=int, default=60_000)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    train_ids, eval_ids, vocab, _ = stdlib_tokens(args.train_bytes, args.eval_bytes, args.vocab)
    eval_tokens = torch.tensor(eval_ids)
    runs = {}
    for name, aux_coef in (("balanced", 0.01), ("unbalanced", 0.0)):
        model = switch_decoder(vocab, args.seq_len, args.hidden, args.layers, args.experts, args.seed)
        data = TokenDataset(train_ids, args.seq_len)
        result, records = train_quietly(model, data, args.steps, lr=3e-3, seed=args.seed, aux_loss_coef=aux_coef)
        train_dropped = [r["dropped_tokens"] for r in records if "dropped_tokens" in r]
        by_factor = {}
        for factor in FACTORS:
            set_capacity_factor(model, factor)
            ppl, dropped = evaluate(model, eval_tokens, args.seq_len)
            by_factor[str(factor)] = {"ppl": ppl, "dropped_share": dropped}
        runs[name] = {
            "aux_loss_coef": aux_coef,
            "first_train_loss": result.losses[0][1],
            "final_train_loss": result.losses[-1][1],
            "train_dropped_first_10_steps": sum(train_dropped[:10]) / len(train_dropped[:10]),
            "train_dropped_last_10_steps": sum(train_dropped[-10:]) / len(train_dropped[-10:]),
            "eval": by_factor,
        }
    seconds = time.perf_counter() - started
    result = {
        "experts": args.experts,
        "layers": args.layers,
        "hidden": args.hidden,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "train_capacity_factor": 1.25,
        "train_tokens": len(train_ids),
        "eval_tokens": len(eval_ids),
        "runs": runs,
        "seconds": seconds,
        "machine": describe(),
    }
    lines = [
        "# Switch routing: dropped tokens against the capacity factor",
        "",
        f"A {args.layers}-layer decoder (hidden {args.hidden}) with a Switch layer of {args.experts} experts in every "
        f"block, trained {args.steps} steps on {args.seq_len}-token windows of standard-library source at capacity "
        "factor 1.25 (router jitter 0.01, z-loss 1e-3), with and without the load-balancing loss; evaluated on "
        f"{len(eval_ids):,} held-out tokens. Capacity per expert and sequence: ceil(factor x {args.seq_len} / "
        f"{args.experts}). `python benchmarks/switch_capacity.py`, {seconds:.0f} s on 2 shared CPU cores.",
        "",
        "| capacity factor | dropped (balanced) | ppl (balanced) | dropped (no balancing loss) | ppl (no balancing loss) |",
        "|---|---|---|---|---|",
    ]
    for factor in FACTORS:
        b, u = runs["balanced"]["eval"][str(factor)], runs["unbalanced"]["eval"][str(factor)]
        lines.append(
            f"| {factor} | {b['dropped_share']:.1%} | {b['ppl']:.2f} | {u['dropped_share']:.1%} | {u['ppl']:.2f} |"
        )
    lines += [
        "",
        "Dropped share during training (factor 1.25), first and last 10 steps: "
        f"balanced {runs['balanced']['train_dropped_first_10_steps']:.1%} -> "
        f"{runs['balanced']['train_dropped_last_10_steps']:.1%}, without the balancing loss "
        f"{runs['unbalanced']['train_dropped_first_10_steps']:.1%} -> "
        f"{runs['unbalanced']['train_dropped_last_10_steps']:.1%}. Training loss: balanced "
        f"{runs['balanced']['first_train_loss']:.2f} -> {runs['balanced']['final_train_loss']:.2f}, without "
        f"{runs['unbalanced']['first_train_loss']:.2f} -> {runs['unbalanced']['final_train_loss']:.2f}.",
    ]
    write_results(args.out, "switch_capacity", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
