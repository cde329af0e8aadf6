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

# What a cache stores keys and values as: "auto" the model's dtype, "int8" int8 codes with
# fp32 scales per token and head.
KV_CACHE_DTYPES = ("auto", "int8")
INT8_MAX = 127
# An all-zero vector gets this scale instead of 0 (as quantize.grid does), so it stays zeros.
_TINY_SCALE = 1e-12
SCALE_BYTES = 4  # one fp32 scale


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """`kv_cache_dtype` if it is one of `KV_CACHE_DTYPES`, else a ValueError saying which are."""
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}; got {kv_cache_dtype!r}"
        )
    return kv_cache_dtype


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys or values (..., head_dim) as int8 codes (same shape) and fp32 scales (..., 1): one
    symmetric absmax scale per vector, i.e. per token and head. Rounds as `quantize.grid`'s
    INT8 grid does (the cache sits below `quantize/` in the layers, so it cannot import it;
    the tests hold the two equal)."""
    x = x.float()
    scales = (x.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp_(min=_TINY_SCALE)
    codes = torch.round(x / scales).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scales


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """codes * scales: the keys or values that `quantize_kv` stored (into `out` if given, which
    may be of the model's dtype)."""
    return torch.mul(codes, scales, out=out)


def kv_cache_bytes_per_token(config: Config, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes one token's keys and values take over all layers: head_dim values of `dtype` per
    head, or with "int8" head_dim int8 codes and one fp32 scale per head."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "int8":
        per_head = config.head_dim + SCALE_BYTES
    else:
        per_head = config.head_dim * torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * per_head


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

    def share_position(self, source_rows: torch.Tensor, position: int) -> None:
        """Make every row's entry at `position` a copy of row `source_rows[row]`'s (contrastive
        search: a prompt's candidate rows differ only at their newest position)."""
        for keys, values in zip(self.keys, self.values):
            keys[:, :, position] = keys[source_rows, :, position]
            values[:, :, position] = values[source_rows, :, position]


class Int8ContiguousKVCache:
    """`ContiguousKVCache` with keys and values stored as int8 codes and fp32 scales per token
    and head (module docstring): quantized on write, dequantized on read.

    `update` returns every stored position dequantized, the new ones too, so a position's keys
    are the same whether it came in a prompt or a decode step. The dequantized keys and values
    go into one reused workspace in the model's dtype (`dtype`), sized for one layer at full
    capacity: a layer's attention consumes them before the next layer asks, so two buffers
    serve all layers. `memory` counts what is stored, not that workspace.
    """

    row_runs = None

    def __init__(
        self,
        config: Config,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
        scale_shape = (*shape[:3], 1)
        layers = range(config.num_layers)
        self.key_codes = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in layers]
        self.value_codes = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in layers]
        self.key_scales = [torch.zeros(scale_shape, dtype=torch.float32, device=device) for _ in layers]
        self.value_scales = [torch.zeros(scale_shape, dtype=torch.float32, device=device) for _ in layers]
        self.dtype, self.device = dtype, torch.device(device)
        self.bytes_per_token = kv_cache_bytes_per_token(config, dtype, "int8")
        self.capacity = capacity
        self.length = 0
        self._dequantized = [torch.empty(0, dtype=dtype, device=device) for _ in range(2)]

    @property
    def batch_size(self) -> int:
        return self.key_codes[0].shape[0]

    @property
    def memory(self) -> int:
        """Bytes of codes and scales held, over all layers, keys and values."""
        return self.batch_size * self.capacity * self.bytes_per_token

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + keys.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {end} positions needed but the cache holds {self.capacity}; "
                "create it with a larger capacity (prompt length + max new tokens)"
            )
        out = []
        for which, (new, codes, scales) in enumerate(
            (
                (keys, self.key_codes[layer], self.key_scales[layer]),
                (values, self.value_codes[layer], self.value_scales[layer]),
            )
        ):
            codes[:, :, start:end], scales[:, :, start:end] = quantize_kv(new)
            out.append(dequantize_kv(codes[:, :, :end], scales[:, :, :end], out=self._workspace(which)[:, :, :end]))
        return out[0], out[1]

    def _workspace(self, which: int) -> torch.Tensor:
        """The reused (batch, kv_heads, capacity, head_dim) destination of one dequantized layer."""
        shape = self.key_codes[0].shape
        numel = shape.numel()
        if self._dequantized[which].numel() < numel:
            self._dequantized[which] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._dequantized[which][:numel].view(shape)

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def _tensors(self) -> list[list[torch.Tensor]]:
        return [self.key_codes, self.value_codes, self.key_scales, self.value_scales]

    def add_capacity(self, extra: int) -> None:
        """As `ContiguousKVCache.add_capacity`."""
        if extra < 0:
            raise ValueError(f"extra capacity must be >= 0, got {extra}")
        if extra:
            for tensors in self._tensors():
                tensors[:] = [torch.cat((t, t.new_zeros(*t.shape[:2], extra, t.shape[3])), dim=2) for t in tensors]
            self.capacity += extra

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding's rollback)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) batch rows, as beam search does after each step."""
        for tensors in self._tensors():
            tensors[:] = [t.index_select(0, rows) for t in tensors]

    def share_position(self, source_rows: torch.Tensor, position: int) -> None:
        """As `ContiguousKVCache.share_position`."""
        for tensors in self._tensors():
            for t in tensors:
                t[:, :, position] = t[source_rows, :, position]


def make_kv_cache(
    config: Config,
    batch_size: int,
    capacity: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    kv_cache_dtype: str = "auto",
) -> ContiguousKVCache | Int8ContiguousKVCache:
    """The contiguous cache for `kv_cache_dtype` ("auto": keys and values in `dtype`, the
    model's; "int8": `Int8ContiguousKVCache`)."""
    if check_kv_cache_dtype(kv_cache_dtype) == "int8":
        return Int8ContiguousKVCache(config, batch_size, capacity, dtype, device)
    return ContiguousKVCache(config, batch_size, capacity, dtype, device)


# ------------------------------------------------------------------- encoder-decoder caches
class CrossAttentionCache:
    """The keys and values each decoder layer's cross-attention reads, (batch, kv_heads,
    source length, head_dim) per layer, with the source padding as an additive mask (batch,
    1, 1, source length; None without padding).

    They depend on the encoder output only, so they are computed once per input
    (`seq2seq.EncoderDecoderTransformer.cross_attention_cache`) and read at every decode step;
    `select` makes them follow the rows (beams) of the decoder's own cache.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor | None) -> None:
        self.keys, self.values, self.mask = keys, values, mask

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) batch rows."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows)


class EncoderDecoderCache:
    """An encoder-decoder model's cache: the decoder's self-attention cache (a contiguous one,
    `make_kv_cache`) and the `CrossAttentionCache` beside it.

    It is a `KVCache` by delegation (the decoder's self-attention layers call `update` and
    `advance` on it as a decoder-only model's layers would), so the decoding strategies that
    grow, reorder and trim a decoder-only cache drive this one unchanged.
    """

    row_runs = None

    def __init__(self, self_attention: ContiguousKVCache | Int8ContiguousKVCache, cross_attention: CrossAttentionCache):
        if self_attention.batch_size != cross_attention.batch_size:
            raise ValueError(
                f"the self-attention cache has {self_attention.batch_size} rows but the cross-attention cache "
                f"{cross_attention.batch_size}; both hold one row per decoded sequence"
            )
        self.self_attention, self.cross_attention = self_attention, cross_attention

    @property
    def length(self) -> int:
        return self.self_attention.length

    @property
    def capacity(self) -> int:
        return self.self_attention.capacity

    @property
    def batch_size(self) -> int:
        return self.self_attention.batch_size

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.self_attention.update(layer, keys, values)

    def advance(self, num_new: int) -> None:
        self.self_attention.advance(num_new)

    def crop(self, length: int) -> None:
        self.self_attention.crop(length)

    def select(self, rows: torch.Tensor) -> None:
        self.self_attention.select(rows)
        self.cross_attention.select(rows)
