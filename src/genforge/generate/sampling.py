"""Sampling: the request's sampling parameters, the choice of the next token, log-probabilities.

`SamplingParams` is what a request says about how to pick tokens (OpenAI / vLLM vocabulary);
`processors.build_processors` turns it into logits processors. The sampler then picks one
token per row from the processed logits: the argmax at temperature 0, else
``torch.multinomial(softmax(logits))``, exactly transformers' sampling step.
`token_logprobs` gives the OpenAI ``logprobs`` / ``top_logprobs`` fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .validation import check_knob, is_int, is_real, normalise_bias, normalise_token_ids

__all__ = [
    "SamplingParams",
    "sample_next_token",
    "greedy_next_token",
    "make_generator",
    "TokenLogprobs",
    "token_logprobs",
]

_NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """Everything a request says about how to pick tokens (OpenAI / vLLM vocabulary).

    ``temperature = 0`` means greedy (argmax). Neutral defaults switch each knob off:
    ``top_k = 0``, ``top_p = 1``, ``min_p = 0``, ``typical_p = 1``, ``repetition_penalty = 1``,
    penalties 0, ``no_repeat_ngram_size = 0``. ``max_new_tokens = None`` leaves the limit to the
    caller (the model's context length). ``stop`` strings are matched on decoded text by the
    generator; ``stop_token_ids`` end generation like EOS. Validated on construction.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: dict[int, float] | None = None
    min_new_tokens: int = 0
    max_new_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        c = check_knob
        self.temperature = c(
            "temperature", self.temperature, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0 (0 = greedy)"
        )
        self.top_k = c("top_k", self.top_k, lambda v: v >= 0, ">= 0 (0 disables top-k)", integer=True)
        self.top_p = c("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 disables top-p)")
        self.min_p = c("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1] (0 disables min-p)")
        self.typical_p = c("typical_p", self.typical_p, lambda v: 0 < v <= 1, "in (0, 1] (1 disables typical-p)")
        self.repetition_penalty = c(
            "repetition_penalty",
            self.repetition_penalty,
            lambda v: v > 0 and math.isfinite(v),
            "a finite number > 0 (1 disables it)",
        )
        # OpenAI accepts [-2, 2] for both; larger magnitudes mostly produce garbage.
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, c(name, getattr(self, name), lambda v: -2 <= v <= 2, "in [-2, 2] (0 disables it)"))
        self.no_repeat_ngram_size = c(
            "no_repeat_ngram_size", self.no_repeat_ngram_size, lambda v: v >= 0, ">= 0 (0 disables it)", integer=True
        )
        if self.logit_bias is not None:
            self.logit_bias = normalise_bias(self.logit_bias, "logit_bias")
        self.min_new_tokens = c("min_new_tokens", self.min_new_tokens, lambda v: v >= 0, ">= 0", integer=True)
        if self.max_new_tokens is not None:
            self.max_new_tokens = c(
                "max_new_tokens", self.max_new_tokens, lambda v: v >= 1, ">= 1 or None", integer=True
            )
            if self.min_new_tokens > self.max_new_tokens:
                raise ValueError(
                    f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})"
                )
        stop = [self.stop] if isinstance(self.stop, str) else self.stop  # OpenAI allows a bare string
        if stop is None:
            stop = []
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(stop)
        self.stop_token_ids = list(normalise_token_ids(self.stop_token_ids or [], "stop_token_ids"))
        if self.seed is not None:
            self.seed = c("seed", self.seed, lambda v: True, "or None", integer=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, generation_config: Mapping[str, Any], **given: Any) -> SamplingParams:
        """The `given` parameters, where a sampling knob left out (or None) takes the
        checkpoint's generation_config.json value; ``do_sample: false`` there means greedy
        unless a temperature is given. Without either, the defaults above (plain sampling)."""
        chosen = {
            name: generation_config[name] for name in _FROM_GENERATION_CONFIG if generation_config.get(name) is not None
        }
        if generation_config.get("do_sample") is False:
            chosen["temperature"] = 0.0
        chosen.update({name: value for name, value in given.items() if value is not None})
        return cls(**chosen)


# The sampling knobs a checkpoint's generation_config.json may set (transformers' names).
_FROM_GENERATION_CONFIG = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device``: seeded for reproducible sampling, random if None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def _temperatures(spec: Any, batch: int) -> float | list[float]:
    if isinstance(spec, SamplingParams):
        return spec.temperature
    if isinstance(spec, torch.Tensor):
        if spec.dim() == 0:
            return float(spec)
        spec = spec.tolist()
    if is_real(spec):
        if not spec >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {spec!r}")
        return float(spec)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        temps = [p.temperature if isinstance(p, SamplingParams) else p for p in spec]
        if len(temps) != batch or not all(is_real(t) and t >= 0 for t in temps):
            raise ValueError(f"per-row temperatures must be {batch} numbers >= 0, got {list(spec)!r}")
        return [float(t) for t in temps]
    raise ValueError(f"expected SamplingParams, a temperature, or one temperature per row; got {type(spec).__name__}")


def sample_next_token(
    logits: torch.Tensor,
    params_or_temperature: SamplingParams | float | Sequence[float] | torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row from *processed* logits; returns ``(batch,)`` int64.

    Temperature 0 means greedy: ``argmax`` (first index on ties, like transformers). Otherwise
    ``torch.multinomial(softmax(logits))``, exactly transformers' sampling step. The logits
    must already carry the temperature (the :class:`Temperature` processor applied it); the
    temperature here only decides greedy versus sampled, per row when given per row.

    ``generator`` is one ``torch.Generator`` (on the logits' device) for the batch, or one per
    row so that each seeded request draws the same tokens whatever else shares its batch.
    Raises ``ValueError`` if a row has every token at -inf (costs one host sync).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a (batch, vocab) tensor")
    batch = logits.shape[0]
    temps = _temperatures(params_or_temperature, batch)
    greedy_rows = [temps == 0] * batch if isinstance(temps, float) else [t == 0 for t in temps]
    if all(greedy_rows):
        return greedy_next_token(logits)
    _reject_unsamplable(logits)
    probs = torch.softmax(logits.float(), dim=-1)  # float32 at least, for bf16/fp16 logits
    if generator is None or isinstance(generator, torch.Generator):
        sampled = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    else:
        generators = list(generator)
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for {batch} rows")
        # A loop over rows, not vocab: each request advances only its own generator.
        sampled = torch.cat(
            [
                probs[i].argmax().view(1)
                if greedy_rows[i]
                else torch.multinomial(probs[i], num_samples=1, generator=generators[i])
                for i in range(batch)
            ]
        )
    if any(greedy_rows):
        greedy = torch.tensor(greedy_rows, device=logits.device)
        sampled = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return sampled


class TokenLogprobs(NamedTuple):
    """Log-probabilities for the OpenAI ``logprobs`` / ``top_logprobs`` fields.

    ``logprobs``: ``(batch,)`` of the chosen tokens; ``top_logprobs`` / ``top_token_ids``:
    ``(batch, top_n)``, most likely first.
    """

    logprobs: torch.Tensor
    top_logprobs: torch.Tensor
    top_token_ids: torch.Tensor


def greedy_next_token(logits: torch.Tensor) -> torch.Tensor:
    """The first argmax of each (batch, vocab) row: `sample_next_token` at temperature 0.

    Its checks look at the chosen logits alone: argmax picks a NaN wherever a row has one, and
    -inf only where the whole row is -inf, so a chosen value above -inf clears its row. A
    decode step of a small model pays for every full scan of the logits (measured in
    docs/decoding.md, "What decoding costs").
    """
    chosen = logits.argmax(dim=-1)
    if not bool((logits.gather(1, chosen[:, None]) > _NEG_INF).all()):  # NaN > -inf is False too
        _reject_unsamplable(logits)
    return chosen


def _reject_unsamplable(logits: torch.Tensor) -> None:
    """Raise ValueError, naming the rows, if a row has a NaN or every token at -inf."""
    broken = logits.isnan().any(dim=-1)
    if bool(broken.any()):
        raise ValueError(
            f"rows {broken.nonzero().flatten().tolist()[:10]} have NaN logits; the sampling parameters "
            "push the logits out of the float range"
        )
    dead = ~(logits > _NEG_INF).any(dim=-1)
    if bool(dead.any()):
        raise ValueError(
            f"rows {dead.nonzero().flatten().tolist()[:10]} have every token masked to -inf; "
            "the bans, biases and filters leave nothing to choose"
        )


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0) -> TokenLogprobs:
    """``log_softmax(logits)`` at the chosen ``tokens`` plus the ``top_n`` most likely tokens.

    Pass the *raw* model logits (before any processor). That is vLLM V1's default
    (``logprobs_mode="raw_logprobs"``) and what OpenAI returns (logprobs do not move with
    temperature or penalties); processed logits would report -inf for every token a filter
    removed, which makes ``top_logprobs`` useless. The function itself is agnostic: hand it
    processed logits if you want the sampling distribution instead.

    Computed as ``logit - logsumexp`` in float32, so no full ``(batch, vocab)`` log-softmax
    is materialised.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a (batch, vocab) tensor")
    tokens = torch.as_tensor(tokens, device=logits.device).long().reshape(-1)
    if tokens.shape[0] != logits.shape[0]:
        raise ValueError(f"got {tokens.shape[0]} tokens for {logits.shape[0]} rows")
    if not is_int(top_n) or not 0 <= top_n <= logits.shape[-1]:
        raise ValueError(f"top_n must be an int in [0, {logits.shape[-1]}] (the vocab size), got {top_n!r}")
    scores = logits.float()
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    chosen = scores.gather(-1, tokens.unsqueeze(1)) - lse
    top_values, top_ids = torch.topk(scores, top_n, dim=-1)
    return TokenLogprobs(chosen.squeeze(1), top_values - lse, top_ids)
