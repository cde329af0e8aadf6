"""Resident K/V buffers: contiguous copies of the running sequences' keys and values.

`ResidentKV` keeps a second, contiguous copy of the running sequences' keys and values, one
row ("slot") per sequence, written in the same pass as the blocks of the paged cache
(`paged_cache.py`); `ResidentBatch` is the view that writes both and hands attention a slice
of the resident rows, so a decode step copies nothing but its new tokens. The engine uses it
whenever the batch fits in its memory limit and gathers blocks (`PagedBatch`) otherwise.

Rows of one batch differ in length, and a dense attention call over them reads every row as
far as the longest. `ResidentBatch` therefore cuts its rows into runs of neighbouring slots
(`runs.cheapest_runs`), each attended over its own width (the cache's `row_runs`, `cache.py`),
and `ResidentKV` keeps its slots in order of length so that neighbours are alike.

With an int8 paged cache (`kv_cache_dtype="int8"`, `paged_cache.py`) the resident rows hold the
same int8 codes and fp32 scales as the blocks, so they cost what the blocks cost; attention
gets each pass's rows dequantized into a reused buffer, each run only as far as its width.
"""

from __future__ import annotations

import itertools

import torch

from ..cache import check_kv_cache_dtype, dequantize_kv, kv_cache_bytes_per_token, quantize_kv
from ..config import Config
from .paged_cache import PagedKVCache
from .runs import cheapest_runs


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# What one more attention call costs, as bytes of keys and values it could have read instead
# (measured: docs/serving.md, "Attention in runs of alike rows").
ATTENTION_CALL_BYTES = 512 * 1024
# A reorder of the resident rows must pay for its copying within this many decode steps: rows
# keep their order while they all grow by one token a step, until the next admission or
# release, and at 32 running sequences of ~100 new tokens one of those comes every few steps.
REORDER_PAYBACK_STEPS = 8


class ResidentKV:
    """Contiguous per-sequence copies of the running sequences' keys and values.

    Gathering every row's blocks into a dense tensor, per layer and per step, copies the
    whole attended past of the batch each time a token is generated; for small models on
    a CPU that copy costs as much as the rest of the decode step. A resident buffer keeps
    each running sequence's keys and values in its own row ("slot") of one dense tensor
    per layer, (slots, kv_heads, capacity, head_dim), written alongside the blocks. Attention
    then reads a slice of it directly: a decode step writes one token per row and copies
    nothing else.

    The blocks stay the source of truth (prefix caching shares them, preemption and abort
    free them); a slot is filled from the blocks once, when a sequence is admitted or
    resumed, and dropped when the scheduler releases the sequence. Occupied slots are
    always `0 .. len(owners) - 1`: releasing a slot moves the last occupied one into it,
    so a batch of running sequences spans few unused rows. After admissions and releases,
    `reorder_by_length` puts the slots in order of length, longest first, when the keys it
    saves attention from reading pay for the copying; rows then stay in order, since every
    running sequence grows by one token a step. Both dimensions grow by powers of two as
    needed, and never beyond `memory_limit` bytes (over all layers, keys and values); the
    caller falls back to gathering blocks when `fits` says no.
    """

    def __init__(
        self,
        config: Config,
        memory_limit: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_cache_dtype: str = "auto",
    ) -> None:
        if memory_limit < 0:
            raise ValueError(f"memory_limit must be >= 0 bytes, got {memory_limit}")
        self.memory_limit = memory_limit
        self.num_layers, self.num_kv_heads, self.head_dim = config.num_layers, config.num_kv_heads, config.head_dim
        self.dtype, self.device = dtype, torch.device(device)
        # What the rows store: the model's dtype, or int8 codes with fp32 scales (the paged
        # cache's `kv_cache_dtype`, which they copy).
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.quantized = kv_cache_dtype == "int8"
        self.stored_dtype = torch.int8 if self.quantized else dtype
        self.bytes_per_token = kv_cache_bytes_per_token(config, dtype, kv_cache_dtype)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_scales: list[torch.Tensor] = []  # int8 rows only: (slots, kv_heads, capacity, 1) fp32
        self.value_scales: list[torch.Tensor] = []
        # int8 rows only: reused destinations of one pass's dequantized keys and values.
        self._dequantized = [torch.empty(0, dtype=dtype, device=self.device) for _ in range(2)]
        self.owners: list[object] = []  # slot -> the sequence it holds
        self.lengths: list[int] = []  # slot -> how many of its positions hold real keys and values
        self.slot_of: dict[object, int] = {}
        # One more attention call, in tokens of keys and values (all layers): `cheapest_runs`.
        # Attention reads them in the model's dtype, int8 rows too (dequantized).
        self.run_cost = config.num_layers * ATTENTION_CALL_BYTES / kv_cache_bytes_per_token(config, dtype)
        self._order_checked = True
        self._runs_memo: tuple[tuple[int, ...], list[tuple[int, int]]] = ((), [])
        self._spares: dict[tuple, torch.Tensor] = {}  # one row per row shape and dtype, for `_move`

    def _tensors(self) -> list[torch.Tensor]:
        """Every per-layer buffer: keys and values, then (int8) their scales."""
        return self.keys + self.values + self.key_scales + self.value_scales

    def dequantize_buffer(self, which: int, numel: int) -> torch.Tensor:
        """A reused flat buffer of `numel` elements of the model's dtype (0: keys, 1: values)."""
        if self._dequantized[which].numel() < numel:
            self._dequantized[which] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._dequantized[which][:numel]

    # --------------------------------------------------------------------- capacity
    @property
    def num_slots(self) -> int:
        """Allocated rows (occupied or not)."""
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        """Allocated positions per row."""
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def memory(self) -> int:
        """Bytes held now, over all layers, keys and values."""
        return self.num_slots * self.capacity * self.bytes_per_token

    def fits(self, rows: int, length: int) -> bool:
        """Whether `rows` sequences of up to `length` positions fit in `memory_limit`."""
        need_rows, need_length = max(rows, self.num_slots), max(length, self.capacity)
        return (
            _next_power_of_two(need_rows) * _next_power_of_two(need_length) * self.bytes_per_token <= self.memory_limit
        )

    @torch.inference_mode()  # the buffers are made and updated inside the engine's step
    def reserve(self, rows: int, length: int) -> None:
        """Grow (never shrink) to at least `rows` slots of `length` positions, keeping contents."""
        if rows <= self.num_slots and length <= self.capacity:
            return
        if not self.fits(rows, length):
            raise ValueError(f"{rows} resident rows of {length} positions exceed the {self.memory_limit}-byte limit")
        new_rows = _next_power_of_two(max(rows, self.num_slots))
        new_length = _next_power_of_two(max(length, self.capacity))
        shape = (new_rows, self.num_kv_heads, new_length, self.head_dim)
        old_rows, old_length = self.num_slots, self.capacity
        # Zeros, not empty: rows outside a batch's sequences are read (and ignored) by
        # attention, and must not hold NaN bit patterns.
        layers = self.num_layers
        grown = [torch.zeros(shape, dtype=self.stored_dtype, device=self.device) for _ in range(2 * layers)]
        if self.quantized:
            scale_shape = (*shape[:3], 1)
            grown += [torch.zeros(scale_shape, device=self.device) for _ in range(2 * layers)]
        for new, old in zip(grown, self._tensors()):
            new[:old_rows, :, :old_length] = old
        self.keys, self.values = grown[:layers], grown[layers : 2 * layers]
        if self.quantized:
            self.key_scales, self.value_scales = grown[2 * layers : 3 * layers], grown[3 * layers :]

    def clear(self) -> None:
        """Drop every slot and the memory behind them (the engine does when a batch would
        not fit `memory_limit` and it gathers blocks instead)."""
        self.keys, self.values, self.owners, self.lengths = [], [], [], []
        self.key_scales, self.value_scales = [], []
        self._dequantized = [torch.empty(0, dtype=self.dtype, device=self.device) for _ in range(2)]
        self.slot_of.clear()
        self._spares = {}
        self._order_checked = True

    # ---------------------------------------------------------------------- slots
    @torch.inference_mode()  # the buffers are made and updated inside the engine's step
    def admit(self, owner: object, cache: PagedKVCache, block_table: list[int], num_tokens: int) -> int:
        """Give `owner` the next free slot, filled with its first `num_tokens` keys and values
        from the blocks `block_table`; returns the slot."""
        if owner in self.slot_of:
            raise ValueError("this sequence already has a resident slot")
        if cache.quantized != self.quantized:
            raise ValueError(
                f"resident rows of kv_cache_dtype {self.kv_cache_dtype!r} cannot copy a paged cache of "
                f"{cache.kv_cache_dtype!r}; give both the same kv_cache_dtype"
            )
        slot = len(self.owners)
        self.reserve(slot + 1, max(num_tokens, 1))
        if num_tokens:
            size = cache.block_size
            used = torch.tensor(block_table[: -(-num_tokens // size)], dtype=torch.long, device=cache.device)
            pools = cache.keys + cache.values + cache.key_scales + cache.value_scales
            for pool, resident in zip(pools, self._tensors(), strict=True):  # (int8: scales too)
                blocks = pool.view(cache.num_blocks, size, self.num_kv_heads, pool.shape[-1])
                tokens = blocks.index_select(0, used).flatten(0, 1)[:num_tokens]
                resident[slot, :, :num_tokens] = tokens.transpose(0, 1)
        self.owners.append(owner)
        self.lengths.append(num_tokens)
        self.slot_of[owner] = slot
        self.note_change()
        return slot

    @torch.inference_mode()  # the buffers are made and updated inside the engine's step
    def release(self, owner: object) -> None:
        """Free `owner`'s slot (if it has one); the last occupied slot moves into it."""
        slot = self.slot_of.pop(owner, None)
        if slot is None:
            return
        last = len(self.owners) - 1
        if slot != last:
            moved, length = self.owners[last], self.lengths[last]
            for tensor in self._tensors():
                tensor[slot, :, :length] = tensor[last, :, :length]
            self.owners[slot], self.lengths[slot] = moved, length
            self.slot_of[moved] = slot
        self.owners.pop()
        self.lengths.pop()
        self.note_change()
        # The buffers stay when the last sequence leaves: fresh memory costs a page fault per
        # 4 KiB on first touch, more than hundreds of decode steps' copying (docs/serving.md,
        # "Resident buffers"), and the next burst of requests would pay it again. `clear`
        # gives the memory back.

    # ------------------------------------------------------------------ slot order
    def note_change(self) -> None:
        """Rows were admitted, released or grew unevenly (a prompt chunk): their order may no
        longer be the best one."""
        self._order_checked = False

    def reorder_by_length(self) -> bool:
        """Sort the occupied slots longest first if that pays; True if they moved.

        Paying means: the keys attention would no longer read, over `REORDER_PAYBACK_STEPS`
        steps of runs cut by `cheapest_runs`, outweigh reading and writing the rows that
        move. Checked once after each `note_change` (rows keep their order in between).
        """
        if self._order_checked:
            return False
        self._order_checked = True
        lengths = self.lengths
        order = sorted(range(len(lengths)), key=lambda slot: -lengths[slot])
        moving = [i for i, slot in enumerate(order) if slot != i]
        if not moving:
            return False
        now, _ = cheapest_runs(lengths, self.run_cost)
        sorted_cost, _ = cheapest_runs([lengths[slot] for slot in order], self.run_cost)
        copied = 2 * sum(lengths[order[i]] for i in moving)
        if (now - sorted_cost) * REORDER_PAYBACK_STEPS <= copied:
            return False
        self._move(order, moving)
        return True

    @torch.inference_mode()  # the buffers are made and updated inside the engine's step
    def _move(self, order: list[int], moving: list[int]) -> None:
        """Slot i takes the contents of slot order[i], for the slots i in `moving`.

        The permutation is followed cycle by cycle through one spare row, each row copied
        once and only as far as it is filled: a temporary copy of all moving rows would be
        fresh memory, and on CPU its page faults cost more than the copying.
        """
        lengths = self.lengths
        cycles, seen = [], set()
        for start in moving:
            if start in seen:
                continue
            cycle = [start]
            while order[cycle[-1]] != start:
                cycle.append(order[cycle[-1]])
            seen.update(cycle)
            cycles.append(cycle)
        for tensor in self._tensors():
            key = (tensor.shape[1:], tensor.dtype)
            if key not in self._spares:
                self._spares[key] = torch.empty(tensor.shape[1:], dtype=tensor.dtype, device=self.device)
            spare = self._spares[key]
            for cycle in cycles:  # slot cycle[j] takes slot cycle[j + 1]'s row; the last takes the first's
                first = lengths[cycle[0]]
                spare[:, :first] = tensor[cycle[0], :, :first]
                for destination, source in itertools.pairwise(cycle):
                    tensor[destination, :, : lengths[source]] = tensor[source, :, : lengths[source]]
                tensor[cycle[-1], :, :first] = spare[:, :first]
        self.owners = [self.owners[slot] for slot in order]
        self.lengths = [lengths[slot] for slot in order]
        self.slot_of = {owner: slot for slot, owner in enumerate(self.owners)}

    def runs(self, widths: list[int]) -> list[tuple[int, int]]:
        """`cheapest_runs` of rows this wide, remembered: a batch whose rows all grew by the
        same number of tokens since the last call has the same cheapest cut."""
        key = tuple(w - widths[0] for w in widths)
        if key != self._runs_memo[0]:
            self._runs_memo = (key, cheapest_runs(widths, self.run_cost)[1])
        return self._runs_memo[1]

    def batch(
        self,
        cache: PagedKVCache,
        owners: list[object],
        block_tables: list[list[int]],
        num_computed: list[int],
        num_new: int,
    ) -> ResidentBatch:
        """The view for one forward pass over these sequences (each must hold a slot)."""
        return ResidentBatch(cache, self, [self.slot_of[o] for o in owners], block_tables, num_computed, num_new)


class ResidentBatch:
    """One forward pass's view of resident buffers (the `KVCache` protocol of `cache.py`).

    The batch's rows are the slots `first .. last` of the resident buffers, in order, so
    that attention reads one slice of them without a copy. The sequences in this pass hold
    some of those slots; any other slot in the range is a passenger: its row is computed
    and thrown away, and nothing of it is written. `member_rows` says which rows belong to
    the pass's sequences, in the order they were given; `select_members` takes them out of
    the model's output.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        resident: ResidentKV,
        slots: list[int],
        block_tables: list[list[int]],
        num_computed: list[int],
        num_new: int,
    ) -> None:
        size = cache.block_size
        for table, done in zip(block_tables, num_computed):
            if len(table) * size < done + num_new:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {done + num_new} tokens")
        first, last = min(slots), max(slots)
        rows = last - first + 1
        device = cache.device
        self.cache, self.resident, self.first = cache, resident, first
        self.member_rows = [s - first for s in slots]
        totals = [1] * rows  # passengers see one column of their own row
        starts = [0] * rows
        for row, done in zip(self.member_rows, num_computed):
            totals[row], starts[row] = done + num_new, done
        width = max(totals)
        if width > resident.capacity:
            raise ValueError(f"resident buffers hold {resident.capacity} positions, {width} needed; reserve first")
        # Pool slots and flat resident indices of the members' new tokens, computed in Python:
        # a decode step has one per row, and small tensors built op by op cost more.
        pool_slots, resident_index = [], []
        capacity, heads = resident.capacity, resident.num_kv_heads
        for slot, table, done in zip(slots, block_tables, num_computed):
            for p in range(done, done + num_new):
                pool_slots.append(table[p // size] * size + p % size)
            for h in range(heads):
                base = (slot * heads + h) * capacity + done
                resident_index.extend(range(base, base + num_new))
        self.write_slots = torch.tensor(pool_slots, dtype=torch.long, device=device)
        self.resident_index = torch.tensor(resident_index, dtype=torch.long, device=device)
        self.members = torch.tensor(self.member_rows, dtype=torch.long, device=device)
        # True when row i is the i-th sequence given: no reordering of the new keys and
        # values before writing them, nor of the logits after.
        self.in_order = self.member_rows == list(range(rows))
        positions = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(num_new)
        self.position_ids = positions.to(device)
        self.attention_mask = (torch.arange(width)[None, :] < torch.tensor(totals)[:, None]).to(device)
        runs = resident.runs(totals)
        self.row_runs = None if len(runs) == 1 else [(slice(a, b), max(totals[a:b])) for a, b in runs]
        self.batch_size, self.width, self.num_new = rows, width, num_new
        self.length = width - num_new
        self._num_computed = num_computed
        self._rows = slice(first, last + 1)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        resident = self.resident
        heads, dim = resident.num_kv_heads, resident.head_dim
        if not self.in_order:
            keys, values = keys.index_select(0, self.members), values.index_select(0, self.members)
        if resident.quantized:
            return self._update_int8(layer, keys, values)
        outputs = []
        for new, pool, buffer in (
            (keys, self.cache.keys[layer], resident.keys[layer]),
            (values, self.cache.values[layer], resident.values[layer]),
        ):
            # The blocks stay the source of truth; the resident row is a copy for attention.
            pool.index_copy_(0, self.write_slots, new.transpose(1, 2).reshape(-1, heads, dim))
            buffer.view(-1, dim).index_copy_(0, self.resident_index, new.reshape(-1, dim))
            outputs.append(buffer[self._rows, :, : self.width])
        return outputs[0], outputs[1]

    def _update_int8(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for int8 rows (`keys`, `values`: the members' own, in order): the new tokens
        are quantized once, their codes and scales written to the blocks and the resident rows,
        and the pass's rows dequantized for attention."""
        cache, resident = self.cache, self.resident
        heads, dim = resident.num_kv_heads, resident.head_dim
        outputs = []
        for which, (new, pool, pool_scales, buffer, buffer_scales) in enumerate(
            (
                (keys, cache.keys[layer], cache.key_scales[layer], resident.keys[layer], resident.key_scales[layer]),
                (
                    values,
                    cache.values[layer],
                    cache.value_scales[layer],
                    resident.values[layer],
                    resident.value_scales[layer],
                ),
            )
        ):
            codes, scales = quantize_kv(new)
            pool.index_copy_(0, self.write_slots, codes.transpose(1, 2).reshape(-1, heads, dim))
            pool_scales.index_copy_(0, self.write_slots, scales.transpose(1, 2).reshape(-1, heads, 1))
            buffer.view(-1, dim).index_copy_(0, self.resident_index, codes.reshape(-1, dim))
            buffer_scales.view(-1, 1).index_copy_(0, self.resident_index, scales.reshape(-1, 1))
            outputs.append(self._dequantize(which, buffer[self._rows], buffer_scales[self._rows]))
        return outputs[0], outputs[1]

    def _dequantize(self, which: int, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The pass's rows of keys or values in the model's dtype: each run of rows only as far
        as its width, which is all that attention reads of it (`row_runs`)."""
        rows, heads, _, dim = codes.shape
        out = self.resident.dequantize_buffer(which, rows * heads * self.width * dim).view(rows, heads, self.width, dim)
        for run, width in self.row_runs or [(slice(None), self.width)]:
            dequantize_kv(codes[run, :, :width], scales[run, :, :width], out=out[run, :, :width])
        return out

    def select_members(self, output: torch.Tensor) -> torch.Tensor:
        """The rows of a (rows, ...) output that belong to the given sequences, in their order."""
        return output if self.in_order else output.index_select(0, self.members)

    def advance(self, num_new: int) -> None:
        """Record how far each member's resident row is filled."""
        for row, done in zip(self.member_rows, self._num_computed):
            self.resident.lengths[self.first + row] = done + num_new
        if num_new > 1:  # a prompt chunk: this row grew faster than the others
            self.resident.note_change()
