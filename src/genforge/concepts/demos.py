"""Runnable demonstrations for `genforge concepts show ID`: each builds what it needs in a
second or two (tiny random models, toy distributions) and prints what the concept does."""

from __future__ import annotations

import time

import torch

from ..console import stdout_console as console


def _tiny_decoder(**overrides):
    from ..config import Config
    from ..model import Transformer

    torch.manual_seed(0)
    fields = (
        dict(
            family="llama",
            vocab_size=96,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
        )
        | overrides
    )
    return Transformer(Config(**fields)).eval()


def rope() -> None:
    """A rotated query and key score the same for the same distance, wherever they sit."""
    from ..model import apply_rope, rope_frequencies

    model = _tiny_decoder()
    inv_freq, _ = rope_frequencies(model.config)
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rotated(x, position):
        angles = torch.outer(torch.tensor([float(position)]), inv_freq)
        emb = torch.cat([angles, angles], dim=-1)
        return apply_rope(x, emb.cos()[None, None], emb.sin()[None, None])

    console.print("q at position m, k at position n: the score depends on m - n only")
    for m, n in ((3, 1), (10, 8), (100, 98), (7, 1)):
        score = (rotated(q, m) * rotated(k, n)).sum().item()
        console.print(f"  m={m:3d} n={n:3d} m-n={m - n:3d}  q.k = {score:+.5f}")


def kv_cache() -> None:
    """Decoding with a KV cache gives the same logits as re-running the whole prefix, faster."""
    from ..cache import make_kv_cache

    model = _tiny_decoder(num_layers=4)
    ids = torch.randint(0, 96, (1, 128))
    with torch.no_grad():
        start = time.perf_counter()
        for length in range(96, 128):
            full = model(ids[:, : length + 1]).logits[:, -1]
        uncached = time.perf_counter() - start
        cache = make_kv_cache(model.config, batch_size=1, capacity=128)
        model(ids[:, :96], cache=cache)
        start = time.perf_counter()
        for length in range(96, 128):
            step = model(ids[:, length : length + 1], cache=cache).logits[:, -1]
        cached = time.perf_counter() - start
    difference = (full - step).abs().max().item()
    console.print(
        f"32 decode steps: re-running the prefix {uncached * 1e3:.1f} ms, with the cache {cached * 1e3:.1f} ms"
    )
    console.print(f"last step's logits differ by {difference:.2e} (floating-point noise)")


def top_p() -> None:
    """Nucleus sampling keeps the smallest set of tokens whose probability reaches p."""
    from ..generate.processors import DecodeContext, TopP

    logits = torch.log(torch.tensor([[0.45, 0.25, 0.15, 0.08, 0.04, 0.03]]))
    for p in (0.5, 0.7, 0.9, 1.0):
        kept = TopP(p)(logits.clone(), DecodeContext(torch.zeros(1, 1, dtype=torch.long), prompt_length=1))
        probs = kept.softmax(-1)[0]
        console.print(f"  top_p={p:.1f}: " + "  ".join(f"{value:.2f}" for value in probs.tolist()))


def attention_complexity() -> None:
    """Full attention's time grows with the square of the sequence length."""
    import torch.nn.functional as F

    previous = None
    for length in (256, 512, 1024, 2048):
        q = torch.randn(1, 4, length, 32)
        start = time.perf_counter()
        for _ in range(3):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        seconds = (time.perf_counter() - start) / 3
        growth = f"  x{seconds / previous:.1f} for 2x tokens" if previous else ""
        console.print(f"  n={length:5d}: {seconds * 1e3:7.2f} ms{growth}")
        previous = seconds
