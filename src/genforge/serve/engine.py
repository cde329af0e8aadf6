"""The serving engine: many requests, one model, one paged KV cache.

`Engine` is synchronous and single-threaded: `add_request`, then `step()` until done. Each
step asks the scheduler (`scheduler.py`) which sequences run and with how many tokens,
runs the model over them through the paged cache (`paged_cache.py`), samples the next token
of every sequence whose chunk reached its newest token with the same logits processors the
simple generator uses (`generate/processors.py`), and reports what each request gained.
Sequences that run one token (decodes, and the last token of a prompt) share one batched
forward pass; prompt chunks run one forward pass each, so no decode is padded to a
prompt's length. Attention reads each running sequence's keys and values from its resident
row (`resident.ResidentKV`), a contiguous copy kept beside the blocks, so a decode step
gathers nothing; the rows are kept in order of length, and attention reads each run of alike
rows only as far as its longest. When the batch would not fit the resident memory limit,
blocks are gathered, and decodes of very different lengths run as separate forward passes.
A batch's logits processors are built when its rows change, not at every step.

With `adapters` (a `finetune.multi_lora.MultiLora` over the model) each request may name a
LoRA adapter: requests on different adapters and on the bare base share the batch, the engine
telling the adapted layers each row's adapter around every forward pass (`MultiLora.rows`).
Prefix caching keeps adapters apart: a sequence's block hashes start from its adapter's id,
since its keys and values depend on the adapter. Adapters load and unload between steps; one
unloaded while requests use it stops taking new requests at once and is freed when they end.

Preemption either recomputes a sequence or swaps its KV blocks out to host memory (or disk)
and back (`swap.py`; `preemption_mode`), chosen per preemption by measured cost. Every step's
time and computed tokens are split into phases, prefill, decode, recompute, swap and
schedule (`phases.py`), for the metrics and for that cost.

`AsyncEngine` drives one `Engine` per served model from a background thread and hands the
outputs to asyncio consumers, which is what the HTTP server needs.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..cache import KV_CACHE_DTYPES
from ..finetune.lora import LoraError
from ..finetune.multi_lora import MultiLora, ReadAdapter, UnknownAdapterError
from ..generate.generator import stop_watcher
from ..generate.processors import (
    DecodeContext,
    LogitsProcessor,
    apply_processors,
    build_batch_processors,
)
from ..generate.request import (
    ContextLengthError,
    DecodeRequest,
    DecodeRequestError,
    batch_logits_processors,
    end_of_sequence_ids,
)
from ..generate.sampling import SamplingParams, greedy_next_token, make_generator, sample_next_token, token_logprobs
from ..model import Transformer
from ..seq2seq import refuse_encoder_decoder
from .blocks import BlockManager
from .paged_cache import PagedKVCache
from .phases import PhaseCounters, StepClock, phase_of_position, position_phases
from .resident import ResidentKV
from .runs import cheapest_runs
from .scheduler import ScheduledChunk, Scheduler
from .scheduler import Sequence as CacheSequence
from .swap import Preemptor, SwapCounters, SwapSpace, check_preemption_mode


# ------------------------------------------------------------------------------ records
@dataclass
class Request:
    """One completion request, already tokenized."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # max_new_tokens must be set
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    processors: Sequence[LogitsProcessor] = ()  # per-request extras (constraints), before the sampling filters
    ignore_eos: bool = False
    # None: none; k >= 0: the logprob of every prompt token after the first, given the tokens
    # before it, and the top k there (the OpenAI completions `echo` with `logprobs`, which
    # lm-evaluation-harness uses to score continuations). Such a request computes its whole
    # prompt: cached prefix blocks have no logits to give.
    prompt_logprobs: int | None = None
    adapter: str | None = None  # the LoRA adapter to run with (a name the engine's adapters serve); None: the base


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one request gained in one step (or how it ended)."""

    request_id: str
    token_ids: list[int]
    text: str  # new text; stop strings cut, text that may begin one held back
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    arrival_time: float
    first_token_time: float | None
    # In the first output only, when asked for: one entry per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Set (with finished=True) when this request's own settings made its next token impossible
    # to choose; the other requests in the batch go on.
    error: str | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    # Of the preemptions, those swapped out rather than recomputed; the swap space's counters.
    swap_preemptions: int = 0
    swap: SwapCounters | None = None
    phases: PhaseCounters | None = None  # time and tokens per step phase (`phases.py`)


@dataclass(eq=False)
class RequestState:
    """The engine's record of one running request, carried by its scheduler sequence."""

    request: Request
    decode: DecodeRequest  # the request resolved and checked once: end ids, limits, processors
    watcher: object  # generate.generator.stop_watcher: push(token) -> (text, hit_stop), flush()
    generator: torch.Generator | None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_generated: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled during prefill, sent once
    # Greedy with no logits processor at all: the next token is the raw logits' argmax, so the
    # row skips the processor pipeline (see Engine._choose).
    plain_greedy: bool = False
    # Its own processor list when the request brings extra processors (constraints), built once:
    # it depends only on the request, and reads the tokens so far from the step's context.
    processors: list[LogitsProcessor] | None = None
    adapter_id: int | None = None  # its LoRA adapter's id in the engine's MultiLora
    # The most tokens it ever had computed: after a recompute preemption, positions below
    # this are recomputed, not prefilled or decoded (phases.py).
    computed_high: int = 0


# A scheduler sequence as the engine runs it: tokens, blocks, and the request's state.
EngineSequence = CacheSequence[RequestState]


# A gathered decode batch is cut into several forward passes only from this many rows, and
# one more pass is counted as this share of gathering and attending the whole padded batch
# (docs/serving.md, "Where a decode step goes": the model's other work is about a third).
MIN_ROWS_TO_SPLIT = 4
FORWARD_PASS_SHARE = 1 / 3


# ------------------------------------------------------------------------------- engine
# Why the engine refuses an encoder-decoder model (seq2seq.py).
ENGINE_WHY = (
    "it schedules one growing token sequence per request over a paged KV cache, with no encoder pass or "
    "cross-attention cache; decode it with `genforge generate` or genforge.generate.decode.decode"
)


class Engine:
    """Continuous batching over a paged KV cache for one model."""

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,  # None: token ids only, no text
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        max_model_len: int | None = None,
        kv_cache_memory: int = 2 << 30,
        resident_kv_memory: int | None = None,
        adapters: MultiLora | None = None,
        kv_cache_dtype: str = "auto",
        preemption_mode: str = "auto",
        swap_space: int = 4 << 30,
        swap_disk_space: int = 0,
        swap_dir=None,
    ) -> None:
        """`kv_cache_memory` bounds the block pool when `num_blocks` is not given. With
        `kv_cache_dtype="int8"` keys and values are stored as int8 codes with an fp32 scale per
        token and head (`cache.quantize_kv`), so that budget holds ~3.8x the blocks (head_dim
        64) and as many more sequences; "auto" stores them in the model's dtype.

        `preemption_mode`: "recompute", "swap" or "auto" (swap when cheaper, `swap.Preemptor`).
        `swap_space` bytes of host memory (pinned on a GPU) hold swapped blocks; past them, up to
        `swap_disk_space` bytes spill to files in `swap_dir` (default: a temporary directory)."""
        check_preemption_mode(preemption_mode)
        if swap_space < 0 or swap_disk_space < 0:
            raise ValueError(
                f"swap_space and swap_disk_space must be >= 0 bytes, got {swap_space} and {swap_disk_space}"
            )
        config = model.config
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}; got {kv_cache_dtype!r}"
            )
        self.kv_cache_dtype = kv_cache_dtype
        refuse_encoder_decoder(config, "the serving engine", ENGINE_WHY)
        if not config.causal:
            raise ValueError("the engine serves causal language models; encoders are served by /v1/embeddings")
        if adapters is not None and adapters.model is not model:
            raise ValueError("adapters must be a MultiLora built over this engine's model")
        # LoRA adapters served over the model (None: the base alone); ids of unloaded adapters
        # that running requests still use, freed when those end.
        self.adapters = adapters
        self._retiring: set[int] = set()
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        # No further than the model's context (`Config.max_context`), except that a model with
        # dynamic RoPE scaling runs as far as it is told: its frequencies adapt to the length.
        ceiling = max_model_len if max_model_len and config.rope_type == "dynamic" else config.max_context
        self.max_model_len = min(max_model_len or config.max_context, ceiling)
        self.eos_token_ids = frozenset(end_of_sequence_ids(config, tokenizer, override=eos_token_ids))
        per_block = PagedKVCache.bytes_per_block(config, block_size, model.dtype, kv_cache_dtype)
        least = math.ceil(self.max_model_len / block_size)  # one sequence of the longest length must fit
        if num_blocks is None:
            wanted = math.ceil(max_num_seqs * self.max_model_len / block_size)
            num_blocks = max(least, min(wanted, kv_cache_memory // per_block))
        if num_blocks < least:
            raise ValueError(
                f"num_blocks={num_blocks} of {block_size} tokens cannot hold one sequence of max_model_len="
                f"{self.max_model_len}; use at least {least} blocks or a smaller max_model_len"
            )
        if resident_kv_memory is not None and resident_kv_memory < 0:
            raise ValueError(
                f"resident_kv_memory must be >= 0 bytes (0 turns resident buffers off), got {resident_kv_memory}"
            )
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.cache = PagedKVCache(config, num_blocks, block_size, model.dtype, model.device, kv_cache_dtype)
        # Running sequences' keys and values, also kept contiguous so attention needs no gather
        # (resident.ResidentKV). By default it may hold as much as the block pool.
        if resident_kv_memory is None:
            resident_kv_memory = num_blocks * per_block
        self.resident = (
            ResidentKV(config, resident_kv_memory, model.dtype, model.device, kv_cache_dtype)
            if resident_kv_memory
            else None
        )
        self.phases = PhaseCounters()
        self.swap_space = (
            SwapSpace(self.cache, swap_space, swap_disk_space, swap_dir)
            if preemption_mode != "recompute" and swap_space + swap_disk_space > 0
            else None
        )
        self.preemption_mode = preemption_mode if self.swap_space is not None else "recompute"
        self.preemptor = Preemptor(
            self.preemption_mode, self.swap_space, self.blocks, self.phases.prefill_seconds_per_token
        )
        self.scheduler: Scheduler[RequestState] = Scheduler(
            self.blocks, max_num_seqs, max_num_batched_tokens, on_release=self._on_release, swapper=self.preemptor
        )
        # On a GPU the step's phases are timed at synchronization points (phases.py).
        self._synchronize = model.device.type == "cuda"
        self._sequences: dict[str, EngineSequence] = {}
        # The processor list of the last batch of rows without per-request extras, and those
        # rows' states in order: the list depends only on which requests the rows are.
        self._batch_processors: tuple[tuple[RequestState, ...], list[LogitsProcessor]] = ((), [])
        self._arrivals = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # -------------------------------------------------------------------- requests
    def check_request(self, request: Request) -> DecodeRequest:
        """The request resolved for this engine's model (`generate.request.DecodeRequest`), or a
        `DecodeRequestError` whose message is meant for the user."""
        if isinstance(request.params, SamplingParams) and request.params.max_new_tokens is None:
            raise DecodeRequestError("params.max_new_tokens must be set")
        try:
            resolved = DecodeRequest.resolve(
                self.model,
                [request.prompt_token_ids],
                request.params,
                tokenizer=self.tokenizer,
                eos_token_ids=() if request.ignore_eos else sorted(self.eos_token_ids),
                context_length=self.max_model_len,
                logprobs=request.logprobs,
                prompt_logprobs=request.prompt_logprobs,
            )
        except ContextLengthError as err:  # said in the OpenAI API's words
            total = err.prompt_tokens + err.max_new_tokens
            raise ContextLengthError(
                f"this model's maximum context length is {err.context_length} tokens, but {err.prompt_tokens} prompt "
                f"tokens and {err.max_new_tokens} completion tokens were requested ({total} in total); "
                "shorten the prompt or lower max_tokens",
                prompt_tokens=err.prompt_tokens,
                max_new_tokens=err.max_new_tokens,
                context_length=err.context_length,
            ) from None
        if request.request_id in self._sequences:
            raise DecodeRequestError(f"request id {request.request_id!r} is already running")
        self._adapter_id(request.adapter)
        return resolved

    def _adapter_id(self, name: str | None) -> int | None:
        """The id of the adapter a request names; UnknownAdapterError if it is not served."""
        if name is None:
            return None
        if self.adapters is None:
            raise UnknownAdapterError(name, ())
        return self.adapters.id_of(name)

    def add_request(self, request: Request) -> None:
        resolved = self.check_request(request)
        params = request.params
        state = RequestState(
            request=request,
            decode=resolved,
            watcher=stop_watcher(self.tokenizer, params, request.prompt_token_ids),
            generator=None if params.greedy else make_generator(params.seed, self.model.device),
            adapter_id=self._adapter_id(request.adapter),
        )
        # The batched pipeline's own test: no processor for this row's settings (the vocabulary
        # limit aside, which `_choose` applies to these rows by slicing).
        state.plain_greedy = (
            params.greedy
            and not request.processors
            and not build_batch_processors([params], [resolved.eos_token_ids], vocab_size=self.config.vocab_size)
        )
        if request.processors:
            state.processors = resolved.logits_processors(request.processors)
        self._arrivals += 1
        if request.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        seq = EngineSequence(
            request.request_id,
            list(request.prompt_token_ids),
            len(request.prompt_token_ids),
            self._arrivals,
            reuse_cached_prefix=request.prompt_logprobs is None,
            hash_root=None if state.adapter_id is None else ("lora", state.adapter_id),
            state=state,
        )
        self._sequences[request.request_id] = seq
        self.scheduler.add(seq)
        self.prompt_tokens_total += len(request.prompt_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks at once; returns its final output, or None if unknown."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        self._drop_retired_adapters()
        return self._output(seq, [], "", None, "abort")

    def abort_all(self) -> list[RequestOutput]:
        """Stop every request and free its blocks; returns their final outputs."""
        return [output for request_id in list(self._sequences) if (output := self.abort(request_id)) is not None]

    def close(self) -> None:
        """Abort every request and delete any KV blocks spilled to disk."""
        self.abort_all()
        if self.swap_space is not None:
            self.swap_space.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        counters = self.blocks.counters
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            prefix_cache_queries=counters.queries,
            prefix_cache_hits=counters.hits,
            preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            swap_preemptions=self.scheduler.num_swapped_out,
            swap=None if self.swap_space is None else SwapCounters(**vars(self.swap_space.counters)),
            phases=self.phases.snapshot(),
        )

    # ------------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        # The step is timed in consecutive segments, each credited to its phases (phases.py).
        clock = StepClock(self._now())
        swap_seconds = self.swap_space.counters.seconds if self.swap_space is not None else 0.0
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        resident = self._prepare_resident(chunks)
        clock.lap(self._now())
        if self.swap_space is not None:  # swaps happen while scheduling (preemption and resume)
            clock.move(self.swap_space.counters.seconds - swap_seconds, "schedule", "swap")
        last_logits: list[tuple[ScheduledChunk, torch.Tensor]] = []
        singles = [c for c in chunks if c.num_tokens == 1]
        groups = ([singles] if singles else []) if resident else self._decode_groups(singles)
        for group in groups:
            logits = self._forward(group, 1, keep_all=False, resident=resident)[:, -1]
            last_logits.extend(zip(group, logits))
            for chunk, row in zip(group, logits):
                if chunk.seq.state.prompt_logprobs is not None:
                    self._record_prompt_logprobs(chunk, row[None])
            clock.lap(self._now(), self._phase_tokens(group))
        for chunk in chunks:
            if chunk.num_tokens > 1:
                state: RequestState = chunk.seq.state
                logits = self._forward(
                    [chunk], chunk.num_tokens, keep_all=state.prompt_logprobs is not None, resident=resident
                )[0]
                if state.prompt_logprobs is not None:
                    self._record_prompt_logprobs(chunk, logits)
                last_logits.append((chunk, logits[-1]))
                clock.lap(self._now(), self._phase_tokens([chunk]))
        for phase, count in self._phase_tokens(chunks).items():
            clock.tokens[phase] += count
        # Each sampled row's time goes to the phase of the position it was sampled after.
        sampled_phases = dict.fromkeys(clock.tokens, 0)
        for chunk in chunks:
            seq, state = chunk.seq, chunk.seq.state
            if chunk.completes:
                last = seq.num_computed + chunk.num_tokens - 1
                sampled_phases[phase_of_position(last, seq.num_prompt_tokens, state.computed_high)] += 1
            seq.num_computed += chunk.num_tokens
            state.computed_high = max(state.computed_high, seq.num_computed)
            self.blocks.cache_full_blocks(
                seq.token_ids, seq.block_table, seq.num_computed, seq.block_hashes, seq.hash_root
            )
        clock.lap(self._now())
        completing = [(c.seq, logits) for c, logits in last_logits if c.seq.num_computed == len(c.seq.token_ids)]
        outputs = self._sample(completing) if completing else []
        clock.lap(self._now(), sampled_phases)
        self._drop_retired_adapters()
        end = self._now()
        clock.lap(end)
        self.phases.add_step(clock.seconds, clock.tokens, end - clock.start)
        return outputs

    def _now(self) -> float:
        if self._synchronize:
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()

    @staticmethod
    def _phase_tokens(chunks: list[ScheduledChunk]) -> dict[str, int]:
        """The chunks' positions counted by phase: prefill, decode, recompute."""
        total = {"prefill": 0, "decode": 0, "recompute": 0}
        for chunk in chunks:
            seq = chunk.seq
            counts = position_phases(seq.num_computed, chunk.num_tokens, seq.num_prompt_tokens, seq.state.computed_high)
            for phase, count in counts.items():
                total[phase] += count
        return total

    # -------------------------------------------------------------------- adapters
    def served_adapters(self) -> MultiLora:
        if self.adapters is None:
            raise LoraError(
                "this engine serves no LoRA adapters; build it with adapters=MultiLora(model) (on the model as "
                "loaded, before packing)"
            )
        return self.adapters

    def load_adapter(self, name: str, directory, replace: bool = False) -> int:
        """Read the PEFT LoRA adapter in `directory` and serve it as `name`; returns its id."""
        return self.add_adapter(self.served_adapters().read(name, directory), replace)

    def add_adapter(self, adapter: ReadAdapter, replace: bool = False) -> int:
        """Serve an adapter already read (`MultiLora.read`, which may run on another thread).
        `replace`: an adapter of that name is unloaded (`unload_adapter`) for the new one."""
        adapters = self.served_adapters()
        if adapter.name in adapters.names:
            if not replace:
                raise LoraError(f"an adapter named {adapter.name!r} is already loaded; unload it first, or replace it")
            self.unload_adapter(adapter.name)
        return adapters.add(adapter)

    def unload_adapter(self, name: str) -> None:
        """Stop taking requests for adapter `name`; its tensors go once no request uses it."""
        self._retiring.add(self.served_adapters().retire(name))
        self._drop_retired_adapters()

    def _drop_retired_adapters(self) -> None:
        if not self._retiring:
            return
        in_use = {seq.state.adapter_id for seq in self._sequences.values()}
        for adapter_id in self._retiring - in_use:
            self.adapters.drop(adapter_id)
            self._retiring.discard(adapter_id)

    def _on_release(self, seq: EngineSequence) -> None:
        if self.resident is not None:
            self.resident.release(seq)

    def _prepare_resident(self, chunks: list[ScheduledChunk]) -> bool:
        """Make sure every running sequence holds a resident slot wide enough for this step;
        False (and no resident buffers at all) when they would not fit in their memory limit,
        so that this step gathers blocks instead."""
        resident = self.resident
        if resident is None:
            return False
        running = self.scheduler.running
        longest = max(c.seq.num_computed + c.num_tokens for c in chunks)
        if not resident.fits(len(running), longest):
            resident.clear()
            return False
        # Growing means a fresh allocation (page faults) and a copy, so ask at once for what
        # this batch will come to: as many rows as sequences may run, each as long as its
        # request may grow. Failing that, what this step needs.
        rows = min(self.scheduler.max_num_seqs, len(running) + len(self.scheduler.waiting))
        coming = itertools.islice(self.scheduler.waiting, rows - len(running))
        final = max(
            len(s.token_ids) + s.state.request.params.max_new_tokens - s.state.num_generated
            for s in itertools.chain(running, coming)
        )
        final = min(max(final, longest), self.max_model_len)
        if resident.fits(rows, final):
            resident.reserve(rows, final)
        else:
            resident.reserve(len(running), longest)
        for seq in running:
            if seq not in resident.slot_of:
                # Admitted, resumed after preemption, or back from the gathering fallback: its
                # computed tokens (a cached prefix, say) are copied from the blocks once.
                resident.admit(seq, self.cache, seq.block_table, seq.num_computed)
        # Neighbouring rows of similar length let attention cut the batch into cheap runs.
        resident.reorder_by_length()
        return True

    def _decode_groups(self, singles: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
        """One-token sequences, in one forward pass or, when gathering blocks, cut by length
        into several (`runs.cheapest_runs`).

        Each row of a gathered batch attends over (and gathers) as many cache slots as its
        longest row, so short and long sequences together waste gathering and attention; a
        pass over fewer rows saves that at the price of running the model once more.
        """
        if len(singles) < MIN_ROWS_TO_SPLIT:
            return [singles] if singles else []
        size = self.blocks.block_size
        ordered = sorted(singles, key=lambda c: c.seq.num_computed)
        widths = [c.seq.num_computed // size + 1 for c in ordered]  # blocks each row spans
        pass_cost = len(ordered) * widths[-1] * FORWARD_PASS_SHARE
        _, runs = cheapest_runs(widths, pass_cost)
        return [singles] if len(runs) == 1 else [ordered[a:b] for a, b in runs]

    def _forward(self, chunks: list[ScheduledChunk], num_new: int, keep_all: bool, resident: bool) -> torch.Tensor:
        """Logits (len(chunks), num_new or 1, vocab) of `num_new` new tokens per sequence: at
        every new position if `keep_all`, else at the last one. `resident`: attend over the
        sequences' resident rows (each holds a slot), else over their gathered blocks."""
        seqs = [c.seq for c in chunks]
        tables, computed = [s.block_table for s in seqs], [s.num_computed for s in seqs]
        new_ids = [s.token_ids[s.num_computed : s.num_computed + num_new] for s in seqs]
        if not resident:
            view = self.cache.batch(tables, computed, num_new)
            ids = torch.tensor(new_ids, dtype=torch.long, device=self.model.device)
        else:
            view = self.resident.batch(self.cache, seqs, tables, computed, num_new)
            # Rows of slots between this pass's sequences ride along on token 0; their
            # outputs are dropped and nothing of theirs is written.
            rows = [[0] * num_new for _ in range(view.batch_size)]
            for row, tokens in zip(view.member_rows, new_ids):
                rows[row] = tokens
            ids = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        with self._adapter_rows(seqs, view.member_rows if resident else None, len(ids)):
            out = self.model(
                ids,
                attention_mask=view.attention_mask,
                position_ids=view.position_ids,
                cache=view,
                logits_to_keep=0 if keep_all else 1,
            )
        return view.select_members(out.logits) if resident else out.logits

    def _adapter_rows(self, seqs: list[EngineSequence], member_rows, batch_size: int):
        """The context that tells the adapted layers each row's adapter (`MultiLora.rows`);
        rows of resident slots between the pass's sequences run on the base."""
        ids = [s.state.adapter_id for s in seqs]
        if all(adapter_id is None for adapter_id in ids):
            return nullcontext()
        if member_rows is not None:
            by_row: list[int | None] = [None] * batch_size
            for row, adapter_id in zip(member_rows, ids):
                by_row[row] = adapter_id
            ids = by_row
        return self.adapters.rows(ids)

    def _record_prompt_logprobs(self, chunk: ScheduledChunk, logits: torch.Tensor) -> None:
        """Score the prompt tokens this chunk's logits predict (those after its positions)."""
        seq, state = chunk.seq, chunk.seq.state
        # Position p's logits predict token p + 1. After a preemption the prompt is computed
        # again; tokens already scored are not scored twice.
        first = max(seq.num_computed + 1, len(state.prompt_logprobs))
        last = min(seq.num_computed + chunk.num_tokens + 1, seq.num_prompt_tokens)
        targets = seq.token_ids[first:last]
        if not targets:
            return
        k = state.request.prompt_logprobs
        rows = logits[first - 1 - seq.num_computed : last - 1 - seq.num_computed]
        scored = token_logprobs(rows.float(), torch.tensor(targets), k)
        for i, token in enumerate(targets):
            top = list(zip(scored.top_token_ids[i].tolist(), scored.top_logprobs[i].tolist()))
            state.prompt_logprobs.append(TokenLogprob(token, float(scored.logprobs[i]), top))

    def _sample(self, completing: list[tuple[EngineSequence, torch.Tensor]]) -> list[RequestOutput]:
        """Choose each completing sequence's next token. If the batch cannot be sampled (one
        request's processors left nothing to choose, or broke the logits), the rows are
        sampled one by one so that only the requests at fault fail."""
        try:
            return self._sample_batch(completing)
        except (ValueError, RuntimeError) as err:
            if len(completing) > 1:
                return [output for item in completing for output in self._sample([item])]
            seq = completing[0][0]
            self._sequences.pop(seq.request_id, None)
            self.scheduler.remove(seq)
            output = self._output(seq, [], "", None, "error")
            output.error = f"generation failed: {err}"
            return [output]

    def _sample_batch(self, completing: list[tuple[EngineSequence, torch.Tensor]]) -> list[RequestOutput]:
        seqs = [s for s, _ in completing]
        states: list[RequestState] = [s.state for s in seqs]
        raw = torch.stack([logits for _, logits in completing]).float()
        tokens = self._choose(raw, seqs, states)
        wanted = [st.request.logprobs for st in states]
        top_n = max((k for k in wanted if k is not None), default=None)
        logprobs = token_logprobs(raw, torch.tensor(tokens), top_n) if top_n is not None else None

        now = time.monotonic()
        outputs = []
        for row, (seq, state, token) in enumerate(zip(seqs, states, tokens)):
            seq.token_ids.append(token)
            state.num_generated += 1
            self.generation_tokens_total += 1
            if state.first_token_time is None:
                state.first_token_time = now
            text, hit_stop = state.watcher.push(token)
            reason = None
            if token in state.decode.eos_token_ids or hit_stop:
                reason = "stop"
            elif state.num_generated >= state.request.params.max_new_tokens or len(seq.token_ids) >= self.max_model_len:
                reason = "length"
            if reason is not None and not hit_stop:
                text += state.watcher.flush()
            entry = None
            if wanted[row] is not None:
                k = wanted[row]
                top = list(zip(logprobs.top_token_ids[row, :k].tolist(), logprobs.top_logprobs[row, :k].tolist()))
                entry = [TokenLogprob(token, float(logprobs.logprobs[row]), top)]
            if reason is not None:
                self._sequences.pop(seq.request_id, None)
                self.scheduler.remove(seq)
            output = self._output(seq, [token], text, entry, reason)
            if state.prompt_logprobs is not None and state.num_generated == 1:
                output.prompt_logprobs = state.prompt_logprobs
            outputs.append(output)
        return outputs

    def _choose(self, raw: torch.Tensor, seqs: list[EngineSequence], states: list[RequestState]) -> list[int]:
        """The next token of every row: one argmax over the plain greedy rows, the processor
        pipeline and sampler for the rest."""
        plain = [i for i, st in enumerate(states) if st.plain_greedy]
        tokens: list[int] = [0] * len(states)
        if plain:
            rows = (raw if len(plain) == len(states) else raw[plain])[:, : states[plain[0]].decode.vocab_limit]
            for i, token in zip(plain, greedy_next_token(rows).tolist()):
                tokens[i] = token
            if len(plain) == len(states):
                return tokens
        rest = [i for i, st in enumerate(states) if not st.plain_greedy]
        rest_states = [states[i] for i in rest]
        rows = raw if len(rest) == len(states) else raw[rest]
        processed = self._process(rows, [seqs[i] for i in rest], rest_states)
        sampled = sample_next_token(
            processed, [st.request.params.temperature for st in rest_states], [st.generator for st in rest_states]
        ).tolist()
        for i, token in zip(rest, sampled):
            tokens[i] = token
        return tokens

    def _process(self, raw: torch.Tensor, seqs: list[EngineSequence], states: list[RequestState]) -> torch.Tensor:
        """Apply each request's logits processors. Rows without per-request extras share one
        batched processor list; rows with extras (constraints) run their own list."""
        plain = [i for i, st in enumerate(states) if st.processors is None]
        special = [i for i, st in enumerate(states) if st.processors is not None]
        processed = raw.clone() if special else raw
        if plain:
            processors = self._processors_for([states[i] for i in plain], raw)
            if processors:
                ctx = self._context([seqs[i] for i in plain], raw.device)
                rows = apply_processors(raw[plain], ctx, processors)
                if not special:
                    return rows
                processed[plain] = rows
        for i in special:
            processed[i] = apply_processors(raw[i : i + 1], self._context([seqs[i]], raw.device), states[i].processors)[
                0
            ]
        return processed

    def _processors_for(self, states: list[RequestState], raw: torch.Tensor) -> list[LogitsProcessor]:
        """The batched processor list of these rows, built again only when the rows change:
        it holds each row's settings, and reads the tokens so far from the step's context."""
        rows = tuple(states)
        if rows != self._batch_processors[0]:
            processors = batch_logits_processors([st.decode for st in states], device=raw.device)
            self._batch_processors = (rows, processors)
        return self._batch_processors[1]

    @staticmethod
    def _context(seqs: list[EngineSequence], device) -> DecodeContext:
        """Left-padded token history of these sequences, for penalties and constraints."""
        width = max(len(s.token_ids) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        prompt_length = torch.empty(len(seqs), dtype=torch.long)
        for row, s in enumerate(seqs):
            n = len(s.token_ids)
            ids[row, width - n :] = torch.tensor(s.token_ids)
            mask[row, width - n :] = 1
            prompt_length[row] = width - n + s.num_prompt_tokens
        return DecodeContext(ids.to(device), prompt_length.to(device), mask.to(device))

    def _output(self, seq: EngineSequence, tokens: list[int], text: str, logprobs, reason: str | None) -> RequestOutput:
        state: RequestState = seq.state
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=tokens,
            text=text,
            logprobs=logprobs,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=state.num_generated,
            cached_prompt_tokens=seq.num_cached_prompt,
            arrival_time=state.arrival_time,
            first_token_time=state.first_token_time,
        )


# ------------------------------------------------------------------------ async driver
class EngineShutdown(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class _EngineLoop:
    """One engine driven by a background thread. Requests and aborts arrive through a
    queue, and the engine's stats leave as a snapshot taken after every step, so the engine
    itself is only ever touched by its own thread."""

    def __init__(self, name: str, engine: Engine) -> None:
        self.engine = engine
        self.stats = engine.stats()  # replaced (never mutated) by the engine thread
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.consumers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.wake = threading.Event()
        self.in_flight = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"genforge-engine-{name}", daemon=True)
        self.thread.start()

    def submit(self, command: tuple) -> None:
        self.commands.put(command)
        self.wake.set()

    def _deliver(self, output: RequestOutput) -> None:
        consumer = self.consumers.get(output.request_id)
        if consumer is None:
            return
        if output.finished:
            self.consumers.pop(output.request_id, None)
        _send(consumer, ValueError(output.error) if output.error else output)

    def _fail(self, request_id: str, error: BaseException) -> None:
        consumer = self.consumers.pop(request_id, None)
        if consumer is not None:
            _send(consumer, error)

    def _fail_all(self, error: BaseException) -> None:
        for consumer in list(self.consumers.values()):
            _send(consumer, error)
        self.consumers.clear()

    def _run(self) -> None:
        while self._run_commands():
            if self.engine.has_unfinished():
                self._step()
            else:
                self.wake.wait(timeout=0.5)
                self.wake.clear()

    def _step(self) -> None:
        engine = self.engine
        try:
            outputs = engine.step()
        except Exception as err:  # a real fault: fail every request rather than hang them
            self.error = err
            engine.abort_all()
            self.stats = engine.stats()
            self._fail_all(err)
            return
        self.stats = engine.stats()  # before the outputs: whoever sees an output sees its stats
        for output in outputs:
            self._deliver(output)

    def _run_commands(self) -> bool:
        """Carry out the queued commands; False once told to stop."""
        engine = self.engine
        while True:
            try:
                kind, payload = self.commands.get_nowait()
            except queue.Empty:
                return True
            if kind == "add":
                try:
                    engine.add_request(payload)
                except Exception as err:  # refused (ValueError), or a fault: the consumer answers
                    self._fail(payload.request_id, err)
                self.stats = engine.stats()
            elif kind == "call":  # a change of the engine (adapters) asked from another thread
                function, loop, future = payload
                try:
                    result, error = function(), None
                except Exception as err:
                    result, error = None, err
                self.stats = engine.stats()
                _settle(loop, future, result, error)
            elif kind == "abort":
                output = engine.abort(payload)
                self.stats = engine.stats()
                if output is not None:
                    self._deliver(output)
            elif kind == "stop":
                outputs = engine.abort_all()
                self.stats = engine.stats()
                for output in outputs:
                    self._deliver(output)
                return False


def _send(consumer: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item: object) -> None:
    """Hand an output or error to a consumer on its event loop's thread."""
    loop, outputs = consumer
    try:
        loop.call_soon_threadsafe(outputs.put_nowait, item)
    except RuntimeError:  # the consumer's event loop is closed
        pass


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: object, error: BaseException | None):
    """Hand a call's result (or error) to the future awaiting it, unless its caller has gone."""

    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's event loop is closed
        pass


class AsyncEngine:
    """Serve several models, each with its own engine thread, to asyncio consumers."""

    def __init__(self, engines: dict[str, Engine]) -> None:
        if not engines:
            raise ValueError("AsyncEngine needs at least one engine")
        self._loops = {name: _EngineLoop(name, engine) for name, engine in engines.items()}
        self._accepting = True

    @property
    def models(self) -> list[str]:
        return list(self._loops)

    def engine(self, model: str) -> Engine:
        """The engine serving `model`, for its constants (`max_model_len`, `eos_token_ids`):
        only its own thread calls its methods."""
        return self._lookup(model).engine

    def _lookup(self, model: str) -> _EngineLoop:
        if model not in self._loops:
            raise KeyError(f"model {model!r} is not served here; available: {', '.join(self._loops)}")
        return self._loops[model]

    async def generate(self, model: str, request: Request) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Raises ValueError before the first output if the
        request is invalid (`ContextLengthError` if it does not fit the context), and aborts the
        request if the consumer stops early."""
        runner = self._lookup(model)
        if not self._accepting:
            raise EngineShutdown("the server is shutting down")
        if request.request_id in runner.consumers:
            raise ValueError(f"request id {request.request_id!r} is already running")
        outputs: asyncio.Queue = asyncio.Queue()
        runner.consumers[request.request_id] = (asyncio.get_running_loop(), outputs)
        runner.in_flight += 1
        runner.submit(("add", request))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            runner.in_flight -= 1
            if not finished:
                runner.consumers.pop(request.request_id, None)
                runner.submit(("abort", request.request_id))

    def abort(self, model: str, request_id: str) -> None:
        self._lookup(model).submit(("abort", request_id))

    # -------------------------------------------------------------------- adapters
    def serves_adapters(self, model: str) -> bool:
        """Whether `model`'s engine can serve LoRA adapters (it has a MultiLora)."""
        return self._lookup(model).engine.adapters is not None

    def adapters(self, model: str) -> tuple[str, ...]:
        """The LoRA adapters `model`'s engine serves now (a snapshot its thread replaces)."""
        adapters = self._lookup(model).engine.adapters
        return adapters.names if adapters is not None else ()

    async def load_adapter(self, model: str, name: str, directory, replace: bool = False) -> int:
        """Read a PEFT LoRA adapter directory off the event loop and the engine's thread, then
        serve it over `model` between two steps; returns its id. LoraError if it does not fit."""
        runner = self._lookup(model)
        engine = runner.engine
        adapter = await asyncio.to_thread(engine.served_adapters().read, name, directory)
        return await self._call(runner, lambda: engine.add_adapter(adapter, replace))

    async def unload_adapter(self, model: str, name: str) -> None:
        """Stop serving adapter `name` over `model` (requests using it finish first)."""
        runner = self._lookup(model)
        await self._call(runner, lambda: runner.engine.unload_adapter(name))

    async def _call(self, runner: _EngineLoop, function):
        """Run `function` on the engine's own thread, between steps, and return its result."""
        if not self._accepting:
            raise EngineShutdown("the server is shutting down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        runner.submit(("call", (function, loop, future)))
        return await future

    def stats(self, model: str) -> EngineStats:
        """The engine's stats as of its latest step or command."""
        return self._lookup(model).stats

    @property
    def in_flight(self) -> int:
        return sum(loop.in_flight for loop in self._loops.values())

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting requests, let the running ones finish (up to `drain_timeout`
        seconds), then abort what is left and stop the engine threads."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for runner in self._loops.values():
            runner.submit(("stop", None))
        for runner in self._loops.values():
            await asyncio.to_thread(runner.thread.join, 5.0)
