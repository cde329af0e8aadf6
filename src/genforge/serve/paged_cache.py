"""The paged KV cache: block storage, and the per-forward view the model talks to.

`PagedKVCache` holds every layer's keys and values in one pool of fixed-size blocks,
(num_blocks * block_size, kv_heads, head_dim) per layer, so any slot of any block can be
written or gathered with one indexing call. The block manager (`blocks.py`) decides which
blocks each sequence owns; this module only moves tensors.

`PagedBatch` is what one forward pass of the model sees through the cache seam (`cache.py`):
`update(layer, k, v)` writes the new tokens' keys and values into their slots, then gathers
each row's blocks into a dense (batch, kv_heads, width, head_dim) tensor for attention.
A row's gathered keys are its tokens in order (past, then the new ones), followed by the
unused tail of its last block and by padding up to the widest row; the attention mask
marks only the real tokens, and the model compares token positions rather than slots, so
the tail is never attended to.

With `kv_cache_dtype="int8"` the pools hold int8 codes, beside pools of fp32 scales, one per
slot and key/value head (`cache.quantize_kv`): new tokens are quantized as they are written, and
the gathered blocks are dequantized into the model's dtype for attention. A block then costs
head_dim + 4 bytes per head instead of 4 * head_dim in fp32, so a memory budget holds ~3.8x the
blocks at head_dim 64.

The engine attends over contiguous copies of the running sequences' keys and values
(`resident.py`) whenever they fit their memory limit, and gathers blocks here otherwise.
"""

from __future__ import annotations

import torch

from ..cache import check_kv_cache_dtype, dequantize_kv, kv_cache_bytes_per_token, quantize_kv
from ..config import Config


class PagedKVCache:
    """Key and value pools of `num_blocks` blocks of `block_size` slots for every layer.

    `dtype` is the model's: what attention reads. `kv_cache_dtype` is what the pools store:
    "auto" (`dtype`) or "int8" (int8 codes in `keys`/`values`, fp32 scales of shape
    (slots, kv_heads, 1) in `key_scales`/`value_scales`).
    """

    def __init__(
        self,
        config: Config,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = config.num_kv_heads, config.head_dim
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.quantized = kv_cache_dtype == "int8"
        stored = torch.int8 if self.quantized else dtype
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=stored, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=stored, device=device) for _ in range(config.num_layers)]
        # Zeros: the padding slots a gather reads (and the mask hides) dequantize to zeros, not NaN.
        layers = range(config.num_layers) if self.quantized else range(0)
        self.key_scales = [torch.zeros((*shape[:2], 1), device=device) for _ in layers]
        self.value_scales = [torch.zeros((*shape[:2], 1), device=device) for _ in layers]
        self.device = torch.device(device)
        # Reused destinations of the per-layer gathers (one for keys, one for values). A fresh
        # multi-megabyte tensor per layer and step costs page faults that take longer than the
        # copy itself; every layer's gathered keys are consumed by its attention before the
        # next layer gathers, so two buffers serve all layers.
        # An int8 pool gathers its codes and scales into buffers of their own (2 and 3: keys,
        # 4 and 5: values) and dequantizes them into 0 and 1.
        extra = [torch.int8, torch.float32] * 2 if self.quantized else []
        self._gathered: list[torch.Tensor] = [
            torch.empty(0, dtype=kind, device=device) for kind in (dtype, dtype, *extra)
        ]

    def gather_buffer(self, which: int, numel: int) -> torch.Tensor:
        if self._gathered[which].numel() < numel:
            self._gathered[which] = torch.empty(numel, dtype=self._gathered[which].dtype, device=self.device)
        return self._gathered[which][:numel]

    @staticmethod
    def bytes_per_block(config: Config, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        """Memory of one block over all layers, keys and values (int8: codes and scales)."""
        return block_size * kv_cache_bytes_per_token(config, dtype, kv_cache_dtype)

    def batch(self, block_tables: list[list[int]], num_computed: list[int], num_new: int) -> PagedBatch:
        """The view for one forward pass: row i has `num_computed[i]` tokens cached and
        `num_new` new ones, all held in the blocks `block_tables[i]`."""
        return PagedBatch(self, block_tables, num_computed, num_new)


class PagedBatch:
    """One forward pass's view of the paged cache (the `KVCache` protocol of `cache.py`)."""

    row_runs = None  # the gathered keys are as wide as the longest row; one attention call

    def __init__(
        self, cache: PagedKVCache, block_tables: list[list[int]], num_computed: list[int], num_new: int
    ) -> None:
        size = cache.block_size
        totals = [n + num_new for n in num_computed]
        for table, total in zip(block_tables, totals):
            if len(table) * size < total:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {total} tokens")
        width_blocks = max(-(-t // size) for t in totals)
        device = cache.device
        self.cache = cache
        # Padding rows of the block table point at block 0; the mask hides whatever is there.
        table = torch.zeros(len(block_tables), width_blocks, dtype=torch.long)
        for i, blocks in enumerate(block_tables):
            used = -(-totals[i] // size)
            table[i, :used] = torch.tensor(blocks[:used], dtype=torch.long)
        self.gather_blocks = table.reshape(-1).to(device)
        starts = torch.tensor(num_computed, dtype=torch.long)
        new_positions = starts[:, None] + torch.arange(num_new)  # (batch, num_new)
        slots = table.gather(1, new_positions // size) * size + new_positions % size
        self.write_slots = slots.reshape(-1).to(device)
        width = width_blocks * size
        self.batch_size, self.width = len(block_tables), width
        self.position_ids = new_positions.to(device)
        self.attention_mask = (torch.arange(width)[None, :] < torch.tensor(totals)[:, None]).to(device)
        # The model takes `length` as the number of cached columns before the new tokens;
        # here the new tokens are inside the gathered width, so the columns add up to it.
        self.length = width - num_new
        self.num_new = num_new
        # One attention call over the whole batch: the engine gives a gathered pass rows of
        # alike length (`Engine._decode_groups`).
        self.row_runs = None

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache.quantized:
            return self._update_int8(layer, keys, values)
        pool_k, pool_v = self.cache.keys[layer], self.cache.values[layer]
        batch, heads, new, dim = keys.shape
        pool_k.index_copy_(0, self.write_slots, keys.transpose(1, 2).reshape(batch * new, heads, dim))
        pool_v.index_copy_(0, self.write_slots, values.transpose(1, 2).reshape(batch * new, heads, dim))
        return self._gather(pool_k, 0), self._gather(pool_v, 1)

    def _gather(self, pool: torch.Tensor, which: int) -> torch.Tensor:
        # Whole blocks are contiguous runs of memory, so selecting blocks (not slots) copies
        # a few large pieces; several times faster on CPU. The result is viewed as (batch,
        # width, heads, dim) and transposed to (batch, heads, width, dim) without another
        # copy: SDPA reads the strided layout directly.
        _, heads, dim = pool.shape
        rows = pool.view(self.cache.num_blocks, -1)
        out = self.cache.gather_buffer(which, self.gather_blocks.numel() * rows.shape[1]).view(-1, rows.shape[1])
        torch.index_select(rows, 0, self.gather_blocks, out=out)
        return out.view(self.batch_size, self.width, heads, dim).transpose(1, 2)

    def _update_int8(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for int8 pools: quantize and write the new tokens, gather codes and scales
        block by block, and dequantize them for attention."""
        cache = self.cache
        batch, heads, new, dim = keys.shape
        out = []
        for which, (fresh, pool, scales) in enumerate(
            (
                (keys, cache.keys[layer], cache.key_scales[layer]),
                (values, cache.values[layer], cache.value_scales[layer]),
            )
        ):
            codes, scale = quantize_kv(fresh.transpose(1, 2).reshape(batch * new, heads, dim))
            pool.index_copy_(0, self.write_slots, codes)
            scales.index_copy_(0, self.write_slots, scale)
            gathered_codes = self._gather(pool, 2 + 2 * which)
            gathered_scales = self._gather(scales, 3 + 2 * which)
            # Laid out as the gathered codes are, (batch, width, heads, dim) seen transposed, so
            # the product runs over memory in order.
            target = cache.gather_buffer(which, gathered_codes.numel())
            target = target.view(batch, self.width, heads, dim).transpose(1, 2)
            out.append(dequantize_kv(gathered_codes, gathered_scales, out=target))
        return out[0], out[1]

    def advance(self, num_new: int) -> None:
        """Nothing to do: the engine counts each sequence's computed tokens itself."""
