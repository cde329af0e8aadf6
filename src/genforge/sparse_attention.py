"""Sparse attention: which keys each query may see, as masks and as a banded kernel.

Full attention compares every query with every key: O(n^2) time and, when the score matrix is
materialised, O(n^2) memory. Sparse patterns keep a few structured entries of that matrix:

    local      a window of the `window` nearest keys (Beltagy et al. 2020, Longformer's
               sliding window; Mistral's, per layer, is `Config.sliding_window`)
    longformer local window + `global_tokens` leading positions that every query sees and that
               see every key (Longformer's global attention on [CLS] / question tokens)
    bigbird    blocks of `block_size`: a window of `window_blocks` neighbouring blocks, the
               `global_tokens` leading positions and `random_blocks` random key blocks per
               query block (Zaheer et al. 2020, ITC variant)
    strided    Sparse Transformer's strided pattern (Child et al. 2019): the last `stride`
               keys plus every `stride`-th key before them (i - j divisible by the stride)
    fixed      Sparse Transformer's fixed pattern: the query's own block of `stride` keys plus
               the last `summary` columns of every block (the "summary" columns)
    dilated    a dilated window: `window` keys spaced `dilation` apart (Beltagy et al. 2020)

A pattern is a rule on token positions (query i, key j), so it gives the same mask whether the
keys come from one forward pass or from a KV cache: in a causal model every pattern decodes
incrementally through the cache and each new token sees exactly what it would have seen in a
full forward pass (BigBird's random blocks are drawn per query block from a seed, not per
call). In a bidirectional model a pattern is symmetric around the query (|i - j| instead of
i - j) and global tokens see every key.

A model selects one with `Config.attention_pattern`, a dict such as
``{"kind": "longformer", "window": 128, "global_tokens": 4}`` (`check_pattern` lists the
parameters of each kind); the model then ANDs `pattern_mask` into its attention mask.

The masked form still builds an n x n matrix. For the local and Longformer patterns
`banded_attention` computes only the band: queries in chunks of `window`, each against the
keys from `window - 1` before its chunk to its end (plus the global keys), O(n * window) time
and memory. The model uses it for a whole unpadded sequence (training, scoring, the prompt of
a generation); decode steps use the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# kind -> (required parameters, optional parameters with their defaults)
PATTERNS: dict[str, tuple[tuple[str, ...], dict[str, int]]] = {
    "local": (("window",), {}),
    "longformer": (("window",), {"global_tokens": 1}),
    "bigbird": (("block_size",), {"window_blocks": 3, "global_tokens": 0, "random_blocks": 1, "seed": 0}),
    "strided": (("stride",), {}),
    "fixed": (("stride",), {"summary": 1}),
    "dilated": (("window",), {"dilation": 2}),
}
# Patterns `banded_attention` computes without a full mask: a window plus leading global tokens.
BANDED_KINDS = ("local", "longformer")


class PatternError(ValueError):
    """An `attention_pattern` genforge cannot build; the message says what is accepted."""


def check_pattern(pattern: dict[str, Any]) -> dict[str, Any]:
    """`pattern` with its defaults filled in, or a PatternError naming what was wrong and
    what each kind accepts (`PATTERNS`)."""
    if not isinstance(pattern, dict) or "kind" not in pattern:
        raise PatternError(
            f"attention_pattern must be a dict with a 'kind' (one of {', '.join(PATTERNS)}), got {pattern!r}"
        )
    kind = pattern["kind"]
    if kind not in PATTERNS:
        raise PatternError(f"attention pattern kind {kind!r} is not supported; accepted: {', '.join(PATTERNS)}")
    required, optional = PATTERNS[kind]
    accepted = set(required) | set(optional)
    unknown = set(pattern) - accepted - {"kind"}
    if unknown:
        raise PatternError(
            f"attention pattern {kind!r} takes {', '.join(sorted(accepted))}; unknown: {', '.join(sorted(unknown))}"
        )
    missing = [name for name in required if name not in pattern]
    if missing:
        raise PatternError(f"attention pattern {kind!r} needs {', '.join(missing)}")
    full = {"kind": kind, **optional, **{k: v for k, v in pattern.items() if k != "kind"}}
    for name, value in full.items():
        if name == "kind":
            continue
        smallest = 0 if name in ("global_tokens", "random_blocks", "seed") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise PatternError(f"attention pattern {kind!r}: {name} must be an integer >= {smallest}, got {value!r}")
    if kind == "fixed" and full["summary"] > full["stride"]:
        raise PatternError(f"fixed pattern: summary ({full['summary']}) must be at most the stride ({full['stride']})")
    return full


def pattern_mask(
    pattern: dict[str, Any], query_positions: torch.Tensor, key_positions: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Boolean (batch or 1, queries, keys) mask, True where the pattern lets query i see key j.

    Positions are token positions in each row, (batch or 1, queries) and (batch or 1, keys),
    as `model.build_attention_mask` takes them; causality is applied here too (j <= i) when
    `causal`, so the mask is complete on its own.
    """
    pattern = check_pattern(pattern)
    i = query_positions[:, :, None].long()
    j = key_positions[:, None, :].long()
    offset = i - j  # > 0: the key lies before the query
    distance = offset if causal else offset.abs()
    kind = pattern["kind"]
    if kind in ("local", "longformer"):
        allowed = distance < pattern["window"]
    elif kind == "dilated":
        step = pattern["dilation"]
        allowed = (distance < pattern["window"] * step) & (distance % step == 0)
    elif kind == "strided":
        stride = pattern["stride"]
        allowed = (distance < stride) | (distance % stride == 0)
    elif kind == "fixed":
        stride = pattern["stride"]
        same_block = torch.div(i, stride, rounding_mode="floor") == torch.div(j, stride, rounding_mode="floor")
        allowed = same_block | (j % stride >= stride - pattern["summary"])
    else:  # bigbird
        allowed = _bigbird_blocks(pattern, i, j, causal)
    global_tokens = pattern.get("global_tokens", 0)
    if global_tokens:
        allowed = allowed | (j < global_tokens)
        if not causal:
            allowed = allowed | (i < global_tokens)  # a global query sees every key
    if causal:
        allowed = allowed & (offset >= 0)
    return allowed


def _bigbird_blocks(pattern: dict[str, Any], i: torch.Tensor, j: torch.Tensor, causal: bool) -> torch.Tensor:
    """BigBird's window and random blocks on block indices (global tokens are added by the caller)."""
    size = pattern["block_size"]
    query_block, key_block = torch.div(i, size, rounding_mode="floor"), torch.div(j, size, rounding_mode="floor")
    block_offset = query_block - key_block
    half = pattern["window_blocks"] // 2
    allowed = (block_offset.abs() <= half) if not causal else (block_offset >= 0) & (block_offset <= half)
    if not pattern["random_blocks"]:
        return allowed
    # Random key blocks per query block, drawn from a generator seeded by (seed, query block),
    # so a block gets the same choice however long the sequence and whichever call asks.
    num_query_blocks = int(query_block.max()) + 1
    num_key_blocks = max(int(key_block.max()) + 1, 1)
    table = torch.zeros(max(num_query_blocks, 1), num_key_blocks, dtype=torch.bool)
    for block in range(num_query_blocks):
        picks = [b for b in random_key_blocks(pattern, block, causal, num_key_blocks) if b < num_key_blocks]
        table[block, picks] = True
    table = table.to(i.device)
    # Positions below 0 (left padding) get block 0 here; the caller's padding mask removes them.
    hit = table[query_block.clamp(min=0), key_block.clamp(min=0)]
    return allowed | (hit & (key_block >= 0))


def random_key_blocks(pattern: dict[str, Any], query_block: int, causal: bool, num_key_blocks: int) -> list[int]:
    """The random key blocks BigBird adds for `query_block`: `random_blocks` distinct blocks
    outside its window, earlier ones only when causal (so a causal block's draw does not depend
    on the sequence length), drawn from a generator seeded by the pattern's seed and the block."""
    half = pattern["window_blocks"] // 2
    if causal:
        candidates = list(range(0, max(query_block - half, 0)))
    else:
        candidates = [b for b in range(num_key_blocks) if abs(b - query_block) > half]
    if not candidates:
        return []
    generator = torch.Generator().manual_seed(pattern["seed"] * 1_000_003 + query_block)
    order = torch.randperm(len(candidates), generator=generator)[: pattern["random_blocks"]]
    return sorted(candidates[k] for k in order.tolist())


def dense_pattern_mask(pattern: dict[str, Any], length: int, causal: bool) -> torch.Tensor:
    """The (length, length) mask of `pattern` over positions 0..length-1."""
    positions = torch.arange(length)[None]
    return pattern_mask(pattern, positions, positions, causal)[0]


def density(pattern: dict[str, Any], length: int, causal: bool) -> float:
    """The share of (query, key) pairs the pattern keeps, relative to full (causal) attention."""
    kept = dense_pattern_mask(pattern, length, causal).sum().item()
    full = length * (length + 1) / 2 if causal else length * length
    return kept / full


# ------------------------------------------------------------------------ the banded kernel
@dataclass(frozen=True)
class BandedAttention:
    """A stand-in for a mask that tells attention to run `banded_attention` instead of SDPA
    (the model passes it where a mask tensor would go)."""

    window: int
    global_tokens: int
    causal: bool


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool = True,
    global_tokens: int = 0,
    chunk: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention restricted to a window, plus leading global tokens, computing only the band.

    q: (batch, heads, n, dim); k, v: (batch, kv_heads, n, dim) with kv_heads dividing heads.
    Query i sees keys j with 0 <= i - j < window (|i - j| < window when not causal) and the
    first `global_tokens` keys; when not causal the global queries also see every key. Equals
    SDPA under `pattern_mask({"kind": "longformer", ...})` (or "local" without global tokens).

    Queries go in chunks of `chunk` (default: the window); each chunk's scores cover only the
    keys its band can reach, so time and memory are O(n * (window + chunk + global_tokens)).
    """
    batch, heads, n, dim = q.shape
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"banded_attention takes as many keys as queries (self-attention), got {n} and {k.shape[2]}")
    if window < 1 or global_tokens < 0:
        raise ValueError(f"window must be >= 1 and global_tokens >= 0, got {window} and {global_tokens}")
    if heads != k.shape[1]:
        if heads % k.shape[1]:
            raise ValueError(f"{heads} query heads cannot share {k.shape[1]} key/value heads")
        group = heads // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    chunk = chunk or window
    num_chunks = -(-n // chunk)
    before, after = window - 1, 0 if causal else window - 1
    span = chunk + before + after
    # Pad the sequence so every chunk has `chunk` queries and `span` keys; padded keys are masked.
    padded_n = num_chunks * chunk
    q_chunks = F.pad(q, (0, 0, 0, padded_n - n)).view(batch, heads, num_chunks, chunk, dim)
    k_padded = F.pad(k, (0, 0, before, padded_n - n + after))
    v_padded = F.pad(v, (0, 0, before, padded_n - n + after))
    # (batch, heads, chunks, span, dim) views of overlapping key windows, chunk c starting at
    # key c * chunk - before.
    k_chunks = k_padded.unfold(2, span, chunk).transpose(-1, -2)
    v_chunks = v_padded.unfold(2, span, chunk).transpose(-1, -2)
    query_pos = torch.arange(padded_n, device=q.device).view(num_chunks, chunk, 1)
    key_pos = (torch.arange(num_chunks, device=q.device) * chunk - before).view(num_chunks, 1, 1) + torch.arange(
        span, device=q.device
    )
    offset = query_pos - key_pos
    allowed = (offset.abs() < window) if not causal else (offset >= 0) & (offset < window)
    allowed &= (key_pos >= 0) & (key_pos < n)
    if global_tokens:
        # The global keys go in front of every chunk's band (a band key that is also global is
        # masked there, so it counts once).
        g = min(global_tokens, n)
        allowed &= key_pos >= g
        global_allowed = torch.ones(num_chunks, chunk, g, dtype=torch.bool, device=q.device)
        if causal:
            global_allowed = torch.arange(g, device=q.device) <= query_pos
        allowed = torch.cat((global_allowed, allowed), dim=-1)
        expand = (batch, heads, num_chunks, g, dim)
        k_chunks = torch.cat((k[:, :, None, :g].expand(expand), k_chunks), dim=3)
        v_chunks = torch.cat((v[:, :, None, :g].expand(expand), v_chunks), dim=3)
    scores = torch.matmul(q_chunks * scale, k_chunks.transpose(-1, -2))  # (b, h, chunks, chunk, keys)
    scores.masked_fill_(~allowed, float("-inf"))
    # Half precision sums its softmax in float32; float32 and float64 stay as they are.
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = torch.matmul(weights, v_chunks)
    out = out.reshape(batch, heads, padded_n, dim)[:, :, :n]
    if global_tokens and not causal:
        # Global queries see every key: a few full rows.
        g = min(global_tokens, n)
        out = torch.cat((F.scaled_dot_product_attention(q[:, :, :g], k, v, scale=scale), out[:, :, g:]), dim=2)
    return out


def banded_plan(pattern: dict[str, Any] | None, causal: bool) -> BandedAttention | None:
    """The `BandedAttention` that computes `pattern` without a mask, or None when it has no
    banded form (patterns other than `BANDED_KINDS`)."""
    if pattern is None or pattern["kind"] not in BANDED_KINDS:
        return None
    return BandedAttention(pattern["window"], pattern.get("global_tokens", 0), causal)
