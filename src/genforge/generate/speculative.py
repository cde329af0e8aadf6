"""Speculative decoding: a cheap proposer drafts tokens, the target checks them in one pass.

Speculative sampling (Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"). Each round:

1. A proposer drafts up to k tokens d_1..d_k, with a distribution q_i for each.
2. The target runs once on the newest accepted token followed by d_1..d_k and so gets its
   distribution p_i at each of the k + 1 positions.
3. Left to right, d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)). At the first
   rejection one token is drawn from norm(max(0, p_i - q_i)) and the round ends; if all k are
   accepted, a bonus token is drawn from p_{k+1}.

Every emitted token is then distributed exactly as the target alone would sample it; the
proposer only changes how many tokens one target forward yields. In greedy mode
(temperature 0) a draft is accepted while it equals the target's argmax, and the first
disagreement is replaced by the target's argmax, so the output is token-identical to
target-only greedy decoding (up to float noise between a k+1-token and a 1-token forward).

Two proposers:

- `speculative_generate`: a smaller draft model with the same vocabulary samples the drafts
  autoregressively (q_i is its distribution).
- `prompt_lookup_generate`: prompt-lookup decoding (Saxena 2023): the draft is what followed
  the most recent earlier occurrence of the context's last n tokens (n from `max_ngram_size`
  down to `min_ngram_size`). It needs no draft model and shines when the output copies the
  input (summaries, code edits, retrieval answers). Its q_i is a point mass on d_i, so a draft
  is accepted with probability p_i(d_i) and a rejection resamples from p_i without d_i.

How the sampling processors apply (`SamplingParams` -> `build_processors`): one processor list
is built for the request and applied, at every drafted position, to both the draft model's and
the target's logits with the same `DecodeContext` (the prompt, the tokens accepted so far and
the drafts before that position; `prompt_length` is the prompt's length). p_i and q_i are the
softmaxes of the processed logits, so temperature, top-k/p, min-p, typical-p, penalties, bans
and biases shape both. The output follows the *processed target* distribution: exactly what
`generator.generate` samples from with the same `SamplingParams`. Processing the draft the same
way only makes it agree with the target more often; correctness never depends on it.

Both models keep their own contiguous KV cache (`DecodeRequest.kv_cache`); on rejection each is rolled back with
`crop(length)` to the tokens that were kept, and the next round feeds each model only the
tokens its cache lacks. Batch size is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Protocol

import torch

from ..model import Transformer
from .generator import stop_watcher
from .processors import DecodeContext, LogitsProcessor, apply_processors
from .request import DecodeRequest, DecodeRequestError, decoder_config
from .sampling import SamplingParams, make_generator

__all__ = [
    "SpeculativeStats",
    "SpeculativeCompletion",
    "SpeculativeOptions",
    "PromptLookupOptions",
    "speculative_generate",
    "prompt_lookup_generate",
    "run_speculative",
    "run_prompt_lookup",
]


@dataclass
class SpeculativeStats:
    """How well the proposer guessed. A target forward is one verification round."""

    target_forwards: int = 0
    draft_forwards: int = 0  # 0 for prompt lookup
    drafted: int = 0  # draft tokens the target checked
    accepted: int = 0  # of those, how many were kept
    generated: int = 0  # tokens emitted: accepted drafts plus one target token per round

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_target_forward(self) -> float:
        """Mean number of accepted draft tokens per target forward."""
        return self.accepted / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """Mean tokens emitted per target forward: the speed-up bound over plain decoding (1.0)."""
        return self.generated / self.target_forwards if self.target_forwards else 0.0


@dataclass
class SpeculativeCompletion:
    """What speculative decoding produced for one prompt."""

    token_ids: list[int] = field(default_factory=list)  # generated tokens, stop token included
    finish_reason: str | None = None  # "stop" (eos, stop token or stop string) or "length"
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)
    text: str | None = None  # with a tokenizer: the continuation's text, cut before any stop string


# ------------------------------------------------------------------------------ the tokens
class _TokenRule:
    """Processed logits -> distribution or choice, shared by the target and the draft."""

    def __init__(
        self, params: SamplingParams, processors: list[LogitsProcessor], prompt_length: int, device: torch.device
    ) -> None:
        self.greedy = params.greedy
        self.processors = processors
        self.prompt_length = prompt_length
        self.device = device
        self.generator = make_generator(params.seed, device)

    def process(self, logits: torch.Tensor, tokens: torch.Tensor, drafts: list[int]) -> torch.Tensor:
        """Processed float32 logits (positions, vocab) for the last positions of `tokens`
        followed by `drafts`: the last row continues all of `drafts`, each row before it one
        draft fewer (the draft model scores one position, the target len(drafts) + 1)."""
        logits = logits.float()
        if not self.processors:  # the common greedy case: no per-row contexts to build
            return logits
        proposal = tokens.new_tensor(drafts)
        first = len(drafts) + 1 - logits.shape[0]
        rows = [
            apply_processors(
                logits[i : i + 1],
                DecodeContext(torch.cat((tokens, proposal[: first + i]))[None], self.prompt_length),
                self.processors,
            )
            for i in range(logits.shape[0])
        ]
        return torch.cat(rows)

    def probabilities(self, processed: torch.Tensor) -> torch.Tensor:
        return torch.softmax(processed, dim=-1)

    def draw(self, probabilities: torch.Tensor) -> int:
        return int(torch.multinomial(probabilities, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, device=self.device))


# ------------------------------------------------------------------------------ proposers
class _Proposer(Protocol):
    """Where drafts come from: a draft model or a lookup in the context."""

    def propose(
        self, tokens: torch.Tensor, limit: int, rule: _TokenRule, eos: set[int]
    ) -> tuple[list[int], torch.Tensor | None]:
        """Up to `limit` draft tokens continuing `tokens`, and their distributions (drafts,
        vocab); None in greedy mode, where only the tokens matter. Drafting stops after an
        end token: nothing after it would be used."""

    def keep(self, length: int) -> None:
        """The context now agrees with the proposal only up to `length` tokens."""


class _DraftModel:
    """Drafts by sampling a smaller model autoregressively."""

    def __init__(
        self, model: Transformer, request: DecodeRequest, stats: SpeculativeStats, min_confidence: float = 0.0
    ) -> None:
        self.model = model
        self.cache = request.kv_cache(model, 1, request.capacity)
        self.stats = stats
        self.min_confidence = min_confidence

    def propose(self, tokens, limit, rule, eos):
        drafts: list[int] = []
        distributions = []
        # The first draft step feeds whatever the last round accepted that the draft cache
        # does not hold yet; later steps feed the previous draft alone. The loop runs once per
        # drafted token, so it does no more than the draft model and the choice need.
        fed = tokens[None, self.cache.length :]
        for _ in range(limit):
            logits = self.model(fed, cache=self.cache, logits_to_keep=1).logits[0]
            self.stats.draft_forwards += 1
            processed = rule.process(logits, tokens, drafts)
            if rule.greedy:
                token = int(processed[0].argmax())
                confidence = (
                    float(torch.exp(processed[0, token] - processed[0].logsumexp(-1))) if self.min_confidence else 1.0
                )
            else:
                q = rule.probabilities(processed)[0]
                token = rule.draw(q)
                distributions.append(q)
                confidence = float(q[token])
            drafts.append(token)
            # An unsure draft is likely to be rejected, and so is everything drafted after it:
            # stop here rather than pay for more draft steps and a wider verification.
            if token in eos or confidence < self.min_confidence:
                break
            fed = tokens.new_tensor([[token]])
        return drafts, (torch.stack(distributions) if distributions else None)

    def keep(self, length):
        self.cache.crop(min(length, self.cache.length))


class _PromptLookup:
    """Drafts by copying what followed the most recent earlier match of the context's tail."""

    def __init__(self, max_ngram_size: int, min_ngram_size: int, vocab_size: int) -> None:
        self.max_ngram_size, self.min_ngram_size = max_ngram_size, min_ngram_size
        self.vocab_size = vocab_size

    def propose(self, tokens, limit, rule, eos):
        drafts = _lookup_continuation(tokens, limit, self.max_ngram_size, self.min_ngram_size)
        for i, token in enumerate(drafts):
            if token in eos:
                drafts = drafts[: i + 1]
                break
        if rule.greedy or not drafts:
            return drafts, None
        # A deterministic proposal: q is a point mass on each draft token.
        point_masses = torch.nn.functional.one_hot(tokens.new_tensor(drafts), self.vocab_size).float()
        return drafts, point_masses

    def keep(self, length):
        pass


def _lookup_continuation(tokens: torch.Tensor, limit: int, max_ngram_size: int, min_ngram_size: int) -> list[int]:
    """Up to `limit` tokens that followed the most recent earlier occurrence of the last n
    tokens, trying the longest n first (a longer match is a more reliable predictor)."""
    length = tokens.shape[0]
    if limit < 1:
        return []
    for n in range(min(max_ngram_size, length - 1), min_ngram_size - 1, -1):
        tail = tokens[length - n :]
        # Windows starting before the tail itself; each has at least one token after it.
        windows = tokens[: length - 1].unfold(0, n, 1)
        starts = (windows == tail).all(dim=-1).nonzero().flatten()
        if starts.numel():
            start = int(starts[-1]) + n
            return tokens[start : start + limit].tolist()
    return []


# ------------------------------------------------------------------------------ the loop
@dataclass(frozen=True)
class SpeculativeOptions:
    """The draft model and how many tokens it proposes per round (see `speculative_generate`).
    The knobs can be checked before the draft is loaded; decoding needs it."""

    draft: Transformer | None = None
    num_draft_tokens: int = 4
    draft_confidence: float = 0.0

    def __post_init__(self) -> None:
        if self.draft is not None:
            decoder_config(self.draft, "draft model")
        _validate_num_draft_tokens(self.num_draft_tokens)
        confidence = self.draft_confidence
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
            raise DecodeRequestError(f"draft_confidence must be a probability in [0, 1], got {confidence!r}")


@dataclass(frozen=True)
class PromptLookupOptions:
    """How prompt lookup drafts (see `prompt_lookup_generate`)."""

    num_draft_tokens: int = 10
    max_ngram_size: int = 3
    min_ngram_size: int = 1

    def __post_init__(self) -> None:
        _validate_num_draft_tokens(self.num_draft_tokens)
        for name in ("max_ngram_size", "min_ngram_size"):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise DecodeRequestError(f"{name} must be an integer >= 1, got {value!r}")
        if self.min_ngram_size > self.max_ngram_size:
            raise DecodeRequestError(
                f"min_ngram_size ({self.min_ngram_size}) must not exceed max_ngram_size ({self.max_ngram_size})"
            )


def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompt_ids: Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    *,
    num_draft_tokens: int = 4,
    draft_confidence: float = 0.0,
    eos_token_ids: Sequence[int] | None = None,
    tokenizer=None,
) -> SpeculativeCompletion:
    """Generate for one prompt with `draft` proposing `num_draft_tokens` tokens per round and
    `target` verifying them (speculative sampling; module docstring). The output is
    distributed as `generator.generate(target, ...)` with the same `params` (identical tokens
    for temperature 0). eos ids default to the target config's and the tokenizer's. Stop
    strings and `text` need `tokenizer`.

    `draft_confidence` ends a round's drafting early, after a draft token whose probability
    under the (processed) draft distribution is below it: a dynamic draft length, as
    transformers' `assistant_confidence_threshold`. 0 always drafts `num_draft_tokens`. It
    changes only the speed, never the output distribution."""
    options = SpeculativeOptions(draft, num_draft_tokens, draft_confidence)
    request = DecodeRequest.resolve(
        target,
        prompt_ids,
        params or SamplingParams(),
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        role="target model",
    )
    return run_speculative(target, request, options)


def prompt_lookup_generate(
    target: Transformer,
    prompt_ids: Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    *,
    num_draft_tokens: int = 10,
    max_ngram_size: int = 3,
    min_ngram_size: int = 1,
    eos_token_ids: Sequence[int] | None = None,
    tokenizer=None,
) -> SpeculativeCompletion:
    """Generate for one prompt with prompt-lookup (n-gram) drafts of up to `num_draft_tokens`
    tokens, matched on the last `max_ngram_size` down to `min_ngram_size` tokens of the context.
    Same output distribution as `generator.generate(target, ...)` (identical tokens for
    temperature 0). Stop strings and `text` need `tokenizer`."""
    options = PromptLookupOptions(num_draft_tokens, max_ngram_size, min_ngram_size)
    request = DecodeRequest.resolve(
        target,
        prompt_ids,
        params or SamplingParams(),
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        role="target model",
    )
    return run_prompt_lookup(target, request, options)


def run_speculative(target: Transformer, request: DecodeRequest, options: SpeculativeOptions) -> SpeculativeCompletion:
    """`speculative_generate` on a resolved request of one prompt."""
    draft = options.draft
    if draft is None:
        raise DecodeRequestError(
            "speculative decoding needs a draft model: a smaller model with the target's "
            "vocabulary, as SpeculativeOptions(draft=...)"
        )
    if draft.config.vocab_size != target.config.vocab_size:
        raise DecodeRequestError(
            f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
            f"({target.config.vocab_size}); speculative decoding compares their distributions token by token, "
            "so both must use the same tokenizer and vocabulary size"
        )
    if draft.device != target.device:
        raise DecodeRequestError(f"draft is on {draft.device} but target on {target.device}; put both on one device")
    prompt = _only_prompt(request)
    request.check_model(draft, "draft model")
    stats = SpeculativeStats()
    proposer = _DraftModel(draft, request, stats, options.draft_confidence)
    return _speculate(target, proposer, request, prompt, options.num_draft_tokens, stats)


def run_prompt_lookup(
    target: Transformer, request: DecodeRequest, options: PromptLookupOptions
) -> SpeculativeCompletion:
    """`prompt_lookup_generate` on a resolved request of one prompt."""
    prompt = _only_prompt(request)
    stats = SpeculativeStats()
    proposer = _PromptLookup(options.max_ngram_size, options.min_ngram_size, target.config.vocab_size)
    return _speculate(target, proposer, request, prompt, options.num_draft_tokens, stats)


def _speculate(
    target: Transformer,
    proposer: _Proposer,
    request: DecodeRequest,
    prompt: list[int],
    num_draft_tokens: int,
    stats: SpeculativeStats,
) -> SpeculativeCompletion:
    params, tokenizer, max_new_tokens = request.params, request.tokenizer, request.max_new_tokens
    eos = set(request.eos_token_ids)
    device = target.device
    watcher = stop_watcher(tokenizer, params, prompt)
    text: list[str] = []
    rule = _TokenRule(params, request.logits_processors(), len(prompt), device)
    cache = request.kv_cache(target, 1, request.capacity)
    tokens = torch.tensor(prompt, dtype=torch.long, device=device)
    completion = SpeculativeCompletion(stats=stats)
    generated = completion.token_ids

    with torch.inference_mode():
        while True:
            # One token always comes from the target, so draft at most one fewer than remain.
            limit = min(num_draft_tokens, max_new_tokens - len(generated) - 1)
            drafts, draft_probs = proposer.propose(tokens, limit, rule, eos)
            proposal = tokens.new_tensor(drafts)
            # The target sees what its cache lacks (the newest accepted token, or the whole
            # prompt on the first round) followed by the drafts: len(drafts) + 1 distributions.
            fed = torch.cat((tokens[cache.length :], proposal))
            logits = target(fed[None], cache=cache, logits_to_keep=len(drafts) + 1).logits[0]
            stats.target_forwards += 1
            stats.drafted += len(drafts)
            processed = rule.process(logits, tokens, drafts)
            if rule.greedy:
                accepted, next_token = _verify_greedy(drafts, processed)
            else:
                accepted, next_token = _verify_sampled(drafts, draft_probs, rule.probabilities(processed), rule)
            stats.accepted += accepted

            kept = len(tokens) + accepted  # context tokens both caches may keep
            new_tokens = drafts[:accepted] + [next_token]
            for token in new_tokens:
                generated.append(token)
                piece, hit_stop = watcher.push(token)
                text.append(piece)
                if token in eos or hit_stop:
                    completion.finish_reason = "stop"
                elif len(generated) == max_new_tokens:
                    completion.finish_reason = "length"
                if completion.finish_reason:
                    if not hit_stop:
                        text.append(watcher.flush())
                    break
            stats.generated = len(generated)
            if completion.finish_reason:
                completion.text = "".join(text) if tokenizer is not None else None
                return completion
            tokens = torch.cat((tokens, tokens.new_tensor(new_tokens)))
            # Roll back past the first rejected draft; the new target token is not cached yet.
            cache.crop(kept)
            proposer.keep(kept)


def _verify_greedy(drafts: list[int], processed: torch.Tensor) -> tuple[int, int]:
    """Accept drafts while they equal the target's argmax; then take the target's token."""
    choices = processed.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
        accepted += 1
    return accepted, choices[accepted]


def _verify_sampled(drafts: list[int], q: torch.Tensor | None, p: torch.Tensor, rule: _TokenRule) -> tuple[int, int]:
    """The speculative-sampling rule (Leviathan et al. 2023, Algorithm 1)."""
    for i, token in enumerate(drafts):
        p_token, q_token = float(p[i, token]), float(q[i, token])
        # Accept with probability min(1, p/q): u < p/q, written without the division.
        if rule.uniform() * q_token < p_token:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = float(residual.sum())
        # p <= q everywhere only happens when p == q up to rounding; then p itself is right.
        return i, rule.draw(residual / total if total > 0 else p[i])
    return len(drafts), rule.draw(p[len(drafts)])


# ------------------------------------------------------------------------------ checks
def _validate_num_draft_tokens(value) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise DecodeRequestError(f"num_draft_tokens must be an integer >= 1, got {value!r}")


def _only_prompt(request: DecodeRequest) -> list[int]:
    if len(request.prompts) != 1:
        raise DecodeRequestError(
            f"speculative decoding takes one prompt at a time, got a batch of {len(request.prompts)}"
        )
    return request.prompts[0]
