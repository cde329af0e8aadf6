"""Key/value caches: the seam between the model and whoever schedules tokens.

Attention never owns its past. Each layer hands its new keys and values to a cache object
through `update(layer, keys, values)` and gets back every key and value it should attend
over. `ContiguousKVCache` serves one batch of sequences that grow together (simple
generation, beam search, speculative decoding); the serving engine plugs a paged cache with
block tables into the same three calls.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .config import Config


class KVCache(Protocol):
    """What the model needs from a cache.

    `length` is the number of positions already stored for every sequence in the batch; the
    model places new tokens after them. `update` stores the new keys/values of one layer and
    returns all of that layer's keys/values (batch, kv_heads, length + new, head_dim).
    `advance` is called once per forward pass, after every layer has been updated.

    `row_runs` is None (attend over every row's keys at once), or a list of (rows, width)
    pairs, `rows` a slice of the batch, that cover the batch in order. Attention then runs once
    per run over only the first `width` keys of its rows; the cache promises that no row of a
    run attends beyond `width` (its mask is False there). Rows of very different lengths (the
    serving engine's running sequences) stop paying for the longest one's keys.
    """

    length: int
    row_runs: list[tuple[slice, int]] | None

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, num_new: int) -> None: ...


class ContiguousKVCache:
    """A preallocated (batch, kv_heads, capacity, head_dim) buffer per layer.

    Preallocation keeps decoding free of the quadratic `torch.cat` copying a growing cache
    would do; `capacity` is prompt length plus the tokens to generate.
    """

    row_runs = None  # the rows grow together: one attention call over all of them

    def __init__(
        self,
        config: Config,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.capacity = capacity
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + keys.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {end} positions needed but the cache holds {self.capacity}; "
                "create it with a larger capacity (prompt length + max new tokens)"
            )
        self.keys[layer][:, :, self.length : end] = keys
        self.values[layer][:, :, self.length : end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def add_capacity(self, extra: int) -> None:
        """Make room for `extra` more positions, keeping what is stored. Prompt methods need it:
        their virtual tokens occupy cache positions that the caller, sizing the cache for its
        own prompt and new tokens, did not count (`finetune.prompts`)."""
        if extra < 0:
            raise ValueError(f"extra capacity must be >= 0, got {extra}")
        if extra:
            self.keys = [torch.cat((k, k.new_empty(*k.shape[:2], extra, k.shape[3])), dim=2) for k in self.keys]
            self.values = [torch.cat((v, v.new_empty(*v.shape[:2], extra, v.shape[3])), dim=2) for v in self.values]
            self.capacity += extra

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding's rollback)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) batch rows, as beam search does after each step."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
