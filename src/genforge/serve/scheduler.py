"""Continuous batching: which sequences run in the next forward pass, and with how many tokens.

Iteration-level scheduling (Orca, Yu et al. 2022): the batch is re-formed at every step, so
a finished request leaves at once and a waiting one joins at once, instead of the whole
batch waiting for its longest member. Each step has a token budget. Running sequences go
first (a decoding sequence costs one token); waiting ones are admitted in arrival order
while blocks, budget and batch slots remain. A prompt longer than what is left of the
budget is prefilled in chunks over several steps (chunked prefill, Agrawal et al. 2023), so
a long prompt never stalls the running decodes. When a running sequence needs a block and
none is free, the most recently admitted sequence is preempted: its blocks are freed and it
goes back to the front of the waiting queue. Either it is recomputed when it resumes (vLLM's
recompute preemption; with prefix caching most of it is found again), or, with a `swapper`
(`swap.Preemptor`), its computed blocks are first copied out and, on resume, copied back into
fresh blocks, so it goes on where it stopped; the swapper decides which, per preemption.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from .blocks import BlockManager

State = TypeVar("State")


class Swapper(Protocol):
    """What the scheduler asks of preemption by swapping (`swap.Preemptor`)."""

    def swap_out(self, seq) -> bool:
        """Copy the sequence's computed blocks away and return True, or return False to have
        it recomputed; its blocks are freed either way."""

    def swap_in(self, seq, num_reused: int) -> None:
        """Copy its blocks back into its (new) block table's, all but the first `num_reused`
        (found again in the prefix cache)."""

    def holds(self, seq) -> bool: ...

    def discard(self, seq) -> None: ...


@dataclass(eq=False)
class Sequence(Generic[State]):
    """One request's tokens and its place in the cache; `state` is its owner's per-request
    record (the engine's `RequestState`), which the scheduler carries and never reads."""

    request_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    arrival: int  # admission order, for FCFS and preemption
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of its published full blocks
    num_computed: int = 0  # tokens whose keys/values are in the cache
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at (first) admission
    # Whether it has ever run: a resumed sequence's own blocks found again are not "cached prompt".
    admitted: bool = False
    reuse_cached_prefix: bool = True  # False when every prompt position's logits are wanted
    # What its keys and values depend on besides its tokens (a LoRA adapter): blocks are shared
    # only between sequences of one root (blocks.block_hash).
    hash_root: Hashable = None
    state: State = field(kw_only=True)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass
class ScheduledChunk(Generic[State]):
    seq: Sequence[State]
    num_tokens: int  # tokens to compute this step, from seq.num_computed on

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the newest token, so the step yields a new token."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


class Scheduler(Generic[State]):
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        on_release: Callable[[Sequence[State]], None] | None = None,
        swapper: Swapper | None = None,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = blocks
        # Called whenever a sequence's blocks are freed (finish, abort, preemption), before
        # its state is reset, so that copies of its keys and values elsewhere go too.
        self.on_release = on_release
        self.swapper = swapper
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence[State]] = deque()
        self.running: list[Sequence[State]] = []
        self.num_preemptions = 0
        self.num_swapped_out = 0  # of the preemptions, those swapped rather than recomputed

    def add(self, seq: Sequence[State]) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence[State]) -> None:
        """Take a sequence out (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.swapper is not None:
            self.swapper.discard(seq)
        self._release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -------------------------------------------------------------------------- step
    def schedule(self) -> list[ScheduledChunk[State]]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk[State]] = []
        # Running sequences, oldest first; preempt from the newest end when blocks run out.
        queue = sorted(self.running, key=lambda s: s.arrival)
        while queue and budget > 0:
            seq = queue.pop(0)
            count = min(seq.num_uncomputed, budget)
            while not self._reserve(seq, count):
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    seq = None
                    break
            if seq is not None:
                chunks.append(ScheduledChunk(seq, count))
                budget -= count
        # Then waiting sequences, in order, while there is room.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            swapped = self.swapper is not None and self.swapper.holds(seq)
            if swapped and seq.reuse_cached_prefix:
                # Blocks of its own still in the prefix cache (a shared prompt prefix, say) are
                # taken back as they are, not copied into private duplicates.
                seq.block_table, seq.block_hashes = self.blocks.cached_prefix(
                    seq.token_ids, seq.num_computed, seq.hash_root
                )
            elif not seq.block_table and seq.reuse_cached_prefix:
                self._take_cached_prefix(seq)
            count = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, count):
                # Wait for blocks to free up; later requests must not overtake it. The cached
                # prefix blocks it just took go back (they stay in the prefix cache): held by
                # waiting sequences, they could leave nothing free and nothing running. A
                # swapped sequence keeps its computed count.
                if swapped:
                    self.blocks.free(seq.block_table)
                    seq.block_table, seq.block_hashes = [], []
                else:
                    self._release(seq)
                break
            if swapped:  # back where it stopped: the rest of its computed blocks are copied in
                self.swapper.swap_in(seq, len(seq.block_hashes))
            self.waiting.popleft()
            self.running.append(seq)
            seq.admitted = True
            chunks.append(ScheduledChunk(seq, count))
            budget -= count
        return chunks

    def _take_cached_prefix(self, seq: Sequence[State]) -> None:
        # At least the last token is computed again: its logits give the next token.
        blocks, hashes = self.blocks.cached_prefix(seq.token_ids, len(seq.token_ids) - 1, seq.hash_root)
        seq.block_table, seq.block_hashes = blocks, hashes
        seq.num_computed = len(blocks) * self.blocks.block_size
        if not seq.admitted:
            seq.num_cached_prompt = min(seq.num_computed, seq.num_prompt_tokens)

    def _reserve(self, seq: Sequence[State], count: int) -> bool:
        """Give `seq` enough blocks for `count` more tokens; False (nothing taken) if too few are free."""
        missing = self.blocks.blocks_needed(seq.num_computed + count) - len(seq.block_table)
        if missing > self.blocks.num_free:
            return False
        seq.block_table.extend(self.blocks.allocate() for _ in range(max(0, missing)))
        return True

    def _preempt(self, seq: Sequence[State]) -> None:
        self.running.remove(seq)
        if self.swapper is not None and self.swapper.swap_out(seq):
            # Its keys and values wait elsewhere: the blocks go, its computed count stays.
            if self.on_release is not None:
                self.on_release(seq)
            self.blocks.free(seq.block_table)
            seq.block_table, seq.block_hashes = [], []
            self.num_swapped_out += 1
        else:
            self._release(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence[State]) -> None:
        if self.on_release is not None:
            self.on_release(seq)
        self.blocks.free(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0
