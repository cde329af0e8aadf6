"""Block manager: the bookkeeping of a paged KV cache (PagedAttention, Kwon et al. 2023).

The cache memory is cut into `num_blocks` blocks of `block_size` token slots. A sequence
owns a block table, the list of blocks holding its tokens in order; it takes a new block
only when its last one is full, so at most one block per sequence is partly empty.

Blocks are reference counted so that sequences can share them. Automatic prefix caching
gives each *full* block a hash of its tokens and of everything before it (the hash of the
previous block), so equal hashes mean equal keys and values. A request whose prompt starts
with already-computed blocks reuses them instead of computing them again. When the last
sequence using a hashed block lets go of it, the block keeps its contents and waits in an
LRU list: a later hit revives it, and allocation evicts the least recently released one
only when no never-used block is left.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


class OutOfBlocks(RuntimeError):
    """No free block is left; the scheduler should preempt a sequence or wait."""


def block_hash(parent: Hashable, tokens: Sequence[int]) -> int:
    """Hash of a full block: its tokens and, through `parent`, every token before them. The
    first block's parent is its sequence's hash root: None, or what else its keys and values
    depend on (the LoRA adapter it runs with), so that sequences of different roots never
    share a block."""
    return hash((parent, tuple(tokens)))


@dataclass
class PrefixCacheCounters:
    queries: int = 0  # full prompt blocks looked up
    hits: int = 0  # of which were found cached

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    """Reference-counted blocks with an optional content-addressed prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._never_used: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._hash_of: dict[int, int] = {}  # block -> hash, for full blocks in the prefix cache
        self._block_of: dict[int, int] = {}  # hash -> block
        self.counters = PrefixCacheCounters()

    # ------------------------------------------------------------------------ capacity
    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out (never used, or cached but unreferenced)."""
        return len(self._never_used) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------------- allocation
    def allocate(self) -> int:
        """A block with reference count 1 for the caller to fill."""
        if self._never_used:
            block = self._never_used.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV-cache blocks are in use")
        self.ref_counts[block] = 1
        return block

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; cached blocks stay revivable until evicted."""
        for block in blocks:
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than it was taken")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._never_used.append(block)

    # -------------------------------------------------------------------- prefix cache
    def cached_prefix(
        self, token_ids: Sequence[int], max_tokens: int, root: Hashable = None
    ) -> tuple[list[int], list[int]]:
        """Take a reference to each cached block that starts `token_ids`, in order.

        Only whole blocks within the first `max_tokens` tokens are considered; the lookup
        stops at the first miss, since a later block's hash depends on every earlier one.
        `root`: the sequence's hash root (`block_hash`). Returns the blocks and their hash chain.
        """
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        size = self.block_size
        for start in range(0, max_tokens - size + 1, size):
            digest = block_hash(hashes[-1] if hashes else root, token_ids[start : start + size])
            self.counters.queries += 1
            block = self._block_of.get(digest)
            if block is None:
                break
            self.counters.hits += 1
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
            blocks.append(block)
            hashes.append(digest)
        return blocks, hashes

    def cache_full_blocks(
        self,
        token_ids: Sequence[int],
        block_table: Sequence[int],
        num_computed: int,
        hashes: list[int],
        root: Hashable = None,
    ) -> None:
        """Publish a sequence's computed full blocks; `hashes` (its hash chain so far, one
        per block already published) is extended in place; `root` is its hash root.

        A block whose content another block already holds stays private: both are correct,
        and the first keeps the entry.
        """
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for i in range(len(hashes), min(num_computed // size, len(block_table))):
            digest = block_hash(hashes[-1] if hashes else root, token_ids[i * size : (i + 1) * size])
            hashes.append(digest)
            block = block_table[i]
            if digest not in self._block_of and block not in self._hash_of:
                self._block_of[digest] = block
                self._hash_of[block] = digest
