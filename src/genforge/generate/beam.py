"""Beam search and diverse beam search over a contiguous KV cache.

Beam search keeps the `num_beams` most likely partial sequences instead of one (the decoder
of Sutskever et al. 2014 and Graves 2012), and ranks finished sequences by their summed
log-probability divided by `length ** length_penalty` (the length normalisation of Wu et al.
2016, "Google's Neural Machine Translation System", in the simple form transformers uses).

The semantics are transformers 5.23's `_beam_search`, step for step, so the tokens are the
same and `BeamHypothesis.score` equals its `sequences_scores`:

1. Each beam's next-token log-probabilities are `log_softmax(logits)` in float32, then the
   logits processors (penalties, n-gram bans, biases; `processors.py`) run on them, then the
   beam's running score is added.
2. Over every beam x vocabulary pair the best `max(2, 1 + number of eos ids) * num_beams`
   candidates are kept: enough that `num_beams` of them can go on even if some end.
3. A candidate *ends* when its new token is an eos id or it reaches `max_new_tokens`. An
   ending candidate that ranks among the first `num_beams` candidates enters the pool of
   finished hypotheses with score `sum of log-probs / generated_length ** length_penalty`
   (eos counted in the length); the pool keeps the best `num_beams`.
4. The best `num_beams` candidates that did not end become the next running beams; the KV
   cache rows are reordered to follow them (`ContiguousKVCache.select`).
5. A prompt is done at `max_new_tokens`, or earlier:
   - `early_stopping=True`: as soon as the pool holds `num_beams` finished hypotheses;
   - `early_stopping=False`: once the pool is full and the best running beam, scored at its
     current length, cannot beat the pool's worst hypothesis (a heuristic: with
     `length_penalty > 0` a longer continuation could still have won);
   - `early_stopping="never"`: as False, but with `length_penalty > 0` the running beam is
     scored at the longest length it could reach, so no better hypothesis is ever missed.
   After a prompt is done its pool no longer changes; the prompt leaves the batch.

Diverse beam search (Vijayakumar et al. 2016, "Diverse Beam Search") splits the beams into
`num_beam_groups` groups that each run the search above with `num_beams / num_beam_groups`
beams. Groups step in order, and group g's log-probabilities are lowered by
`diversity_penalty * (how many beams of groups 0..g-1 chose that token at this step)`, the
Hamming diversity term. As in transformers 4.x's group beam search (removed from the library
in 5.x), the penalised log-probabilities are what the beams accumulate, each group keeps its
own pool of `num_beams / num_beam_groups` finished hypotheses, and the returned hypotheses are
the best of all groups' pools. A group whose pool is settled keeps stepping (its choices still
count for the penalty of later groups) until every group of its prompt is done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from ..model import Transformer
from .generator import continuation_text
from .processors import DecodeContext, LogitsProcessor, apply_processors
from .request import DecodeRequest, DecodeRequestError

__all__ = ["BeamHypothesis", "BeamOptions", "beam_search", "run_beam_search"]

# transformers' "ruled out" score. It is added (not assigned) and kept finite so that ranking
# among ruled-out candidates stays deterministic and identical to the reference.
_RULED_OUT = -1.0e9

EARLY_STOPPING_VALUES = (True, False, "never")


@dataclass
class BeamHypothesis:
    """One finished sequence of a beam search."""

    token_ids: list[int]  # generated tokens (prompt excluded), the eos token included
    score: float  # sum of token log-probabilities / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (an eos id or a stop string) or "length" (reached max_new_tokens)
    text: str | None = None  # with a tokenizer: the continuation's text, cut before any stop string


@dataclass
class _BeamGroup:
    """The state of one beam search over a batch of prompts, `(prompts, beams, ...)` tensors.

    Plain beam search has one group; diverse beam search has `num_beam_groups`. Token buffers
    hold the left-padded prompt followed by the generated tokens.
    """

    running_tokens: torch.Tensor  # (prompts, beams, capacity) int64
    running_scores: torch.Tensor  # (prompts, beams) summed log-probs of the running beams
    finished_tokens: torch.Tensor  # (prompts, beams, capacity) the pool of finished hypotheses
    finished_scores: torch.Tensor  # (prompts, beams) length-normalised scores of the pool
    finished_lengths: torch.Tensor  # (prompts, beams) generated tokens of each pooled hypothesis
    is_finished: torch.Tensor  # (prompts, beams) bool: False for slots still holding a placeholder
    may_improve: torch.Tensor  # (prompts, 1) bool: can running beams still enter the pool?

    @classmethod
    def start(cls, prompt_tokens: torch.Tensor, num_beams: int) -> _BeamGroup:
        prompts = prompt_tokens.shape[0]
        device = prompt_tokens.device
        tokens = prompt_tokens[:, None, :].repeat(1, num_beams, 1)
        # Every beam starts as the same prompt; only the first may expand at step one, or the
        # search would pick the same token num_beams times.
        running_scores = torch.zeros(prompts, num_beams, device=device)
        running_scores[:, 1:] = _RULED_OUT
        return cls(
            running_tokens=tokens,
            running_scores=running_scores,
            finished_tokens=tokens.clone(),
            finished_scores=torch.full((prompts, num_beams), _RULED_OUT, device=device),
            finished_lengths=torch.zeros(prompts, num_beams, dtype=torch.long, device=device),
            is_finished=torch.zeros(prompts, num_beams, dtype=torch.bool, device=device),
            may_improve=torch.ones(prompts, 1, dtype=torch.bool, device=device),
        )

    def keep_prompts(self, rows: torch.Tensor) -> None:
        for name, value in vars(self).items():
            setattr(self, name, value.index_select(0, rows))


@dataclass(frozen=True)
class BeamOptions:
    """The knobs of beam search, checked when built (see `beam_search` for each)."""

    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    do_sample: bool = False

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise DecodeRequestError(f"{name} must be an integer >= 1, got {value!r}")

        for name in ("num_beams", "num_return_sequences", "num_beam_groups"):
            positive_int(name)
        if self.num_return_sequences > self.num_beams:
            raise DecodeRequestError(
                f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams ({self.num_beams}): "
                "beam search keeps only num_beams finished hypotheses"
            )
        if self.num_beams % self.num_beam_groups:
            raise DecodeRequestError(
                f"num_beams ({self.num_beams}) must be a multiple of num_beam_groups ({self.num_beam_groups})"
            )
        penalty = self.length_penalty
        if not isinstance(penalty, Real) or isinstance(penalty, bool) or not math.isfinite(penalty):
            raise DecodeRequestError(
                f"length_penalty must be a finite number (> 0 favours longer, < 0 shorter sequences), got {penalty!r}"
            )
        stopping = self.early_stopping
        if not any(stopping is v if isinstance(v, bool) else stopping == v for v in EARLY_STOPPING_VALUES):
            raise DecodeRequestError(f"early_stopping must be True, False or 'never', got {stopping!r}")
        diversity = self.diversity_penalty
        if (
            not isinstance(diversity, Real)
            or isinstance(diversity, bool)
            or not (math.isfinite(diversity) and diversity >= 0)
        ):
            raise DecodeRequestError(f"diversity_penalty must be a finite number >= 0, got {diversity!r}")
        if diversity and self.num_beam_groups == 1:
            raise DecodeRequestError(
                "diversity_penalty needs num_beam_groups > 1: it pushes each group away from the earlier ones"
            )
        if self.do_sample and self.num_beam_groups > 1:
            raise DecodeRequestError(
                "beam sampling (do_sample=True) and diverse beam search (num_beam_groups > 1) do not combine; "
                "use one or the other"
            )


def beam_search(
    model: Transformer,
    prompt_ids: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor,
    num_beams: int,
    max_new_tokens: int | None,
    *,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_ids: Sequence[int] | None = None,
    processors: Sequence[LogitsProcessor] = (),
    num_beam_groups: int = 1,
    diversity_penalty: float = 0.0,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
) -> list[list[BeamHypothesis]]:
    """Beam search for a batch of prompts (token-id lists, left-padded internally).

    Returns, per prompt, the `num_return_sequences` best finished hypotheses, best first.
    `max_new_tokens` None runs to the end of the context. `eos_token_ids` default to the model
    config's and the tokenizer's; pass `[]` to only stop at `max_new_tokens`.
    `processors` run on the log-probabilities of every step (e.g. `NoRepeatNGram(3)`,
    `RepetitionPenalty(1.2)`, `MinNewTokens(...)`), as transformers applies its processors in
    beam search. `num_beam_groups > 1` with `diversity_penalty > 0` is diverse beam search.
    `do_sample=True` is beam sampling: the candidates are drawn without replacement with
    probability softmax(beam score + log-prob) instead of taken by rank (put the temperature
    and top-k/top-p warpers in `processors`, as transformers does; seed `generator`).
    `stop_strings` (with `tokenizer`) end a candidate whose generated text comes to contain one,
    as an eos id would; with a tokenizer each hypothesis also carries its `text`, cut there.
    See the module docstring for the exact semantics.
    """
    options = BeamOptions(
        num_beams, length_penalty, early_stopping, num_return_sequences, num_beam_groups, diversity_penalty, do_sample
    )
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else [t for t in stop_strings if t]
    request = DecodeRequest.resolve(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        stop=stop_strings,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
    )
    return run_beam_search(model, request, options, processors=processors, generator=generator)


def run_beam_search(
    model: Transformer,
    request: DecodeRequest,
    options: BeamOptions,
    *,
    processors: Sequence[LogitsProcessor] = (),
    generator: torch.Generator | None = None,
) -> list[list[BeamHypothesis]]:
    """`beam_search` on a resolved request. The request's own processors apply (its penalties
    and bans; its temperature and truncation filters too when `options.do_sample`), then
    `processors`; its stop strings and eos ids end hypotheses."""
    prompts, tokenizer = request.prompts, request.tokenizer
    num_beams, max_new_tokens = options.num_beams, request.max_new_tokens
    num_beam_groups, diversity_penalty = options.num_beam_groups, options.diversity_penalty
    length_penalty, early_stopping = options.length_penalty, options.early_stopping
    do_sample, num_return_sequences = options.do_sample, options.num_return_sequences
    stop_strings = request.params.stop
    eos = list(request.eos_token_ids)
    processors = request.logits_processors(processors, sampling=do_sample)
    device, batch = model.device, len(prompts)
    longest = max(len(p) for p in prompts)
    capacity = longest + max_new_tokens
    group_size = num_beams // num_beam_groups
    # Enough candidates that num_beams of them survive even if every eos id is among them.
    num_candidates = max(2, 1 + len(eos)) * group_size
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)

    prompt_tokens = torch.zeros(batch, capacity, dtype=torch.long, device=device)
    mask = torch.zeros(batch, capacity, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        prompt_tokens[i, longest - len(p) : longest] = torch.tensor(p)
        mask[i, longest - len(p) : longest] = 1
    mask[:, longest:] = 1  # every beam of a prompt is as long as the others: no padding after the prompt
    groups = [_BeamGroup.start(prompt_tokens, group_size) for _ in range(num_beam_groups)]
    prompt_of_row = list(range(batch))  # original prompt index of each active prompt
    results: list[list[BeamHypothesis] | None] = [None] * batch

    def hits_stop_string(candidate_tokens: torch.Tensor, column: int) -> torch.Tensor:
        """(prompts, candidates) bool: the candidate's generated text now holds a stop string."""
        texts = tokenizer.decode_batch(
            candidate_tokens[:, :, longest : column + 1].reshape(-1, column + 1 - longest).tolist(),
            skip_special_tokens=True,
        )
        hit = [any(stop in text for stop in stop_strings) for text in texts]
        return torch.tensor(hit, device=candidate_tokens.device).view(candidate_tokens.shape[:2])

    stop_check = hits_stop_string if stop_strings else None
    cache = request.kv_cache(model, batch, capacity)
    with torch.inference_mode():
        # The prompt is run once per prompt, not once per beam; the cache rows are then repeated.
        out = model(prompt_tokens[:, :longest], attention_mask=mask[:, :longest], cache=cache, logits_to_keep=1)
        logits = out.logits[:, -1].float().repeat_interleave(num_beams, dim=0)
        cache.select(torch.arange(batch, device=device).repeat_interleave(num_beams))

        for step in range(max_new_tokens):
            active = len(prompt_of_row)
            column = longest + step  # where this step's token goes
            row_mask = mask[:, :column].repeat_interleave(num_beams, dim=0)  # every token so far, per beam
            if step > 0:
                newest = torch.stack([g.running_tokens[:, :, column - 1] for g in groups], dim=1).reshape(-1, 1)
                out = model(newest, attention_mask=row_mask, cache=cache, logits_to_keep=1)
                logits = out.logits[:, -1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            if processors:
                history = torch.stack([g.running_tokens[:, :, :column] for g in groups], dim=1)
                flat_history = history.reshape(active * num_beams, column)
                context = DecodeContext(input_ids=flat_history, prompt_length=longest, attention_mask=row_mask)
                log_probs = apply_processors(log_probs, context, processors)
            log_probs = log_probs.view(active, num_beam_groups, group_size, -1)

            source_beams = []  # per group: which of its beams each new running beam extends
            for g, group in enumerate(groups):
                group_log_probs = log_probs[:, g]
                if diversity_penalty and g > 0:
                    chosen = torch.cat([earlier.running_tokens[:, :, column] for earlier in groups[:g]], dim=1)
                    group_log_probs = group_log_probs - diversity_penalty * _token_counts(chosen, log_probs.shape[-1])
                source_beams.append(
                    _step_group(
                        group,
                        group_log_probs,
                        step,
                        column,
                        max_new_tokens,
                        eos_tensor,
                        num_candidates,
                        length_penalty,
                        early_stopping,
                        generator if do_sample else None,
                        do_sample,
                        stop_check,
                    )
                )
            # Cache row of (prompt, group, beam) is prompt * num_beams + group * group_size + beam.
            group_offsets = torch.arange(num_beam_groups, device=device)[:, None] * group_size
            sources = torch.stack(source_beams, dim=1) + group_offsets
            rows = sources.reshape(active, num_beams) + torch.arange(active, device=device)[:, None] * num_beams

            for group in groups:
                _update_may_improve(group, step, max_new_tokens, length_penalty, early_stopping)
            done = torch.ones(active, dtype=torch.bool, device=device)
            if step < max_new_tokens - 1:
                for group in groups:
                    done &= _is_settled(group, early_stopping)
            finished_rows = done.nonzero().flatten().tolist()
            for row in finished_rows:
                results[prompt_of_row[row]] = _best_hypotheses(
                    groups,
                    row,
                    longest,
                    num_return_sequences,
                    eos,
                    tokenizer,
                    stop_strings,
                    prompts[prompt_of_row[row]],
                )
            if len(finished_rows) == active:
                break
            if finished_rows:
                keep = (~done).nonzero().flatten()
                for group in groups:
                    group.keep_prompts(keep)
                mask = mask.index_select(0, keep)
                rows = rows.index_select(0, keep)
                prompt_of_row = [prompt_of_row[r] for r in keep.tolist()]
            cache.select(rows.reshape(-1))
    return results


def _step_group(
    group: _BeamGroup,
    log_probs: torch.Tensor,
    step: int,
    column: int,
    max_new_tokens: int,
    eos: torch.Tensor,
    num_candidates: int,
    length_penalty: float,
    early_stopping: bool | str,
    generator: torch.Generator | None = None,
    do_sample: bool = False,
    stop_check=None,
) -> torch.Tensor:
    """One step of one group (`log_probs`: (prompts, beams, vocab), processed). Updates the
    running beams and the finished pool in place; returns (prompts, beams), the beam each new
    running beam continues. The tensor operations mirror transformers' helpers
    (`_get_top_k_continuations`, `_get_running_beams_for_next_iteration`,
    `_update_finished_beams`) so that ties resolve identically."""
    prompts, num_beams, vocab = log_probs.shape
    totals = (log_probs + group.running_scores[:, :, None]).reshape(prompts, num_beams * vocab)
    if do_sample:  # beam sampling: draw the candidates, without replacement, in proportion to exp(total)
        flat_index = torch.multinomial(torch.softmax(totals, dim=-1), num_samples=num_candidates, generator=generator)
        candidate_scores = torch.gather(totals, 1, flat_index)
    else:
        candidate_scores, flat_index = torch.topk(totals, k=num_candidates)
    candidate_beam, candidate_token = flat_index // vocab, flat_index % vocab
    candidate_tokens = torch.take_along_dim(group.running_tokens, candidate_beam[:, :, None], dim=1)
    candidate_tokens[:, :, column] = candidate_token
    ends = torch.isin(candidate_token, eos)
    if stop_check is not None:
        ends |= stop_check(candidate_tokens, column)
    if step == max_new_tokens - 1:
        ends = torch.ones_like(ends)

    # The next running beams: the best candidates that did not end.
    continuing_scores = candidate_scores + ends.to(torch.float32) * _RULED_OUT
    next_beams = torch.topk(continuing_scores, k=num_beams).indices
    group.running_tokens = torch.take_along_dim(candidate_tokens, next_beams[:, :, None], dim=1)
    group.running_scores = torch.take_along_dim(continuing_scores, next_beams, dim=1)
    source = torch.take_along_dim(candidate_beam, next_beams, dim=1)

    # The pool: only candidates ranked in the first num_beams may enter; the rest exist only so
    # that enough beams keep running.
    enters = ends.clone()
    enters[:, num_beams:] = False
    normalised = candidate_scores / ((step + 1) ** length_penalty)
    pool_full = group.is_finished.all(dim=1, keepdim=True) & (early_stopping is True)
    normalised = normalised + pool_full.to(torch.float32) * _RULED_OUT
    normalised = normalised + (~group.may_improve).to(torch.float32) * _RULED_OUT
    normalised = normalised + (~enters) * _RULED_OUT
    merged_scores = torch.cat((group.finished_scores, normalised), dim=1)
    best = torch.topk(merged_scores, k=num_beams).indices
    group.finished_scores = torch.take_along_dim(merged_scores, best, dim=1)
    group.finished_tokens = torch.take_along_dim(
        torch.cat((group.finished_tokens, candidate_tokens), dim=1), best[:, :, None], dim=1
    )
    new_lengths = torch.full_like(candidate_beam, step + 1)
    group.finished_lengths = torch.take_along_dim(torch.cat((group.finished_lengths, new_lengths), dim=1), best, dim=1)
    group.is_finished = torch.take_along_dim(torch.cat((group.is_finished, enters), dim=1), best, dim=1)
    return source


def _update_may_improve(
    group: _BeamGroup, step: int, max_new_tokens: int, length_penalty: float, early_stopping: bool | str
) -> None:
    """transformers' `_check_early_stop_heuristic`: can the best running beam still beat the
    pool's worst hypothesis? Once False it stays False."""
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = max_new_tokens  # a positive penalty rewards length: assume the longest
    else:
        best_length = step + 1
    best_running = group.running_scores[:, :1] / (best_length**length_penalty)
    worst_finished = torch.where(group.is_finished, group.finished_scores.min(dim=1, keepdim=True).values, _RULED_OUT)
    group.may_improve = group.may_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)


def _is_settled(group: _BeamGroup, early_stopping: bool | str) -> torch.Tensor:
    """(prompts,) bool: this group's pool can no longer change."""
    settled = ~group.may_improve[:, 0]
    if early_stopping is True:
        settled = settled | group.is_finished.all(dim=1)
    return settled


def _token_counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """(prompts, 1, vocab) float: how often each token occurs in each row of `tokens`."""
    counts = torch.zeros(tokens.shape[0], vocab, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=counts.dtype))
    return counts[:, None, :]


def _best_hypotheses(
    groups: list[_BeamGroup],
    row: int,
    prompt_columns: int,
    how_many: int,
    eos: list[int],
    tokenizer=None,
    stop_strings: Sequence[str] = (),
    prompt: Sequence[int] = (),
) -> list[BeamHypothesis]:
    """The best `how_many` real hypotheses of one prompt, over every group's pool."""
    scores = torch.cat([g.finished_scores[row] for g in groups])
    real = torch.cat([g.is_finished[row] for g in groups])
    tokens = torch.cat([g.finished_tokens[row] for g in groups])
    lengths = torch.cat([g.finished_lengths[row] for g in groups])
    # Stable: with one group the pool is already in transformers' order, which this keeps.
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    best = []
    for i in order:
        if not real[i]:  # a placeholder slot: only possible when processors ruled out every token
            continue
        token_ids = tokens[i, prompt_columns : prompt_columns + int(lengths[i])].tolist()
        reason = "stop" if token_ids[-1] in eos else "length"
        text = None
        if tokenizer is not None:
            text = continuation_text(tokenizer, prompt, token_ids)
            cuts = [text.find(stop) for stop in stop_strings if stop in text]
            if cuts:
                text, reason = text[: min(cuts)], "stop"
        best.append(BeamHypothesis(token_ids=token_ids, score=float(scores[i]), finish_reason=reason, text=text))
        if len(best) == how_many:
            break
    return best
