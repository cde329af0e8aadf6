"""Two decoders named "contrastive": contrastive search and contrastive decoding.

**Contrastive search** (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation") is a deterministic decoder that avoids the loops of greedy and beam search
without sampling's incoherence. At each step it takes the `top_k` most likely tokens as
candidates, runs each one through the model to get the hidden state it would have, and picks

    argmax_v  (1 - alpha) * p(v | context)  -  alpha * max_j cos(h_v, h_j)

where the h_j are the final hidden states (after the last norm) of every earlier token,
prompt included. The second term, the *degeneration penalty*, is large for a candidate whose
representation is close to something already said. `alpha = 0` is greedy decoding.

Cost: the candidates of a step are one batched forward of `top_k` one-token rows over the
KV cache, so a step costs about `top_k` greedy steps, and the chosen candidate's forward
already gives the next step's logits. Each prompt keeps `top_k` cache rows; after a choice
only the newest position of the chosen row is copied into its siblings (not the whole
history, which `ContiguousKVCache.select` would copy).

**Contrastive decoding** (Li et al. 2023, "Contrastive Decoding: Open-ended Text Generation
as Optimization") searches for text that a large *expert* model likes much more than a small
*amateur* model, since the failure modes of language models (repetition, blandness,
incoherence) are worse in small ones. With the adaptive plausibility constraint

    V_head = {v : p_expert(v) >= alpha * max_w p_expert(w)}

the score of token v is `log p_expert(v) - log p_amateur(v)` on V_head and -inf elsewhere;
the constraint keeps the amateur from promoting implausible tokens that merely happen to be
even less likely under the amateur. Li et al. soften the amateur with a temperature (their
tau); `amateur_temperature` is it. Li et al. search the objective with a small beam; here
each step takes the best-scoring token (a beam of one) or samples from
softmax(score / temperature). Both models advance over their own KV caches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
import torch.nn.functional as F

from ..model import Transformer
from .generator import Completion
from .processors import DecodeContext, LogitsProcessor, apply_processors
from .request import DecodeRequest, DecodeRequestError, decoder_config
from .sampling import SamplingParams, make_generator

__all__ = [
    "ContrastiveSearchOptions",
    "ContrastiveDecodingOptions",
    "contrastive_search",
    "run_contrastive_search",
    "contrastive_search_scores",
    "contrastive_decoding",
    "run_contrastive_decoding",
    "contrastive_decoding_scores",
]

_NEG_INF = float("-inf")


# ------------------------------------------------------------------------ pure scoring functions
def contrastive_search_scores(
    candidate_probs: torch.Tensor,
    candidate_hidden: torch.Tensor,
    context_hidden: torch.Tensor,
    penalty_alpha: float,
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Su et al.'s score of each candidate: ``(1 - alpha) * p - alpha * max_j cos(h_v, h_j)``.

    candidate_probs: ``(batch, k)`` model probabilities of the candidates.
    candidate_hidden: ``(batch, k, hidden)`` each candidate's own final hidden state.
    context_hidden: ``(batch, length, hidden)`` final hidden states of the tokens before.
    context_mask: optional ``(batch, length)``, False (or 0) at padding, which is left out of
        the max.
    Returns ``(batch, k)`` float32 scores; a candidate of probability 0 scores -inf, so a
    token the processors banned is never chosen for being dissimilar.
    """
    if candidate_probs.dim() != 2 or candidate_hidden.dim() != 3 or context_hidden.dim() != 3:
        raise ValueError(
            "expected candidate_probs (batch, k), candidate_hidden (batch, k, hidden) and context_hidden "
            f"(batch, length, hidden); got {tuple(candidate_probs.shape)}, {tuple(candidate_hidden.shape)}, "
            f"{tuple(context_hidden.shape)}"
        )
    if candidate_hidden.shape[:2] != candidate_probs.shape or context_hidden.shape[0] != candidate_probs.shape[0]:
        raise ValueError(
            f"shapes disagree: candidate_probs {tuple(candidate_probs.shape)}, candidate_hidden "
            f"{tuple(candidate_hidden.shape)}, context_hidden {tuple(context_hidden.shape)}"
        )
    # F.normalize divides by max(norm, eps): an all-zero state has cosine 0 instead of NaN.
    candidates = F.normalize(candidate_hidden.float(), dim=-1)
    context = F.normalize(context_hidden.float(), dim=-1)
    cosine = torch.bmm(candidates, context.transpose(1, 2))  # (batch, k, length)
    if context_mask is not None:
        cosine = cosine.masked_fill(~context_mask.bool()[:, None, :], _NEG_INF)
    degeneration_penalty = cosine.amax(dim=-1)
    probs = candidate_probs.float()
    scores = (1.0 - penalty_alpha) * probs - penalty_alpha * degeneration_penalty
    return scores.masked_fill(probs <= 0, _NEG_INF)


def contrastive_decoding_scores(
    expert_logits: torch.Tensor,
    amateur_logits: torch.Tensor,
    alpha: float = 0.1,
    amateur_temperature: float = 1.0,
) -> torch.Tensor:
    """Li et al.'s contrastive objective for one step, ``(batch, vocab)`` float32:
    ``log p_expert - log p_amateur`` on the plausible head ``p_expert >= alpha * max p_expert``
    and -inf elsewhere. The amateur's logits are divided by ``amateur_temperature`` first."""
    _check_alpha(alpha)
    _check_positive("amateur_temperature", amateur_temperature)
    if expert_logits.shape != amateur_logits.shape or expert_logits.dim() != 2:
        raise ValueError(
            f"expert and amateur logits must both be (batch, vocab) of one shape, got "
            f"{tuple(expert_logits.shape)} and {tuple(amateur_logits.shape)}; do the models share a vocabulary?"
        )
    expert = torch.log_softmax(expert_logits.float(), dim=-1)
    amateur = torch.log_softmax(amateur_logits.float() / amateur_temperature, dim=-1)
    # Compared in log space: p >= alpha * max p  <=>  log p >= log alpha + max log p. A token
    # of expert probability 0 is never in the head, even with alpha = 0 (log 0 = -inf).
    floor = (math.log(alpha) if alpha > 0 else _NEG_INF) + expert.amax(dim=-1, keepdim=True)
    head = (expert >= floor) & (expert > _NEG_INF)
    return torch.where(head, expert - amateur, torch.full_like(expert, _NEG_INF))


# --------------------------------------------------------------------------- contrastive search
@dataclass(frozen=True)
class ContrastiveSearchOptions:
    """The knobs of contrastive search (see `contrastive_search`). `top_k` None takes the
    request's `params.top_k`, or 4 where that is 0 (off)."""

    penalty_alpha: float = 0.6
    top_k: int | None = None

    def __post_init__(self) -> None:
        _check_alpha(self.penalty_alpha, "penalty_alpha")


def contrastive_search(
    model: Transformer,
    prompt_ids: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor,
    penalty_alpha: float,
    top_k: int,
    max_new_tokens: int | None,
    *,
    eos_token_ids: Sequence[int] | None = None,
    processors: Sequence[LogitsProcessor] = (),
) -> list[Completion]:
    """Contrastive search (Su et al. 2022) for a batch of prompts (token-id lists, left-padded
    internally); one `Completion` per prompt, as `generator.generate` returns.

    penalty_alpha: weight of the degeneration penalty in [0, 1]; 0 is greedy decoding.
        0.6 with top_k 4 to 10 is a common setting.
    top_k: candidates per step (>= 1); each costs one row of the step's forward.
    max_new_tokens: None runs to the end of the context.
    eos_token_ids: default the model config's; `[]` to stop only at `max_new_tokens`.
    processors: run on each step's logits before the softmax that gives p(v) (penalties,
        bans, biases from `processors.py`), where transformers' version applied them too.
    """
    options = ContrastiveSearchOptions(penalty_alpha, top_k)
    request = DecodeRequest.resolve(model, prompt_ids, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids)
    return run_contrastive_search(model, request, options, processors=processors)


def run_contrastive_search(
    model: Transformer,
    request: DecodeRequest,
    options: ContrastiveSearchOptions,
    *,
    processors: Sequence[LogitsProcessor] = (),
) -> list[Completion]:
    """`contrastive_search` on a resolved request: its penalties and bans apply (not its
    temperature or truncation filters: the search chooses by score), then `processors`. Stop
    strings are not detected."""
    config = model.config
    top_k = (request.params.top_k or 4) if options.top_k is None else options.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or not 1 <= top_k <= config.vocab_size:
        raise DecodeRequestError(
            f"top_k must be an integer in [1, {config.vocab_size}] (the vocabulary size), got {top_k!r}"
        )
    penalty_alpha = options.penalty_alpha
    processors = request.logits_processors(processors, sampling=False)
    prompts, max_new_tokens, eos = request.prompts, request.max_new_tokens, set(request.eos_token_ids)
    device, batch, k = model.device, len(prompts), int(top_k)
    tokens, mask, longest = _left_padded(prompts, max_new_tokens, device)
    capacity = tokens.shape[1]
    cache = request.kv_cache(model, batch, capacity)
    # Final hidden states of every token so far, the "previous tokens" of the penalty.
    history = torch.zeros(batch, capacity, config.hidden_size, dtype=torch.float32, device=device)
    completions = [Completion() for _ in prompts]
    rows = list(range(batch))  # original prompt of each active row

    with torch.inference_mode():
        out = model(tokens[:, :longest], attention_mask=mask[:, :longest], cache=cache, logits_to_keep=1)
        history[:, :longest] = out.hidden_states.float()
        logits = out.logits[:, -1].float()
        # Every prompt gets k cache rows, one per candidate; they share the prompt's entries.
        cache.select(torch.arange(batch, device=device).repeat_interleave(k))
        length = longest
        for step in range(max_new_tokens):
            active = len(rows)
            context = DecodeContext(tokens[:, :length], prompt_length=longest, attention_mask=mask[:, :length])
            logits = apply_processors(logits, context, processors)
            _check_some_token_left(logits)
            probs = torch.softmax(logits, dim=-1)
            candidate_probs, candidate_ids = probs.topk(k, dim=-1)  # (active, k), most likely first

            mask[:, length] = 1
            candidate_mask = mask[:, : length + 1].repeat_interleave(k, dim=0)
            out = model(candidate_ids.reshape(-1, 1), attention_mask=candidate_mask, cache=cache, logits_to_keep=1)
            candidate_hidden = out.hidden_states[:, -1].float().view(active, k, -1)
            scores = contrastive_search_scores(
                candidate_probs, candidate_hidden, history[:, :length], penalty_alpha, mask[:, :length]
            )
            choice = scores.argmax(dim=-1)  # first (most likely) candidate on ties
            picked = torch.arange(active, device=device) * k + choice  # cache row of each choice
            next_tokens = candidate_ids.gather(1, choice[:, None]).squeeze(1)
            tokens[:, length] = next_tokens
            history[:, length] = candidate_hidden[torch.arange(active, device=device), choice]
            logits = out.logits[picked, -1].float()
            # Only the newest position differs between a prompt's candidate rows: copying it
            # makes all k rows continue the chosen candidate.
            cache.share_position(picked.repeat_interleave(k), length)
            length += 1

            finished = _record(completions, rows, next_tokens.tolist(), eos, step == max_new_tokens - 1)
            if len(finished) == active:
                break
            if finished:
                keep = torch.tensor([p for p in range(active) if p not in finished], device=device)
                tokens, mask, history, logits = (t.index_select(0, keep) for t in (tokens, mask, history, logits))
                cache.select((keep[:, None] * k + torch.arange(k, device=device)).reshape(-1))
                rows = [rows[p] for p in keep.tolist()]
    return completions


# -------------------------------------------------------------------------- contrastive decoding
@dataclass(frozen=True)
class ContrastiveDecodingOptions:
    """The knobs of contrastive decoding (see `contrastive_decoding`); the `amateur` is the
    weaker model, which the knobs can be checked without. Temperature and seed are the
    request's."""

    amateur: Transformer | None = None
    alpha: float = 0.1
    amateur_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.amateur is not None:
            decoder_config(self.amateur, "amateur")
        _check_alpha(self.alpha)
        _check_positive("amateur_temperature", self.amateur_temperature)


def contrastive_decoding(
    expert: Transformer,
    amateur: Transformer,
    prompt_ids: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor,
    alpha: float = 0.1,
    max_new_tokens: int | None = 64,
    *,
    amateur_temperature: float = 1.0,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    processors: Sequence[LogitsProcessor] = (),
) -> list[Completion]:
    """Contrastive decoding (Li et al. 2023) of `expert` against `amateur` for a batch of
    prompts; one `Completion` per prompt.

    alpha: the plausibility cut in [0, 1]; tokens below `alpha` times the expert's top
        probability are never chosen. 0.1 is the paper's value; 1 keeps only the expert's top
        token (greedy decoding of the expert); 0 removes the constraint (not advised).
    max_new_tokens: None runs to the end of the context.
    amateur_temperature: Li et al.'s tau, > 0, tuned per model family (0.5 to 1).
    temperature: 0 (default) takes the best score; > 0 samples from
        softmax(score / temperature), reproducibly with `seed`.
    eos_token_ids: default the expert config's; `[]` to stop only at `max_new_tokens`.
    processors: applied to the expert's logits before scoring (penalties, bans: a banned
        token has expert probability 0 and so falls outside the plausible set).

    The models must share a tokenizer; genforge checks what it can, the vocabulary size.
    """
    options = ContrastiveDecodingOptions(amateur, alpha, amateur_temperature)
    params = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=max_new_tokens)
    request = DecodeRequest.resolve(expert, prompt_ids, params, eos_token_ids=eos_token_ids, role="expert")
    return run_contrastive_decoding(expert, request, options, processors=processors)


def run_contrastive_decoding(
    expert: Transformer,
    request: DecodeRequest,
    options: ContrastiveDecodingOptions,
    *,
    processors: Sequence[LogitsProcessor] = (),
) -> list[Completion]:
    """`contrastive_decoding` on a resolved request (made for the expert). Its temperature
    and seed choose how a token is picked from the scores; its penalties and bans apply to the
    expert's logits, then `processors`. Stop strings are not detected."""
    amateur, alpha, amateur_temperature = options.amateur, options.alpha, options.amateur_temperature
    if amateur is None:
        raise DecodeRequestError(
            "contrastive decoding needs an amateur model: a weaker model with the expert's "
            "vocabulary, as ContrastiveDecodingOptions(amateur=...)"
        )
    if expert.config.vocab_size != amateur.config.vocab_size:
        raise DecodeRequestError(
            f"the expert's vocabulary has {expert.config.vocab_size} tokens but the amateur's has "
            f"{amateur.config.vocab_size}; contrastive decoding compares the two distributions token by token, "
            "so both models must use the same tokenizer and vocabulary size"
        )
    if expert.device != amateur.device:
        raise DecodeRequestError(
            f"the expert is on {expert.device} but the amateur on {amateur.device}; put them on one device"
        )
    request.check_model(amateur, "amateur")
    temperature, seed = request.params.temperature, request.params.seed
    processors = request.logits_processors(processors, sampling=False)
    prompts, max_new_tokens, eos = request.prompts, request.max_new_tokens, set(request.eos_token_ids)
    device, batch = expert.device, len(prompts)
    generator = make_generator(seed, device) if temperature > 0 else None
    tokens, mask, longest = _left_padded(prompts, max_new_tokens, device)
    capacity = tokens.shape[1]
    models = (expert, amateur)
    caches = [request.kv_cache(m, batch, capacity) for m in models]
    completions = [Completion() for _ in prompts]
    rows = list(range(batch))

    with torch.inference_mode():
        step_input, length = tokens[:, :longest], longest
        for step in range(max_new_tokens):
            expert_logits, amateur_logits = (
                m(step_input, attention_mask=mask[:, :length], cache=c, logits_to_keep=1).logits[:, -1]
                for m, c in zip(models, caches)
            )
            if processors:
                context = DecodeContext(tokens[:, :length], longest, mask[:, :length])
                expert_logits = apply_processors(expert_logits.float(), context, processors)
            scores = contrastive_decoding_scores(expert_logits, amateur_logits, alpha, amateur_temperature)
            if temperature > 0:
                probs = torch.softmax(scores / temperature, dim=-1)
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_tokens = scores.argmax(dim=-1)
            tokens[:, length] = next_tokens
            mask[:, length] = 1
            length += 1

            active = len(rows)
            finished = _record(completions, rows, next_tokens.tolist(), eos, step == max_new_tokens - 1)
            if len(finished) == active:
                break
            if finished:
                keep = torch.tensor([p for p in range(active) if p not in finished], device=device)
                tokens, mask = tokens.index_select(0, keep), mask.index_select(0, keep)
                for cache in caches:
                    cache.select(keep)
                rows = [rows[p] for p in keep.tolist()]
            step_input = tokens[:, length - 1 : length]
    return completions


# ------------------------------------------------------------------------------------- helpers
def _left_padded(prompts: list[list[int]], max_new_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token and attention-mask buffers (batch, longest + max_new_tokens), prompts left-padded
    so that every row's newest token sits in the same column, as the generator lays them out."""
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest + max_new_tokens, dtype=torch.long, device=device)
    mask = torch.zeros_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) : longest] = torch.tensor(p)
        mask[i, longest - len(p) : longest] = 1
    return tokens, mask, longest


def _record(
    completions: list[Completion], rows: list[int], new_tokens: list[int], eos: set[int], last: bool
) -> list[int]:
    """Append each active row's new token to its completion; return the batch positions that
    finished (on an eos id, or at the last step)."""
    finished = []
    for position, token in enumerate(new_tokens):
        done = completions[rows[position]]
        done.token_ids.append(token)
        if token in eos:
            done.finish_reason = "stop"
        elif last:
            done.finish_reason = "length"
        if done.finish_reason:
            finished.append(position)
    return finished


def _check_some_token_left(logits: torch.Tensor) -> None:
    dead = ~(logits > _NEG_INF).any(dim=-1)
    if bool(dead.any()):
        raise ValueError(
            f"rows {dead.nonzero().flatten().tolist()[:10]} have every token masked to -inf; "
            "the processors leave nothing to choose"
        )


def _check_alpha(alpha, name: str = "alpha") -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0 <= alpha <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {alpha!r}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
