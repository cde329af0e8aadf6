"""Green-list watermarking of generated text and its statistical detection.

The scheme is Kirchenbauer et al. 2023, "A Watermark for Large Language Models" (soft
watermark, context width 1): before each token is drawn, a pseudo-random *green list* of
about ``gamma * |V|`` tokens is chosen from the previous token and a secret key, and
``delta`` is added to the logits of the green tokens. Sampling then favours green tokens
while leaving the text fluent wherever the model is confident. Whoever holds the key can
recount how many tokens of a text are green: without the watermark a fraction ``gamma`` is
expected, so the one-proportion z-test

    z = (green - gamma * T) / sqrt(T * gamma * (1 - gamma))

over the T scored tokens flags watermarked text with a p-value the reader can interpret.

How green lists are drawn here. The paper seeds a random generator with a hash of the
previous token and takes a random permutation of the vocabulary. genforge instead decides
each (previous token, candidate) pair on its own, with a keyed integer hash:

    green(prev, v)  <=>  mix(s(prev) XOR t(v)) < gamma * 2**32

where ``s`` and ``t`` are the same 32-bit mixer applied to the token ids under different
words of the key. The reasons:

- *identical everywhere*: the arithmetic is integer xor/shift/multiply on int64 tensors with
  every product below 2**63, so CPU, CUDA and a pure-Python recount give the same bits, while
  ``torch.Generator`` streams differ between CPU and CUDA;
- *cheap detection*: a token is checked in O(1), without building the whole green list;
- *an exact null hypothesis*: every distinct pair is green with probability ``gamma``
  independently of the others, so under "not watermarked" the green count of T distinct
  pairs is Binomial(T, gamma) exactly, which is what the z-test assumes. A green list is
  therefore about, not exactly, ``gamma * |V|`` tokens (within ~0.5% at 50k tokens);
- *fast enough on the hot path*: memory-bound, like adding a (batch, vocab) bias (measured
  in docs/decoding.md); seeding a generator and drawing a permutation per row is about as
  fast on CPU but device-dependent.

Membership does not depend on the vocabulary size, so text stays detectable when the
embedding table is padded differently. Repeated (prev, token) pairs are the same coin flip
counted twice; the detector ignores repeats by default (as the paper's follow-up, "On the
Reliability of Watermarks for Large Language Models", Kirchenbauer et al. 2024, advises) so
that repetitive unwatermarked text cannot inflate z.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

from .processors import DecodeContext, PerRow, _cache_field, _rows
from .validation import check_knob

__all__ = ["Watermark", "WatermarkDetection", "detect_watermark", "green_token_mask"]

_MASK32 = 0xFFFFFFFF
# Multiplier of a well-known two-round multiply-xorshift 32-bit mixer. It is below 2**27, so
# a 32-bit value times it stays below 2**59 and int64 arithmetic never overflows.
_MIX_MULTIPLIER = 0x45D9F3B
# Domain-separation string: a change to the scheme must change this, or old texts would be
# scored with the wrong green lists.
_SCHEME = b"genforge-wm-v1"


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer on an int64 tensor of values in [0, 2**32)."""
    x = x ^ (x >> 16)  # a fresh tensor: the in-place steps below never touch the input
    x.mul_(_MIX_MULTIPLIER).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16)
    x.mul_(_MIX_MULTIPLIER).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16)
    return x


def _key_words(key: int | str | bytes) -> tuple[int, int, int, int]:
    """Four 32-bit words derived from the secret key with BLAKE2b (stable across machines and
    Python runs, unlike ``hash()``)."""
    if isinstance(key, bool) or not isinstance(key, (Integral, str, bytes)):
        raise ValueError(f"watermark key must be an int, str or bytes, got {type(key).__name__}")
    data = key if isinstance(key, bytes) else str(int(key) if isinstance(key, Integral) else key).encode()
    prefix = b"i" if isinstance(key, Integral) else b"s" if isinstance(key, str) else b"b"
    digest = hashlib.blake2b(prefix + data, digest_size=16, person=_SCHEME).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))  # type: ignore[return-value]


def _context_seed(prev: torch.Tensor, words: tuple[int, ...]) -> torch.Tensor:
    return _mix32(_mix32((prev & _MASK32) ^ words[0]) ^ words[1])


def _token_code(tokens: torch.Tensor, words: tuple[int, ...]) -> torch.Tensor:
    return _mix32(_mix32((tokens & _MASK32) ^ words[2]) ^ words[3])


def _threshold(gamma: float) -> int:
    # A pair is green when its 32-bit hash falls below gamma * 2**32; gamma in (0, 1) keeps
    # the threshold in [1, 2**32 - 1] for any gamma the validation lets through.
    return min(max(round(gamma * 2**32), 1), 2**32 - 1)


def _check_gamma(gamma) -> float:
    if isinstance(gamma, torch.Tensor):
        raise ValueError("gamma must be one number for the whole batch: detection needs to know it")
    return check_knob(
        "gamma",
        gamma,
        lambda v: 0 < v < 1,
        "strictly between 0 and 1 (the green fraction of the vocabulary)",
        hint="Kirchenbauer et al. use 0.25 or 0.5.",
    )


def green_token_mask(
    prev_tokens: torch.Tensor, tokens: torch.Tensor, key: int | str | bytes, gamma: float
) -> torch.Tensor:
    """Whether each ``tokens`` entry is green after the matching ``prev_tokens`` entry.

    The two integer tensors broadcast against each other (``(batch, 1)`` against ``(vocab,)``
    gives whole green lists; two ``(T,)`` tensors score a text). Returns a bool tensor.
    """
    gamma = _check_gamma(gamma)
    words = _key_words(key)
    return _green(prev_tokens.long(), _token_code(tokens.long(), words), words, _threshold(gamma))


def _green(prev: torch.Tensor, token_codes: torch.Tensor, words: tuple[int, ...], threshold: int) -> torch.Tensor:
    return _mix32(_context_seed(prev, words) ^ token_codes) < threshold


@dataclass(frozen=True)
class Watermark:
    """Kirchenbauer et al.'s soft watermark (2023) as a logits processor: adds ``delta`` to the
    logits of the green list that the previous token and ``key`` select (see the module
    docstring for how green lists are drawn).

    ``gamma``: the green fraction, in (0, 1); 0.25 is the paper's usual choice. ``delta``:
    the bias, >= 0; 2.0 is typical (higher is easier to detect and costs more quality), 0
    switches the watermark off. ``delta`` may be a 1-D tensor with one value per row, so that
    a batch can watermark some rows (delta 0 for the others). ``key``: the secret (int, str or
    bytes) that detection needs.

    Place it *last*, after temperature and the top-k/top-p filters: it then reweights only
    the tokens the filters kept, and the bias is not rescaled by the temperature
    (transformers places its watermark the same way). The previous token is the last column
    of ``ctx.input_ids``, the newest real token of every row in both generators' layouts.
    """

    key: int | str | bytes
    gamma: float = 0.25
    delta: PerRow = 2.0
    _words: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())
    _cache: dict = _cache_field()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_words", _key_words(self.key))
        object.__setattr__(self, "gamma", _check_gamma(self.gamma))
        delta = check_knob(
            "delta",
            self.delta,
            lambda v: (v >= 0) & (v < math.inf),
            "a finite number >= 0 (0 disables the watermark)",
        )
        object.__setattr__(self, "delta", delta)

    def _token_codes(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        key = (device, vocab_size)
        codes = self._cache.get(key)
        if codes is None:  # the per-token half of the hash depends only on the key: compute once
            codes = _token_code(torch.arange(vocab_size, device=device), self._words)
            self._cache[key] = codes
        return codes

    def green_lists(self, prev_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``(batch, vocab)`` bool: the green list after each of ``prev_tokens`` ``(batch,)``."""
        codes = self._token_codes(vocab_size, prev_tokens.device)
        return _green(prev_tokens.long()[:, None], codes[None, :], self._words, _threshold(self.gamma))

    def __call__(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if ctx.seq_len == 0:
            raise ValueError("the watermark needs a previous token, but the context is empty; start from a prompt")
        if not isinstance(self.delta, torch.Tensor) and self.delta == 0:
            return logits
        green = self.green_lists(ctx.input_ids[:, -1], logits.shape[-1])
        return torch.where(green, logits + _rows(self.delta, logits, "delta"), logits)

    def detect(self, token_ids, vocab_size: int, **options) -> WatermarkDetection:
        """:func:`detect_watermark` with this watermark's key and gamma."""
        return detect_watermark(token_ids, vocab_size, self.key, self.gamma, **options)


@dataclass(frozen=True)
class WatermarkDetection:
    """The outcome of :func:`detect_watermark` for one text."""

    z_score: float  # (green - gamma * T) / sqrt(T * gamma * (1 - gamma))
    p_value: float  # one-sided: P(Z >= z) for a standard normal Z (scipy.stats.norm.sf)
    num_scored: int  # T: tokens scored (not the first, not repeated pairs unless counted)
    num_green: int
    green_fraction: float  # num_green / num_scored; gamma is expected without a watermark
    is_watermarked: bool  # z_score > z_threshold
    z_threshold: float
    # Per input token: True/False if scored and green/red, None if not scored (the first
    # token, which has no previous token, and repeats of an earlier pair when ignored).
    token_is_green: tuple[bool | None, ...] = ()


def detect_watermark(
    token_ids: Sequence[int] | torch.Tensor,
    vocab_size: int,
    key: int | str | bytes,
    gamma: float = 0.25,
    *,
    z_threshold: float = 4.0,
    ignore_repeated_pairs: bool = True,
    min_tokens: int = 16,
) -> WatermarkDetection:
    """Test one token sequence for the :class:`Watermark` with ``key`` and ``gamma``.

    Pass the generated tokens, ideally preceded by the last prompt token: each token is scored
    against the one before it, so the first token of ``token_ids`` is only context.
    ``vocab_size`` (the model's) is used to reject ids that cannot be tokens; green lists do not
    depend on it. With ``ignore_repeated_pairs`` (default) a (previous, token) pair counts
    once, however often it recurs. ``z_threshold`` 4 gives a false-positive rate near 3e-5 per
    text (the paper's choice). Fewer than ``min_tokens`` scored tokens raise ``ValueError``:
    the normal approximation, and any verdict, needs a few dozen tokens to mean much.
    """
    gamma = _check_gamma(gamma)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, Integral) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
    if isinstance(z_threshold, bool) or not isinstance(z_threshold, Real) or not math.isfinite(z_threshold):
        raise ValueError(f"z_threshold must be a finite number, got {z_threshold!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, Integral) or min_tokens < 1:
        raise ValueError(f"min_tokens must be an integer >= 1, got {min_tokens!r}")
    tokens = _as_token_list(token_ids)
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token_ids holds ids outside the vocabulary (0..{vocab_size - 1}): {bad[:5]}")

    scored_positions, seen = [], set()
    for i in range(1, len(tokens)):
        pair = (tokens[i - 1], tokens[i])
        if ignore_repeated_pairs:
            if pair in seen:
                continue
            seen.add(pair)
        scored_positions.append(i)
    num_scored = len(scored_positions)
    if num_scored < min_tokens:
        repeats = " after dropping repeated (previous, token) pairs" if ignore_repeated_pairs else ""
        raise ValueError(
            f"only {num_scored} tokens can be scored{repeats} (of {len(tokens)} given; the first is context only); "
            f"detection needs at least min_tokens={min_tokens}. Pass a longer text or lower min_tokens"
        )

    positions = torch.tensor(scored_positions)
    ids = torch.tensor(tokens)
    green = green_token_mask(ids[positions - 1], ids[positions], key, gamma).tolist()
    num_green = sum(green)
    z = (num_green - gamma * num_scored) / math.sqrt(num_scored * gamma * (1 - gamma))
    from scipy.stats import norm  # imported here: scipy.stats takes a noticeable time to import

    per_token: list[bool | None] = [None] * len(tokens)
    for position, is_green in zip(scored_positions, green):
        per_token[position] = is_green
    return WatermarkDetection(
        z_score=z,
        p_value=float(norm.sf(z)),
        num_scored=num_scored,
        num_green=num_green,
        green_fraction=num_green / num_scored,
        is_watermarked=z > z_threshold,
        z_threshold=float(z_threshold),
        token_is_green=tuple(per_token),
    )


def _as_token_list(token_ids) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
            raise ValueError(
                f"token_ids must be a 1-D integer tensor (one text), got {token_ids.dtype} {tuple(token_ids.shape)}"
            )
        return token_ids.tolist()
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise ValueError(f"token_ids must be a sequence of token ids (one text), got {type(token_ids).__name__}")
    if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in token_ids):
        raise ValueError("token_ids must hold integer token ids; decode text with the model's tokenizer first")
    return [int(t) for t in token_ids]
