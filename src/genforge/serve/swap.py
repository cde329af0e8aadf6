"""Preemption by swapping: a preempted sequence's KV blocks kept aside and brought back.

When the block pool runs out the scheduler preempts a sequence (`scheduler.py`). The
sequence can be *recomputed* (its blocks are freed and its tokens prefilled again when it
resumes) or *swapped* (its computed blocks are copied out to a host-side pool, and copied
back into free blocks when it resumes, so nothing is computed twice). This is the choice
PagedAttention's paper describes (Kwon et al. 2023, section 4.5, "swapping" and
"recomputation"); which is cheaper depends on how many bytes the sequence's keys and values
take against how long its tokens take to prefill.

`SwapSpace` moves the bytes. Its host tier is pinned CPU memory when the cache lives on a
GPU (so the copies run at full PCIe speed); on a CPU-only engine the host tier is ordinary
memory beside the block pool. There both live in the same RAM: swapping then frees blocks for
the running sequences without freeing memory, and `host_bytes` bounds how much preempted KV
may be held in addition to the pool. When the host tier is short, a swap may spill to disk
(`disk_bytes` > 0): one file per sequence, written beside its final name and renamed into
place (never half-written), read back and deleted on resume, and deleted when the sequence is
aborted or the space closed.

`Preemptor` decides, per preemption (`--preemption-mode`):

- "recompute": always recompute (vLLM's default);
- "swap": swap whenever a tier has room, else recompute;
- "auto": swap when moving the bytes out and back costs less than prefilling again the
  tokens the prefix cache would not give back:
  ``seconds_per_block(tier) * blocks  <  prefill_seconds_per_token * tokens_to_recompute``.
  ``seconds_per_block`` is measured: a probe copy of a few blocks out and back when the host
  tier is first used, then a running average of the engine's own swaps (disk: 1 GB/s each way
  until a spill has been measured). ``prefill_seconds_per_token`` is the engine's measured
  prefill rate (its phase counters). ``tokens_to_recompute`` is the sequence's computed tokens
  less the leading blocks another sequence also holds: those stay in the prefix cache while
  it runs, so a recompute finds them again. Before any prefill has been measured, recompute.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_path
from .blocks import BlockManager
from .paged_cache import PagedKVCache

PREEMPTION_MODES = ("auto", "swap", "recompute")

# What a disk spill is assumed to cost before one has been measured: bytes per second, each way.
DISK_BYTES_PER_SECOND = 1e9
# Weight of the newest measurement in the running averages of copy cost.
AVERAGE_WEIGHT = 0.25
# Blocks copied out and back by the probe that first prices the host tier.
PROBE_BLOCKS = 8


def check_preemption_mode(mode: str) -> str:
    if mode not in PREEMPTION_MODES:
        raise ValueError(f"preemption_mode must be one of {', '.join(map(repr, PREEMPTION_MODES))}; got {mode!r}")
    return mode


@dataclass
class SwapRecord:
    """Where one swapped sequence's blocks are: host tensors, or a file on disk."""

    num_blocks: int
    num_bytes: int
    tensors: list[torch.Tensor] | None = None  # one (num_blocks, block bytes of a pool) per pool
    path: Path | None = None


@dataclass
class SwapCounters:
    swapped_out: int = 0  # sequences swapped out (to either tier)
    swapped_in: int = 0
    spilled: int = 0  # of the swapped out, to disk
    bytes_out: int = 0
    bytes_in: int = 0  # copied back: blocks found again in the prefix cache are not
    blocks_reused: int = 0  # swapped blocks found again in the prefix cache on resume
    seconds: float = 0.0  # spent copying, both ways, both tiers


class SwapSpace:
    """Host memory (and optionally disk) holding the KV blocks of swapped-out sequences.

    Blocks move as whole rows of the cache's pools (every layer's keys and values, and their
    scales for an int8 cache), so a block comes back bit for bit.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        host_bytes: int,
        disk_bytes: int = 0,
        directory: str | os.PathLike | None = None,
    ) -> None:
        if host_bytes < 0 or disk_bytes < 0:
            raise ValueError(f"swap space must be >= 0 bytes; got host {host_bytes} and disk {disk_bytes}")
        self.cache = cache
        self.host_bytes, self.disk_bytes = host_bytes, disk_bytes
        self.pools = [*cache.keys, *cache.values, *cache.key_scales, *cache.value_scales]
        self.bytes_per_block = sum(p[: cache.block_size].numel() * p.element_size() for p in self.pools)
        self.pin = cache.device.type == "cuda"
        self.host_used = self.disk_used = 0
        self.records: dict[object, SwapRecord] = {}
        self.counters = SwapCounters()
        self._seconds_per_block: dict[str, float | None] = {
            "host": None,
            "disk": 2 * self.bytes_per_block / DISK_BYTES_PER_SECOND,
        }
        self._given_directory = Path(directory) if directory is not None else None
        self._directory: Path | None = None
        self._cleanup = None

    # ------------------------------------------------------------------------ capacity
    def tier_for(self, num_blocks: int) -> str | None:
        """ "host" or "disk", whichever first has room for `num_blocks` blocks; None if neither."""
        size = num_blocks * self.bytes_per_block
        if self.host_used + size <= self.host_bytes:
            return "host"
        if self.disk_used + size <= self.disk_bytes:
            return "disk"
        return None

    def holds(self, owner: object) -> bool:
        return owner in self.records

    def seconds_per_block(self, tier: str) -> float:
        """Measured seconds to move one block out and back through `tier`."""
        if self._seconds_per_block[tier] is None:
            self._probe()
        return self._seconds_per_block[tier]

    def _probe(self) -> None:
        """Price the host tier by copying a few blocks of the pool out and back (their
        contents are written back unchanged)."""
        blocks = list(range(min(PROBE_BLOCKS, self.cache.num_blocks)))
        start = time.perf_counter()
        tensors = self._copy_out(blocks)
        self._copy_in(tensors, blocks)
        seconds = time.perf_counter() - start
        self._seconds_per_block["host"] = seconds / len(blocks)
        self.counters.seconds += seconds

    def _measured(self, tier: str, seconds: float, num_blocks: int) -> None:
        """Fold one copy (half of a round trip) into the running average of `tier`."""
        round_trip = 2 * seconds / num_blocks
        old = self._seconds_per_block[tier]
        self._seconds_per_block[tier] = (
            round_trip if old is None else (1 - AVERAGE_WEIGHT) * old + AVERAGE_WEIGHT * round_trip
        )

    # ---------------------------------------------------------------------- moving
    def swap_out(self, owner: object, blocks: list[int], tier: str) -> None:
        """Copy `blocks` (the owner's computed blocks, in order) to `tier`; the caller frees them."""
        if owner in self.records:
            raise RuntimeError(f"{owner!r} is already swapped out")
        start = time.perf_counter()
        tensors = self._copy_out(blocks)
        size = len(blocks) * self.bytes_per_block
        record = SwapRecord(len(blocks), size)
        if tier == "host":
            record.tensors = tensors
            self.host_used += size
        else:
            # Unique across engines and processes sharing one directory.
            record.path = self._spill_directory() / f"kv-{uuid.uuid4().hex}.pt"
            with atomic_path(record.path) as temporary:
                torch.save(tensors, temporary)
            self.disk_used += size
            self.counters.spilled += 1
        self.records[owner] = record
        seconds = time.perf_counter() - start
        self._measured(tier, seconds, len(blocks))
        self.counters.swapped_out += 1
        self.counters.bytes_out += size
        self.counters.seconds += seconds

    def swap_in(self, owner: object, blocks: list[int], num_reused: int = 0) -> None:
        """Copy the owner's blocks back into `blocks` (its new block table, at least as long as
        what it swapped out) and forget them here. The first `num_reused` were found again in
        the prefix cache and hold those contents already: they are not written."""
        record = self.records.pop(owner)
        start = time.perf_counter()
        if record.tensors is not None:
            tensors = record.tensors
            self.host_used -= record.num_bytes
        else:
            tensors = torch.load(record.path, weights_only=True)
            record.path.unlink()
            self.disk_used -= record.num_bytes
        num_reused = min(num_reused, record.num_blocks)
        copied = record.num_blocks - num_reused
        if copied:
            self._copy_in([t[num_reused:] for t in tensors], blocks[num_reused : record.num_blocks])
        seconds = time.perf_counter() - start
        if copied:
            self._measured("host" if record.path is None else "disk", seconds, copied)
        self.counters.swapped_in += 1
        self.counters.bytes_in += copied * self.bytes_per_block
        self.counters.blocks_reused += num_reused
        self.counters.seconds += seconds

    def discard(self, owner: object) -> None:
        """Forget a swapped-out owner (aborted): its memory or file goes."""
        record = self.records.pop(owner, None)
        if record is None:
            return
        if record.path is not None:
            record.path.unlink(missing_ok=True)
            self.disk_used -= record.num_bytes
        else:
            self.host_used -= record.num_bytes

    def close(self) -> None:
        """Forget every swapped sequence and delete the spill files (and the directory, when
        this space made it)."""
        for owner in list(self.records):
            self.discard(owner)
        if self._cleanup is not None:
            self._cleanup()
            self._directory = self._cleanup = None

    def _spill_directory(self) -> Path:
        if self._directory is None:
            if self._given_directory is not None:
                self._given_directory.mkdir(parents=True, exist_ok=True)
                self._directory = self._given_directory
            else:
                self._directory = Path(tempfile.mkdtemp(prefix="genforge-kv-swap-"))
                # A directory this space made goes when it closes, or with the process.
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._directory, ignore_errors=True)
        return self._directory

    def _copy_out(self, blocks: list[int]) -> list[torch.Tensor]:
        """The rows of `blocks` of every pool, as host tensors (pinned when the cache is on a GPU)."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.cache.device)
        out = []
        for pool in self.pools:
            rows = pool.view(self.cache.num_blocks, -1).index_select(0, index)
            if rows.device.type != "cpu":
                host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=self.pin)
                host.copy_(rows, non_blocking=True)
                rows = host
            out.append(rows)
        if self.pin:
            torch.cuda.synchronize(self.cache.device)  # the host copies are complete before anyone reads them
        return out

    def _copy_in(self, tensors: list[torch.Tensor], blocks: list[int]) -> None:
        index = torch.tensor(blocks, dtype=torch.long, device=self.cache.device)
        for pool, rows in zip(self.pools, tensors):
            pool.view(self.cache.num_blocks, -1).index_copy_(0, index, rows.to(pool.device, non_blocking=True))
        if self.pin:
            torch.cuda.synchronize(self.cache.device)  # the pinned source may be reused once this returns


@dataclass
class PreemptionDecision:
    """Why one preemption swapped or recomputed (kept for the last few, for inspection)."""

    request_id: str
    swapped: bool
    tier: str | None
    blocks: int
    tokens_to_recompute: int
    swap_seconds: float | None  # estimated
    recompute_seconds: float | None  # estimated


class Preemptor:
    """The scheduler's swap hook: decides swap or recompute per preemption and moves blocks."""

    def __init__(
        self,
        mode: str,
        space: SwapSpace | None,
        blocks: BlockManager,
        prefill_seconds_per_token: Callable[[], float | None],
    ) -> None:
        self.mode = check_preemption_mode(mode)
        if mode != "recompute" and space is None:
            raise ValueError(f"preemption_mode={mode!r} needs a swap space")
        self.space, self.blocks = space, blocks
        self.prefill_seconds_per_token = prefill_seconds_per_token
        self.swaps = self.recomputes = 0
        self.decisions: list[PreemptionDecision] = []  # the latest, at most 64

    def holds(self, seq) -> bool:
        return self.space is not None and self.space.holds(seq)

    def swap_out(self, seq) -> bool:
        """Swap `seq`'s computed blocks out if that is the cheaper way (True), or leave it to
        be recomputed (False). The scheduler frees its blocks either way."""
        decision = self._decide(seq)
        self.decisions = [*self.decisions[-63:], decision]
        if decision.swapped:
            self.space.swap_out(seq, seq.block_table[: decision.blocks], decision.tier)
            self.swaps += 1
        else:
            self.recomputes += 1
        return decision.swapped

    def swap_in(self, seq, num_reused: int = 0) -> None:
        self.space.swap_in(seq, seq.block_table, num_reused)

    def discard(self, seq) -> None:
        if self.space is not None:
            self.space.discard(seq)

    def _decide(self, seq) -> PreemptionDecision:
        count = self.blocks.blocks_needed(seq.num_computed)
        tier = self.space.tier_for(count) if self.space is not None and count else None
        shared = 0  # leading full blocks another sequence holds too: a recompute finds them cached
        for block in seq.block_table[: seq.num_computed // self.blocks.block_size]:
            if self.blocks.ref_counts[block] < 2:
                break
            shared += 1
        recompute_tokens = seq.num_computed - shared * self.blocks.block_size
        decision = PreemptionDecision(seq.request_id, False, tier, count, recompute_tokens, None, None)
        if self.mode == "recompute" or tier is None:
            return decision
        decision.swap_seconds = self.space.seconds_per_block(tier) * count
        rate = self.prefill_seconds_per_token()
        decision.recompute_seconds = None if rate is None else rate * recompute_tokens
        if self.mode == "swap":
            decision.swapped = True
        elif decision.recompute_seconds is not None:
            decision.swapped = decision.swap_seconds < decision.recompute_seconds
        return decision
