"""Encoder-decoder transformers with cross-attention: T5, BART and Marian.

The original transformer (Vaswani et al. 2017) reads its input with an encoder, a stack of
bidirectional self-attention blocks, and writes its output with a decoder whose blocks add a
cross-attention between the causal self-attention and the MLP: queries from the decoder,
keys and values from the encoder's last hidden states. The families differ in config fields
(`config.py`), never in classes:

    T5 (Raffel et al. 2020)      pre-norm, RMS norm without a mean, no biases, no attention
                                 scaling, a relative position bias (Shaw et al. 2018) over
                                 log-spaced buckets, computed by the first layer of each stack
                                 and added in every layer; v1.0: ReLU MLP and a tied head fed
                                 d_model ** -0.5 times the decoder output; v1.1 / Flan-T5:
                                 gated-GELU MLP, untied head.
    BART (Lewis et al. 2020)     post-norm, biases, learned positions from a table offset by 2,
                                 a LayerNorm on the embeddings, a final logits bias.
    Marian (Junczys-Dowmunt      BART's block with the fixed sinusoidal positions of Vaswani
    et al. 2018)                 et al. (`model.sinusoidal_positions`) and sqrt(d) embeddings.

The pieces are `model.py`'s: `Norm`, `MLP`, the self-attention `Attention` (SDPA, fused q/k/v)
and `Block` for the encoder. Added here: `CrossAttention`, `DecoderBlock`, the relative
position bias, and the model. Positions count columns from 0 in both stacks, as in the
reference models, so inputs are right-padded (each row then gets the logits it gets alone).

Decoding goes through the cache seam (`cache.py`): `EncoderDecoderCache` holds the decoder's
self-attention KV cache and a `CrossAttentionCache`, whose per-layer encoder keys and values
are computed once per input. `BoundDecoder` is the decoder with its input encoded, callable
as a decoder-only model is, so that greedy, sampling and beam search (`generate/`) run it
unchanged (`generate.seq2seq`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CrossAttentionCache, EncoderDecoderCache, make_kv_cache
from .config import Config
from .model import Block, ModelOutput, Norm, Transformer, build_attention_mask, sinusoidal_positions

__all__ = [
    "BoundDecoder",
    "CrossAttention",
    "DecoderBlock",
    "EncoderDecoderTransformer",
    "EncoderDecoderUnsupported",
    "RelativePositionBias",
    "is_encoder_decoder",
    "refuse_encoder_decoder",
    "relative_position_buckets",
]


class EncoderDecoderUnsupported(ValueError):
    """An encoder-decoder model was given to a feature that works on decoder-only models."""


def is_encoder_decoder(model_or_config) -> bool:
    """True for an encoder-decoder model (or its `Config`)."""
    config = model_or_config if isinstance(model_or_config, Config) else getattr(model_or_config, "config", None)
    return isinstance(config, Config) and config.encoder_decoder


def refuse_encoder_decoder(model_or_config, feature: str, why: str) -> None:
    """Raise `EncoderDecoderUnsupported` naming `feature` and `why` it needs a decoder-only
    model, when given an encoder-decoder model or config; return otherwise."""
    if is_encoder_decoder(model_or_config):
        config = model_or_config if isinstance(model_or_config, Config) else model_or_config.config
        raise EncoderDecoderUnsupported(
            f"{feature} needs a decoder-only model, and {config.family} is an encoder-decoder model: {why}"
        )


# ------------------------------------------------------------------------------- positions
def relative_position_buckets(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position).

    Half the buckets hold the exact distances 0 .. n/2 - 1; the other half cover the distances
    up to `max_distance` on a log scale, and every farther distance shares the last bucket.
    Bidirectional (encoder): keys after the query get their own half of the buckets. Causal
    (decoder): only keys at or before the query exist, so every bucket measures the past.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    # The same float32 operations, in the same order, as the reference: a distance on a
    # bucket boundary must land in the same bucket.
    logarithmic = exact + (
        torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).to(torch.long)
    logarithmic = logarithmic.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, logarithmic)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head) added to the attention logits (T5): the only position
    information a T5 stack has. One table per stack, used by all its layers."""

    def __init__(self, config: Config, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = (
            config.relative_attention_num_buckets,
            config.relative_attention_max_distance,
        )
        self.bias = nn.Embedding(self.num_buckets, config.num_heads)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """(1, heads, queries, keys) biases for 1-D integer positions."""
        relative = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_buckets(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.bias(buckets).permute(2, 0, 1)[None]


# ------------------------------------------------------------------------- cross-attention
class CrossAttention(nn.Module):
    """Attention from the decoder's hidden states (queries) to the encoder's (keys and values).

    Keys and values are one product (`kv`), as self-attention's q/k/v are; `keys_values` is
    called once per input and its result kept in a `CrossAttentionCache`."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q = nn.Linear(d, config.num_heads * hd, bias=config.qkv_bias)
        self.kv = nn.Linear(d, 2 * config.num_kv_heads * hd, bias=config.qkv_bias)
        self.o = nn.Linear(config.num_heads * hd, d, bias=config.attn_out_bias)
        self.scale = config.attention_scale
        self.dropout = config.dropout

    def keys_values(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv_heads, source, head_dim) keys and values of the encoder output."""
        batch, source, _ = encoder_states.shape
        kv = self.kv(encoder_states).view(batch, source, 2 * self.num_kv_heads, self.head_dim).transpose(1, 2)
        return kv[:, : self.num_kv_heads], kv[:, self.num_kv_heads :]

    def forward(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o(out.transpose(1, 2).reshape(batch, seq, -1))


class DecoderBlock(Block):
    """A decoder layer: causal self-attention, cross-attention to the encoder, MLP, each in a
    residual connection, pre-norm (T5) or post-norm (BART, Marian)."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__(config, layer)
        self.cross_norm = Norm(config.hidden_size, config.norm, config.norm_eps, config.norm_weight_offset)
        self.cross_attn = CrossAttention(config)

    def forward(self, x, mask, is_causal, cache, cross_keys_values, cross_mask) -> torch.Tensor:
        keys, values = cross_keys_values
        if self.post_norm:
            x = self.attn_norm(x + self._dropout(self.attn(x, None, mask, is_causal, cache)))
            x = self.cross_norm(x + self._dropout(self.cross_attn(x, keys, values, cross_mask)))
            return self.mlp_norm(x + self._mlp(x, []))
        x = x + self._dropout(self.attn(self.attn_norm(x), None, mask, is_causal, cache))
        x = x + self._dropout(self.cross_attn(self.cross_norm(x), keys, values, cross_mask))
        return x + self._mlp(self.mlp_norm(x), [])


# ----------------------------------------------------------------------------------- stacks
class Stack(nn.Module):
    """The encoder or the decoder: its position scheme, embedding norm, blocks and final norm
    (the token embedding is the model's, shared by both)."""

    def __init__(self, config: Config, is_decoder: bool) -> None:
        super().__init__()
        d = config.hidden_size
        self.config, self.is_decoder = config, is_decoder
        layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.embed_positions = None
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings + config.position_offset, d)
        if config.position == "sinusoidal":  # computed, not learned: rebuilt on load, never saved
            self.register_buffer(
                "sinusoidal_table", sinusoidal_positions(config.max_position_embeddings, d), persistent=False
            )
        self.relative_bias = (
            RelativePositionBias(config, bidirectional=not is_decoder) if config.position == "relative" else None
        )
        self.embed_norm = Norm(d, config.norm, config.norm_eps) if config.embedding_norm else None
        block = DecoderBlock if is_decoder else Block
        self.blocks = nn.ModuleList(block(config, i) for i in range(layers))
        # Post-norm layers end on a normed residual; pre-norm stacks need one more norm.
        self.final_norm = None if config.post_norm else Norm(d, config.norm, config.norm_eps, config.norm_weight_offset)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Add the absolute positions (1-D column indices) to token embeddings `x` and norm them."""
        config = self.config
        if config.position in ("learned", "sinusoidal") and int(positions[-1]) >= config.max_position_embeddings:
            stack = "decoder" if self.is_decoder else "encoder"
            raise ValueError(
                f"position {int(positions[-1])} is beyond this model's {config.max_position_embeddings} "
                f"{config.position} positions ({stack}); shorten the {'output' if self.is_decoder else 'input'}"
            )
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions + config.position_offset)
        if config.position == "sinusoidal":
            x = x + self.sinusoidal_table[positions].to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.training and config.dropout:
            x = F.dropout(x, config.dropout, training=True)
        return x


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, 1, 1, keys) additive mask, -inf on padding; None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(attention_mask == 0, float("-inf"))[:, None, None, :]


# ------------------------------------------------------------------------------------ model
class EncoderDecoderTransformer(nn.Module):
    """An encoder, a decoder with cross-attention, and an LM head over a shared embedding.

    `forward(input_ids, decoder_input_ids, ...)` gives the decoder's logits for a batch of
    inputs; `make_cache` encodes the inputs once for decoding step by step, and `bind` gives
    the decoder as a callable decoder-only model for the decoding strategies.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        if not config.encoder_decoder:
            raise ValueError(f"{config.family} is not an encoder-decoder config; build a model.Transformer")
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.encoder = Stack(config, is_decoder=False)
        self.decoder = Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        # BART and Marian add a fixed bias to the logits (a buffer there, never trained).
        self.final_logits_bias = (
            nn.Parameter(torch.zeros(1, config.vocab_size), requires_grad=False) if config.final_logits_bias else None
        )
        self.apply(Transformer._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def _embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        return x

    # ---------------------------------------------------------------------------- encoder
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's last hidden states (batch, source, hidden) for right-padded `input_ids`
        (batch, source); `attention_mask` is 1 on tokens, 0 on padding."""
        _check_ids(input_ids, "input_ids")
        batch, source = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, source):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected that of input_ids, {(batch, source)}"
            )
        positions = torch.arange(source, device=input_ids.device)
        x = self.encoder.embed(self._embed_tokens(input_ids), positions)
        mask = padding_bias(attention_mask, x.dtype)
        if self.encoder.relative_bias is not None:
            bias = self.encoder.relative_bias(positions, positions).to(x.dtype)
            mask = bias if mask is None else bias + mask
        for block in self.encoder.blocks:
            x = block(x, None, mask, False, None, [])
        return x if self.encoder.final_norm is None else self.encoder.final_norm(x)

    def cross_attention_cache(
        self, encoder_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> CrossAttentionCache:
        """Every decoder layer's cross-attention keys and values of `encoder_states`, and the
        source padding: computed once per input, read at every decode step."""
        pairs = [block.cross_attn.keys_values(encoder_states) for block in self.decoder.blocks]
        return CrossAttentionCache(
            [k for k, _ in pairs], [v for _, v in pairs], padding_bias(attention_mask, encoder_states.dtype)
        )

    def make_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        capacity: int,
        kv_cache_dtype: str = "auto",
    ) -> EncoderDecoderCache:
        """Encode `input_ids` and return the cache to decode them with: cross-attention keys and
        values filled, a self-attention cache of `capacity` decoder positions."""
        cross = self.cross_attention_cache(self.encode(input_ids, attention_mask), attention_mask)
        return self._cache_for(cross, input_ids.shape[0], capacity, kv_cache_dtype)

    def _cache_for(self, cross: CrossAttentionCache, batch_size: int, capacity: int, kv_cache_dtype: str):
        own = make_kv_cache(
            self.config.decoder_stack, batch_size, capacity, self.dtype, self.device, kv_cache_dtype=kv_cache_dtype
        )
        return EncoderDecoderCache(own, cross)

    def bind(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BoundDecoder:
        """The decoder with `input_ids` encoded (once), as a decoder-only model (`BoundDecoder`)."""
        cross = self.cross_attention_cache(self.encode(input_ids, attention_mask), attention_mask)
        return BoundDecoder(self, cross)

    # ---------------------------------------------------------------------------- decoder
    def decode(
        self,
        input_ids: torch.Tensor,
        cross: CrossAttentionCache,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        logits_to_keep: int = 0,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Run the decoder on `input_ids` (batch, seq) against the encoded input `cross`.

        attention_mask: (batch, past + seq) over the decoder's tokens, cached ones included;
            1 on tokens, 0 on (right) padding. cache: the decoder's earlier positions.
        """
        config = self.config
        _check_ids(input_ids, "decoder_input_ids")
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        if cross.batch_size != batch:
            raise ValueError(f"the encoded input has {cross.batch_size} rows but the decoder input {batch}")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + seq):
            raise ValueError(
                f"decoder attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + new) = "
                f"({batch}, {past + seq})"
            )
        device = input_ids.device
        query_positions = torch.arange(past, past + seq, device=device)
        x = self.decoder.embed(self._embed_tokens(input_ids), query_positions)
        mask, is_causal = self._decoder_mask(attention_mask, query_positions, past + seq, x.dtype)
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, mask, is_causal, cache, cross.layer(i), cross.mask)
        if cache is not None:
            cache.advance(seq)
        if self.decoder.final_norm is not None:
            x = self.decoder.final_norm(x)
        logits = None
        if compute_logits:
            head_input = x[:, -logits_to_keep:] if logits_to_keep else x
            if config.output_multiplier != 1.0:
                head_input = head_input * config.output_multiplier
            logits = self.lm_head(head_input)
            if self.final_logits_bias is not None:
                logits = logits + self.final_logits_bias
        return ModelOutput(logits=logits, hidden_states=x, router_logits=[])

    def _decoder_mask(self, attention_mask, query_positions, num_keys: int, dtype) -> tuple:
        """The decoder self-attention's (mask, is_causal): causal over cached and new tokens,
        padding and T5's relative bias added where there are any."""
        seq = query_positions.shape[0]
        padded = attention_mask is not None and not bool(attention_mask.all())
        key_positions = torch.arange(num_keys, device=query_positions.device)
        bias = None
        if self.decoder.relative_bias is not None:
            bias = self.decoder.relative_bias(query_positions, key_positions).to(dtype)
        if bias is None and not padded:
            if seq == 1:
                return None, False  # one new token may see every key
            if num_keys == seq:
                return None, True
        allowed = build_attention_mask(
            query_positions[None], key_positions[None], attention_mask if padded else None, causal=True, window=None
        )
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        return (mask if bias is None else mask + bias), False

    def forward(
        self,
        input_ids: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        logits_to_keep: int = 0,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Logits of the decoder on `decoder_input_ids` for the inputs `input_ids`.

        Without `cache` the input is encoded here; with one (`make_cache`) it was encoded
        when the cache was made, and `input_ids` may be None.
        """
        if cache is not None:
            cross = cache.cross_attention
        elif input_ids is None:
            raise ValueError("pass input_ids, or a cache made by make_cache that holds them encoded")
        else:
            cross = self.cross_attention_cache(self.encode(input_ids, attention_mask), attention_mask)
        return self.decode(decoder_input_ids, cross, decoder_attention_mask, cache, logits_to_keep, compute_logits)


class BoundDecoder:
    """The decoder of an `EncoderDecoderTransformer` with one batch of inputs encoded.

    Called as a decoder-only `model.Transformer` is, `(input_ids, attention_mask, cache,
    logits_to_keep)`, and asked for its cache through `make_kv_cache`, it lets the decoding
    strategies of `generate/` (sampling, greedy, beam search) run an encoder-decoder model
    without knowing it is one. Its rows are the encoded inputs' rows.
    """

    def __init__(self, model: EncoderDecoderTransformer, cross: CrossAttentionCache) -> None:
        self.model, self.cross = model, cross
        self.config = model.config
        self.training = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def make_kv_cache(self, batch_size: int, capacity: int, kv_cache_dtype: str = "auto") -> EncoderDecoderCache:
        """The cache of a decode over these inputs: a self-attention cache of `capacity`
        positions beside the encoded inputs' keys and values (rows shared until `select`)."""
        if batch_size != self.cross.batch_size:
            raise ValueError(f"{batch_size} cache rows asked for {self.cross.batch_size} encoded inputs")
        cross = CrossAttentionCache(list(self.cross.keys), list(self.cross.values), self.cross.mask)
        return self.model._cache_for(cross, batch_size, capacity, kv_cache_dtype)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        cross = cache.cross_attention if cache is not None else self.cross
        return self.model.decode(input_ids, cross, attention_mask, cache, logits_to_keep)


def _check_ids(ids: torch.Tensor, name: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a (batch, seq) integer tensor")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty; give at least one token per row")
