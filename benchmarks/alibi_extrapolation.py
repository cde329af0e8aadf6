"""ALiBi's length extrapolation (Press et al. 2022): perplexity of a tiny ALiBi decoder and the
same decoder with RoPE, both trained on windows of `--train-len` tokens, at 1x, 2x and 4x that
length.

Both models are built from one config apart from `position`, get the same seed, the same
batches and the same number of steps, on a deterministic sample of the Python standard
library's source (`genforge.quickstart.stdlib_source_files`) with a byte-level BPE tokenizer
trained on it. Evaluation uses standard-library files left out of training, cut into
non-overlapping windows of each length over the same tokens. Two perplexities per length: over
every position of the windows, and over the positions past the training length only (where a
model has to extrapolate).

    python benchmarks/alibi_extrapolation.py   # writes benchmarks/results/alibi_extrapolation.{json,md}
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from finetune_base import train_quietly
from machine import describe, write_results

from genforge.config import Config
from genforge.model import Transformer
from genforge.quickstart import stdlib_source_files
from genforge.train import TokenDataset
from genforge.train.tokenizer_training import train_tokenizer


def stdlib_tokens(train_bytes: int, eval_bytes: int, vocab: int) -> tuple[list[int], list[int], int, int]:
    """(training ids, held-out ids, vocabulary size, eos id): the first `train_bytes` of the
    standard-library sample for training (and the tokenizer), the next files for evaluation."""
    train_files = stdlib_source_files(train_bytes)
    held_out = [p for p in stdlib_source_files(train_bytes + eval_bytes) if p not in set(train_files)]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in train_files]
    tokenizer = train_tokenizer(texts, vocab_size=vocab).tokenizer

    def encode(paths_texts: list[str]) -> list[int]:
        ids: list[int] = []
        for text in paths_texts:
            ids.extend(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
        return ids

    held_texts = [p.read_text(encoding="utf-8", errors="replace") for p in held_out]
    return encode(texts), encode(held_texts), tokenizer.vocab_size, tokenizer.eos_token_id


def tiny_decoder(position: str, vocab: int, train_len: int, hidden: int, layers: int, seed: int) -> Transformer:
    config = Config(
        family="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=hidden * 8 // 3 // 16 * 16,
        max_position_embeddings=train_len,
        position=position,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Transformer(config)


def train(model: Transformer, ids: list[int], train_len: int, steps: int, seed: int) -> float:
    result, _ = train_quietly(model, TokenDataset(ids, train_len), steps, lr=3e-3, seed=seed)
    return result.losses[-1][1]


@torch.no_grad()
def perplexities(model: Transformer, ids: torch.Tensor, length: int, train_len: int) -> tuple[float, float | None]:
    """(perplexity over every predicted position, over positions >= train_len only) of `ids`
    cut into windows of `length` tokens."""
    model.eval()
    windows = ids[: len(ids) // length * length].view(-1, length)
    nll_all, nll_far, count_far = 0.0, 0.0, 0
    for batch in windows.split(8):
        logits = model(batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        nll_all += float(nll.sum())
        # target t + 1 is predicted at position t: positions past the training length
        far = nll[:, train_len - 1 :]
        nll_far += float(far.sum())
        count_far += far.numel()
    total = windows.shape[0] * (length - 1)
    return math.exp(nll_all / total), (math.exp(nll_far / count_far) if count_far else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-bytes", type=int, default=300_000)
    parser.add_argument("--eval-bytes", type=int, default=60_000)
    # One thread: on a small shared machine a tiny model's step is several times faster so.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--train-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    train_ids, eval_ids, vocab, _ = stdlib_tokens(args.train_bytes, args.eval_bytes, args.vocab)
    lengths = [args.train_len * factor for factor in (1, 2, 4)]
    # The same tokens at every length: as many as the longest windows cover.
    eval_tokens = torch.tensor(eval_ids[: len(eval_ids) // lengths[-1] * lengths[-1]])
    rows = {}
    for position in ("alibi", "rope"):
        model = tiny_decoder(position, vocab, args.train_len, args.hidden, args.layers, args.seed)
        t0 = time.perf_counter()
        final_loss = train(model, train_ids, args.train_len, args.steps, args.seed)
        seconds = time.perf_counter() - t0
        by_length = {}
        for length in lengths:
            every, far = perplexities(model, eval_tokens, length, args.train_len)
            by_length[str(length)] = {"ppl": every, "ppl_past_train_len": far}
        rows[position] = {"final_train_loss": final_loss, "train_seconds": seconds, "lengths": by_length}
    seconds = time.perf_counter() - started
    result = {
        "train_len": args.train_len,
        "steps": args.steps,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": vocab,
        "train_tokens": len(train_ids),
        "eval_tokens": int(eval_tokens.numel()),
        "parameters": tiny_decoder("alibi", vocab, args.train_len, args.hidden, args.layers, 0).config.num_parameters(),
        "models": rows,
        "seconds": seconds,
        "machine": describe(),
    }
    lines = [
        "# ALiBi against RoPE past the training length",
        "",
        f"Two {args.layers}-layer decoders (hidden {args.hidden}, 4 heads, 2 key/value heads, vocabulary {vocab}), "
        f"one with ALiBi and one with RoPE, trained {args.steps} steps on {args.train_len}-token windows of "
        f"standard-library source ({len(train_ids):,} tokens), evaluated on {int(eval_tokens.numel()):,} held-out "
        f"tokens cut into windows of each length. `python benchmarks/alibi_extrapolation.py`, {seconds:.0f} s "
        "on 2 shared CPU cores.",
        "",
        "| eval length | ALiBi ppl | RoPE ppl | ALiBi ppl past train length | RoPE ppl past train length |",
        "|---|---|---|---|---|",
    ]
    for length in lengths:
        a, r = rows["alibi"]["lengths"][str(length)], rows["rope"]["lengths"][str(length)]

        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines.append(
            f"| {length} ({length // args.train_len}x) | {fmt(a['ppl'])} | {fmt(r['ppl'])} | "
            f"{fmt(a['ppl_past_train_len'])} | {fmt(r['ppl_past_train_len'])} |"
        )
    lines += [
        "",
        f"Final training loss: ALiBi {rows['alibi']['final_train_loss']:.3f}, RoPE {rows['rope']['final_train_loss']:.3f}.",
    ]
    write_results(args.out, "alibi_extrapolation", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
