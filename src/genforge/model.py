"""The transformer, read top to bottom.

One module serves every family in `config.py`: decoder-only language models (GPT-2, Llama,
Mistral, Qwen, Gemma, Phi-3, Mixtral; Radford et al. 2019, Touvron et al. 2023, Jiang et al.
2023/2024) and the BERT encoder (Devlin et al. 2019). The differences are config fields:

    embeddings   tokens (+ learned or sinusoidal positions) (+ segment types) (x multiplier) (+ norm)
    block        pre-norm:  x + attn(norm(x)),  then  x + mlp(norm(x))
                 post-norm: norm(x + attn(x)),  then  norm(x + mlp(x))        (BERT)
    attention    scaled dot-product (Vaswani et al. 2017) through torch's fused SDPA kernel,
                 MHA / GQA / MQA, RoPE (Su et al. 2021; linear, NTK-aware, dynamic NTK,
                 Llama 3 or YaRN scaling), learned or sinusoidal positions or ALiBi's per-head linear
                 biases (Press et al. 2022; BLOOM), causal or bidirectional,
                 optional sliding window (Mistral) and q/k norm (Qwen3)
    mlp          plain (GELU) or gated (SwiGLU / GeGLU, Shazeer 2020), or a mixture of
                 experts with top-k routing (Shazeer et al. 2017, Mixtral) or Switch top-1
                 routing with an expert capacity (Fedus et al. 2022)
    head         final norm + linear to the vocabulary, tied or not to the embeddings

The model keeps no state between calls: keys and values live in the cache object the caller
passes (see `cache.py`). Its linear layers are plain `nn.Linear`, with queries, keys and values
in one product (`qkv`) and a gated MLP's gate and up in another (`gate_up`); whatever computes a
linear layer differently (oneDNN, packed weights, adapters, quantized weights) is put in place
afterwards by `swap.swap_linears`, under the same state-dict keys.

Encoder-decoder models (T5, BART, Marian) are built from these pieces in `seq2seq.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import Config
from .sparse_attention import BandedAttention, banded_attention, banded_plan, pattern_mask


# ---------------------------------------------------------------------------------- norms
class Norm(nn.Module):
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019).

    RMSNorm is computed in float32 whatever the weights' dtype, as the reference models do,
    because the mean of squares loses precision in half precision. Gemma stores its weight
    as an offset from one (`weight_offset=1`).
    """

    def __init__(self, size: int, kind: str, eps: float, weight_offset: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.kind, self.eps, self.weight_offset = kind, eps, weight_offset
        self.weight = nn.Parameter(torch.full((size,), 1.0 - weight_offset))
        # LayerNorm has a bias unless the family drops it (MPT); RMSNorm never has one.
        self.bias = nn.Parameter(torch.zeros(size)) if kind == "layernorm" and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not self.weight_offset:
            # The same arithmetic as below in one call, without the separate weight product.
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        if self.weight_offset:
            return (normed * (self.weight.float() + self.weight_offset)).to(x.dtype)
        return self.weight * normed.to(x.dtype)


# ------------------------------------------------------------------------------- positions
class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021) with long-context scaling.

    Each pair of channels is rotated by an angle proportional to the position, at a frequency
    per channel pair. `rope_frequencies` gives those frequencies for the config's `rope_type`;
    only dynamic NTK scaling depends on the sequence, and for it each row's frequencies are
    recomputed from its own length once that passes `max_position_embeddings`.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dynamic = config.rope_type == "dynamic"

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables (batch, seq, 1, rotary_dim) for integer `positions` (batch, seq),
        shaped to broadcast over the heads of (batch, seq, heads, head_dim) queries and keys."""
        inv_freq = self.inv_freq
        if self.dynamic:
            # A row's length so far is its last position + 1 (positions count from its first
            # real token, so padding does not lengthen it). Rows within the trained context keep
            # the original frequencies, so only a long batch pays for the recomputation.
            lengths = positions.amax(dim=-1) + 1
            if int(lengths.max()) > self.config.max_position_embeddings:
                inv_freq = rope_frequencies(self.config, lengths.cpu())[0].to(positions.device)[:, None, :]
        angles = positions[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, :, None]
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def rope_frequencies(config: Config, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (rotary_dim // 2 of them) of `config`'s RoPE and the factor its
    cos and sin are scaled by, for the scaling its `rope_type` names (`_FREQUENCY_SCALINGS`).

    lengths: (batch,) sequence lengths, read by dynamic scaling only; it then returns one row
        of frequencies per length, (batch, rotary_dim // 2). None: the trained context.
    """
    return _FREQUENCY_SCALINGS[config.rope_type](config, config.rotary_dim, lengths)


def _inverse_frequencies(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    """theta_i = base^(-2i / dim) for each channel pair i; a (batch,) tensor of bases gives
    one row per base."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    if isinstance(base, torch.Tensor):
        return 1.0 / (base.float()[:, None] ** exponents)
    return 1.0 / (base**exponents)


def _default_frequencies(config: Config, dim: int, lengths) -> tuple[torch.Tensor, float]:
    return _inverse_frequencies(config.rope_theta, dim), 1.0


def _linear_frequencies(config: Config, dim: int, lengths) -> tuple[torch.Tensor, float]:
    # Position interpolation (Chen et al. 2023): every frequency divided by the factor, so
    # factor x the trained context spans the angles the model was trained on.
    return _inverse_frequencies(config.rope_theta, dim) / config.rope_scaling["factor"], 1.0


def _ntk_base(config: Config, dim: int, alpha: float | torch.Tensor) -> float | torch.Tensor:
    # NTK-aware scaling (bloc97, 2023): a larger base stretches the low frequencies by about
    # alpha while the highest stays put; alpha^(dim / (dim - 2)) makes the lowest exactly alpha.
    return config.rope_theta * alpha ** (dim / (dim - 2))


def _ntk_frequencies(config: Config, dim: int, lengths) -> tuple[torch.Tensor, float]:
    # Static NTK-aware scaling: one alpha (`factor`) whatever the length.
    return _inverse_frequencies(_ntk_base(config, dim, config.rope_scaling["factor"]), dim), 1.0


def _dynamic_frequencies(config: Config, dim: int, lengths) -> tuple[torch.Tensor, float]:
    # Dynamic NTK scaling (emozilla, 2023): alpha grows with the length L once it passes the
    # trained context C, alpha = factor * L / C - (factor - 1): 1 at C, `factor` at 2C - C / factor.
    # Sequences that fit keep the original frequencies. float32, as transformers computes it.
    if lengths is None:
        return _default_frequencies(config, dim, lengths)
    factor, context = config.rope_scaling["factor"], config.max_position_embeddings
    alpha = factor * lengths.clamp(min=context).float() / context - (factor - 1)
    return _inverse_frequencies(_ntk_base(config, dim, alpha), dim), 1.0


def _llama3_frequencies(config: Config, dim: int, lengths) -> tuple[torch.Tensor, float]:
    s = config.rope_scaling
    inv_freq = _inverse_frequencies(config.rope_theta, dim)
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    context = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are interpolated, short ones kept, and a linear ramp
    # in between avoids a discontinuity.
    smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0


def _yarn_frequencies(config: Config, dim: int, lengths) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): interpolated and original frequencies blended per channel, and
    # attention sharpened by `attention_factor`.
    s = config.rope_scaling
    inv_freq = _inverse_frequencies(config.rope_theta, dim)
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or config.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def channel_for(rotations: float) -> float:
        # The channel whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low, high = channel_for(s.get("beta_fast") or 32), channel_for(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the original frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


# rope_type -> (config, rotary_dim, lengths) -> (inverse frequencies, attention factor)
_FREQUENCY_SCALINGS = {
    "default": _default_frequencies,
    "linear": _linear_frequencies,
    "ntk": _ntk_frequencies,
    "dynamic": _dynamic_frequencies,
    "llama3": _llama3_frequencies,
    "yarn": _yarn_frequencies,
}


def sinusoidal_positions(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed position table of the original transformer (Vaswani et al. 2017, section 3.5):
    (num_positions, dim) float32, position p's row holding sin(p * w_i) in its first
    ceil(dim / 2) channels and cos(p * w_i) in the rest, w_i = 10000 ** (-2i / dim). Sines
    and cosines sit in two halves rather than interleaved, the layout Marian checkpoints were
    trained with (transformers' MarianSinusoidalPositionalEmbedding). Computed in float64, as
    the reference does, then rounded once."""
    if num_positions < 0 or dim < 1:
        raise ValueError(f"sinusoidal_positions needs num_positions >= 0 and dim >= 1, got {num_positions}, {dim}")
    frequencies = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * frequencies
    return torch.cat((angles.sin(), angles.cos()[:, : dim // 2]), dim=-1).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of every head; the rest pass through."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------------- ALiBi
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022), float32 (num_heads,).

    For n a power of two the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ...,
    2^(-8). Otherwise the n' = largest power of two below n heads take that sequence for n',
    and the remaining n - n' heads take every other slope of the sequence for 2n' (the odd
    terms), which interleave between the first ones, as the paper's code and BLOOM do.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"ALiBi needs a positive number of heads, got {num_heads!r}")

    def geometric(n: int) -> torch.Tensor:
        # ratio and first term both 2^(-8/n)
        return torch.pow(torch.tensor(2.0 ** (-8.0 / n)), torch.arange(1, n + 1, dtype=torch.float32))

    base = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(base)
    if base != num_heads:
        slopes = torch.cat((slopes, geometric(2 * base)[0::2][: num_heads - base]))
    return slopes


def alibi_bias(slopes: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """The additive ALiBi bias (batch or 1, heads, queries, keys): -slope x distance, the
    distance counted in token positions (padding is not counted, as `position_ids` are not).

    BLOOM adds slope x key position; that differs from this only by a constant per query row,
    which softmax ignores, and this form keeps the bias near zero for long sequences."""
    distance = (key_positions[:, None, None, :] - query_positions[:, None, :, None]).float()
    return slopes.to(distance.device)[None, :, None, None] * distance


# ------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA, Ainslie et al. 2023).

    `num_kv_heads == num_heads` is classic MHA, `num_kv_heads == 1` multi-query attention
    (Shazeer 2019); SDPA's `enable_gqa` shares each key/value head with its query group
    without materialising copies.
    """

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, config.num_heads, config.num_kv_heads, hd
        # Queries, keys and values in one product (the layout of litgpt and gpt-fast): fewer,
        # larger calls. The checkpoint weight maps join and split Hugging Face's q/k/v tensors.
        self.qkv = nn.Linear(d, (config.num_heads + 2 * config.num_kv_heads) * hd, bias=config.qkv_bias)
        self.o = nn.Linear(config.num_heads * hd, d, bias=config.attn_out_bias)
        self.q_norm = Norm(hd, "rmsnorm", config.norm_eps) if config.qk_norm else None
        self.k_norm = Norm(hd, "rmsnorm", config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.scale = config.attention_scale  # None: SDPA's 1 / sqrt(head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv(x).view(batch, seq, heads + 2 * kv_heads, self.head_dim)
        q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            # One rotation over the query and key heads together instead of one each: a decode
            # step is a chain of small calls, and this is six of them instead of ten.
            q, k = apply_rope(torch.cat((q, k), dim=2), *rope).split((heads, kv_heads), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        runs = cache.row_runs if cache is not None else None
        if runs is None:
            out = self._attend(q, k, v, mask, is_causal)
        else:
            # The cache holds rows of very different lengths (the serving engine's running
            # sequences): each run of rows reads keys only as far as its own longest row.
            out = torch.cat(
                [
                    self._attend(
                        q[rows],
                        k[rows, :, :width],
                        v[rows, :, :width],
                        None if mask is None else mask[rows, ..., :width],
                        is_causal,
                    )
                    for rows, width in runs
                ]
            )
        return self.o(out.transpose(1, 2).reshape(batch, seq, -1))

    def _attend(self, q, k, v, mask, is_causal) -> torch.Tensor:
        if isinstance(mask, BandedAttention):  # a sparse pattern's band, computed alone
            return banded_attention(q, k, v, mask.window, mask.causal, mask.global_tokens)
        batch, heads, seq, dim = q.shape
        group = heads // self.num_kv_heads
        if seq == 1 and group > 1 and not (is_causal or self.training) and (mask is None or mask.shape[1] == 1):
            # One new token per row: the query heads that share a key/value head become the
            # query rows of one attention over it, so each key is read once per group rather
            # than once per head (docs/model.md). The mask is the same for all of them.
            out = F.scaled_dot_product_attention(
                q.reshape(batch, self.num_kv_heads, group, dim), k, v, attn_mask=mask, scale=self.scale
            )
            return out.reshape(batch, heads, 1, dim)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
            scale=self.scale,
        )


def build_attention_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor | None,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """Boolean mask (batch or 1, 1, queries, keys); True where a query may attend.

    Positions are token positions in each row's sequence, (batch or 1, queries) and (batch or
    1, keys). Comparing positions rather than cache slots lets the keys lie in any order: a
    left-padded contiguous cache and the engine's gathered paged blocks (past tokens, unused
    block tail, then the new tokens) get the same rule. Causal: a query sees keys at or
    before its own position; a window of w keeps only the last w of those (Beltagy et al.
    2020; Mistral). `key_valid` (batch, keys) is False on padding and unused slots.
    """
    q, k = query_positions[:, :, None], key_positions[:, None, :]
    allowed = torch.ones(q.shape[0], q.shape[1], k.shape[2], dtype=torch.bool, device=q.device)
    if causal:
        allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[:, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
        # A padding query can see nothing; let it see everything instead so softmax stays
        # finite. Its output is never used.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed


# ------------------------------------------------------------------------------------- MLP
ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    # CLIP's sigmoid approximation of GELU (Radford et al. 2021), which its weights were trained with.
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class MLP(nn.Module):
    """Position-wise feed-forward network: plain `down(act(up(x)))` or gated
    `down(act(gate(x)) * up(x))` (GLU variants, Shazeer 2020)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        d, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        # A gated MLP computes its gate and up projections in one product, gate first.
        self.gate_up = nn.Linear(d, 2 * inner, bias=bias) if config.gated_mlp else None
        self.up = None if config.gated_mlp else nn.Linear(d, inner, bias=bias)
        self.down = nn.Linear(inner, d, bias=bias)
        self.act = ACTIVATION_FUNCTIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down(self.act(self.up(x)))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class MixtureOfExperts(nn.Module):
    """Sparse mixture of gated-MLP experts with top-k routing (Shazeer et al. 2017; Mixtral).

    The router scores every expert per token; the top k are run and their outputs mixed with
    the softmax weights renormalised over the chosen k. Router logits are returned so training
    can add the load-balancing loss (`load_balancing_loss`).
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_token
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.num_experts))
        self.switch = config.router == "switch"
        if self.switch:
            self.expert_capacity, self.capacity_factor = config.expert_capacity, config.expert_capacity_factor
            self.jitter_noise = config.router_jitter_noise
            # Tokens seen and tokens dropped (over capacity) since the last `dropped_token_share`.
            self.seen_tokens, self.dropped_tokens = 0, torch.zeros((), dtype=torch.long)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.switch:
            return self._switch_forward(x)
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        router_logits = self.router(tokens)
        weights, chosen = torch.softmax(router_logits.float(), dim=-1).topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(tokens)
        # Loop over experts, not tokens: each expert runs once on the tokens routed to it.
        for expert_index in chosen.unique().tolist():
            token_rows, slot = torch.where(chosen == expert_index)
            expert_out = self.experts[expert_index](tokens[token_rows])
            out.index_add_(0, token_rows, expert_out * weights[token_rows, slot, None])
        return out.view(shape), router_logits

    # ---------------------------------------------------------------- Switch routing
    def _switch_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = x.shape
        router_input = x
        if self.training and self.jitter_noise:
            # Multiplicative jitter on the router's input only (Fedus et al. 2022, sec. 2.4).
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            router_input = x * noise
        router = self.router
        if type(router) is nn.Linear:
            # The router in float32 whatever the model's dtype ("selective precision", Switch sec. 2.4).
            router_logits = F.linear(router_input.float(), router.weight.float())
        else:  # a swapped-in linear (quantized, adapted) computes in its own way
            router_logits = router(router_input).float()
        routing = switch_route(router_logits, self.capacity(seq))
        tokens = x.reshape(-1, hidden)
        expert = routing.expert.reshape(-1)
        kept = routing.kept.reshape(-1)
        scale = routing.probability.reshape(-1).to(x.dtype)
        out = torch.zeros_like(tokens)
        # A dropped token gets no expert output: the block's residual carries it on unchanged.
        for expert_index in expert[kept].unique().tolist():
            rows = torch.where(kept & (expert == expert_index))[0]
            out.index_add_(0, rows, self.experts[expert_index](tokens[rows]) * scale[rows, None])
        self.seen_tokens += kept.numel()
        self.dropped_tokens = self.dropped_tokens.to(kept.device) + (~kept).sum().detach()
        return out.view(batch, seq, hidden), router_logits.reshape(-1, router_logits.shape[-1])

    def capacity(self, seq: int) -> int | None:
        """Tokens each expert takes from one sequence of `seq` tokens: `expert_capacity`, or
        ceil(capacity_factor x seq / experts); None: no limit."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * seq / len(self.experts))


@dataclass
class SwitchRouting:
    """Top-1 routing of (batch, seq) tokens (Fedus et al. 2022)."""

    expert: torch.Tensor  # (batch, seq) the expert of highest probability, chosen before capacity
    probability: torch.Tensor  # (batch, seq) its router probability; the expert's output is scaled by it
    kept: torch.Tensor  # (batch, seq) bool, False for tokens past their expert's capacity (dropped)


def switch_route(router_logits: torch.Tensor, capacity: int | None) -> SwitchRouting:
    """Switch routing from router logits (batch, seq, experts).

    Each token goes to its most probable expert. Capacity is counted per sequence, in token
    order: the first `capacity` tokens of a row that choose an expert are kept, later ones are
    dropped (None: none are). The output is scaled by the raw top-1 probability, not 1, so the
    router is trained through the outputs as well as through the auxiliary losses.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    probability, expert = probs.max(dim=-1)
    if capacity is None:
        return SwitchRouting(expert, probability, torch.ones_like(expert, dtype=torch.bool))
    # A token's priority is how many tokens of its row chose its expert up to and including it.
    chosen = F.one_hot(expert, router_logits.shape[-1])
    priority = chosen.cumsum(dim=-2).gather(-1, expert[..., None]).squeeze(-1)
    return SwitchRouting(expert, probability, priority <= capacity)


def switch_load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, groups: int = 1) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss (Fedus et al. 2022, eqs. 4-6): num_experts x
    sum_i f_i x P_i, with f_i the share of tokens whose top-1 expert is i (before capacity) and
    P_i the mean router probability of i, both over each group's tokens and averaged over the
    `groups` (the batch rows; each layer's logits are (groups x seq, experts), and the layers'
    tokens of one row form one group, as transformers' `load_balancing_loss_func` counts them).
    1 when routing is uniform."""
    logits = torch.cat([layer.float().reshape(groups, -1, num_experts) for layer in router_logits], dim=1)
    probs = torch.softmax(logits, dim=-1)
    routed = F.one_hot(probs.argmax(dim=-1), num_experts).float().mean(dim=1)  # (groups, experts)
    return num_experts * (routed * probs.mean(dim=1)).sum(dim=-1).mean()


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of
    logsumexp(logits)^2, which keeps router logits small and the softmax stable."""
    logits = torch.cat([layer.float().reshape(-1, layer.shape[-1]) for layer in router_logits])
    return torch.logsumexp(logits, dim=-1).square().mean()


def dropped_token_share(model: nn.Module, reset: bool = True) -> float | None:
    """The share of tokens Switch layers dropped (over capacity) since the last reset, over
    all its Switch layers; None for a model without Switch routing."""
    layers = [m for m in model.modules() if isinstance(m, MixtureOfExperts) and m.switch]
    seen = sum(layer.seen_tokens for layer in layers)
    if not layers or seen == 0:
        return None
    dropped = sum(int(layer.dropped_tokens) for layer in layers)
    if reset:
        for layer in layers:
            layer.seen_tokens, layer.dropped_tokens = 0, torch.zeros((), dtype=torch.long)
    return dropped / seen


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eqs. 4-6) over all MoE layers'
    tokens: num_experts * sum_i (share of routing slots sent to expert i) * (mean router
    probability of i). It is smallest (top_k) when routing is uniform and grows as the router
    concentrates on few experts."""
    logits = torch.cat(router_logits, dim=0).float()
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices
    routed_fraction = F.one_hot(chosen, num_experts).float().sum(dim=1).mean(dim=0)
    return num_experts * torch.sum(routed_fraction * probs.mean(dim=0))


# ----------------------------------------------------------------------------------- block
class Block(nn.Module):
    """One transformer layer: attention and MLP, each wrapped in a residual connection."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        norm = lambda: Norm(  # noqa: E731
            config.hidden_size, config.norm, config.norm_eps, config.norm_weight_offset, config.norm_bias
        )
        self.post_norm = config.post_norm
        self.attn_norm = norm()
        self.attn = Attention(config, layer)
        self.mlp_norm = norm()
        self.mlp = MixtureOfExperts(config) if config.num_experts else MLP(config)
        self.dropout = config.dropout

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # Not a call at all outside training: a decode step is a chain of small calls.
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout else x

    def _mlp(self, x: torch.Tensor, router_logits: list) -> torch.Tensor:
        out = self.mlp(x)
        if isinstance(out, tuple):
            out, logits = out
            router_logits.append(logits)
        return self._dropout(out)

    def forward(self, x, rope, mask, is_causal, cache, router_logits: list) -> torch.Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self._dropout(self.attn(x, rope, mask, is_causal, cache)))
            return self.mlp_norm(x + self._mlp(x, router_logits))
        x = x + self._dropout(self.attn(self.attn_norm(x), rope, mask, is_causal, cache))
        return x + self._mlp(self.mlp_norm(x), router_logits)


# ----------------------------------------------------------------------------------- model
class MaskedLMTransform(nn.Module):
    """The transform of BERT's masked-LM prediction head (Devlin et al. 2019): a dense layer,
    the model's activation and a LayerNorm between the encoder output and the vocabulary."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATION_FUNCTIONS[config.activation]
        self.norm = Norm(config.hidden_size, "layernorm", config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (batch, kept positions, vocab); None for a headless encoder
    hidden_states: torch.Tensor  # final hidden states (batch, seq, hidden), after the final norm
    router_logits: list[torch.Tensor]  # one (tokens, experts) tensor per MoE layer


class Transformer(nn.Module):
    """A whole transformer: embeddings, `num_layers` blocks, final norm and LM head."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, d) if config.position == "learned" else None
        if config.position == "sinusoidal":  # computed, not learned: rebuilt on load, never saved
            self.register_buffer(
                "sinusoidal_table", sinusoidal_positions(config.max_position_embeddings, d), persistent=False
            )
        self.embed_types = nn.Embedding(config.type_vocab_size, d) if config.type_vocab_size else None
        self.embed_norm = (
            Norm(d, config.norm, config.norm_eps, bias=config.norm_bias) if config.embedding_norm else None
        )
        self.embed_dropout = config.dropout
        self.rotary = RotaryEmbedding(config) if config.position == "rope" else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        # Post-norm encoders end on a normed residual; pre-norm decoders need one more norm.
        self.final_norm = (
            None
            if config.post_norm
            else Norm(d, config.norm, config.norm_eps, config.norm_weight_offset, config.norm_bias)
        )
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False) if config.causal else None
        # BERT's masked-LM head (BertForMaskedLM's `cls.predictions`): dense + activation +
        # LayerNorm, then a vocabulary projection with its own bias, tied to the embeddings.
        self.lm_transform = MaskedLMTransform(config) if config.masked_lm_head else None
        if config.masked_lm_head:
            self.lm_head = nn.Linear(d, config.vocab_size, bias=True)
        self.apply(self._init_weights)
        self.tie_weights()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases; norms start at identity.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        if self.lm_head is not None and self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        compute_logits: bool = True,
        inputs_embeds: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run the model on `input_ids` (batch, seq).

        attention_mask: (batch, past + seq), 1 for real tokens and 0 for padding, covering the
            cached positions too. Positions are counted from the first real token of each row,
            so a left-padded row gets the same logits as the same row alone.
        cache: keys/values of earlier positions; the new ones are appended to it.
        logits_to_keep: 0 for logits at every position, n for only the last n (generation
            needs one, and the vocabulary projection is the largest matmul of a decode step).
        compute_logits: False skips the LM head and returns `logits=None`, for a loss that
            applies the head itself chunk by chunk (`train.losses.fused_linear_cross_entropy`).
        inputs_embeds: (batch, seq, hidden) token embeddings used instead of looking up
            `input_ids` (pass `input_ids=None`): prompt tuning's virtual tokens live there.
        document_ids: (batch, seq) for packed rows, several examples laid end to end: a token
            attends only to earlier tokens of its own document, and unless `position_ids` are
            given, positions restart at 0 where the id changes. Each example then gets the
            logits it would get alone.
        """
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        batch, seq = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (batch, past + seq):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + new) = "
                f"({batch}, {past + seq})"
            )
        if document_ids is not None:
            _check_packed(document_ids, (batch, seq), cache, attention_mask)
        if position_ids is None:
            if document_ids is not None:
                position_ids = document_positions(document_ids)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + seq, device=device).expand(batch, seq)
        if config.position in ("learned", "sinusoidal") and int(position_ids.max()) >= config.max_position_embeddings:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond this model's {config.max_position_embeddings} "
                f"{config.position} positions; shorten the input"
            )

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if config.embedding_multiplier != 1.0:
            x = x * torch.tensor(config.embedding_multiplier, dtype=x.dtype)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        if config.position == "sinusoidal":
            x = x + self.sinusoidal_table[position_ids].to(x.dtype)
        if self.embed_types is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(position_ids)
            x = x + self.embed_types(types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.training and self.embed_dropout:
            x = F.dropout(x, self.embed_dropout, training=True)
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None

        masks = self._masks(attention_mask, position_ids, past, seq, device, document_ids, banded=cache is None)
        router_logits: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            mask, is_causal = masks[config.window_of_layer(i)]
            x = block(x, rope, mask, is_causal, cache, router_logits)
        if cache is not None:
            cache.advance(seq)

        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = None
        if self.lm_head is not None and compute_logits:
            head_input = x[:, -logits_to_keep:] if logits_to_keep else x
            if self.lm_transform is not None:
                head_input = self.lm_transform(head_input)
            logits = self.lm_head(head_input)
        return ModelOutput(logits=logits, hidden_states=x, router_logits=router_logits)

    def _masks(
        self, attention_mask, position_ids, past: int, seq: int, device, document_ids=None, banded=False
    ) -> dict:
        """The (mask, is_causal) pair for each distinct window in the model.

        The common cases need no mask tensor at all: an unpadded prompt is plain causal
        attention, and one new token after an unpadded past may see every key. With padding,
        key positions are counted along the mask, as `position_ids` are for the queries.
        Packed rows (`document_ids`) always get a block-diagonal mask.
        """
        config = self.config
        padded = document_ids is not None or (attention_mask is not None and not bool(attention_mask.all()))
        if document_ids is not None:  # keys are the queries: no cache, no padding (checked)
            key_valid, key_positions = None, position_ids
        elif padded:
            key_valid = attention_mask
            key_positions = attention_mask.long().cumsum(-1) - 1
        else:
            key_valid, key_positions = None, torch.arange(past + seq, device=device)[None]
        masks = {}
        alibi = config.position == "alibi"
        if config.attention_pattern is not None:  # no sliding window then (config checks)
            masks[None] = self._sparse_mask(position_ids, key_positions, key_valid, padded, document_ids, banded)
            return masks
        for window in {config.window_of_layer(i) for i in range(config.num_layers)}:
            window_matters = window is not None and past + seq > window
            if not padded and not window_matters and not alibi:
                if not config.causal or seq == 1:
                    masks[window] = (None, False)
                    continue
                if past == 0:
                    masks[window] = (None, True)
                    continue
            allowed = build_attention_mask(position_ids, key_positions, key_valid, config.causal, window)
            if document_ids is not None:
                allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
            # An additive float mask, made once per forward: SDPA would convert a boolean one
            # again in every layer.
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=device).masked_fill_(~allowed, float("-inf"))
            if alibi:
                # ALiBi: one bias per head on top of the mask (batch, heads, queries, keys).
                bias = bias + alibi_bias(alibi_slopes(config.num_heads), position_ids, key_positions).to(self.dtype)
            masks[window] = (bias, False)
        return masks

    # --------------------------------------------------------- sparse patterns (sparse_attention.py)
    def _sparse_mask(self, position_ids, key_positions, key_valid, padded: bool, document_ids, banded: bool):
        """The (mask, is_causal) pair of `config.attention_pattern`: the banded kernel's plan for
        a whole unpadded sequence without a cache (it has no dropout), else the pattern's mask."""
        config = self.config
        plan = banded_plan(config.attention_pattern, config.causal)
        if plan is not None and banded and not padded and not (self.training and config.dropout):
            # The kernel counts positions from 0 along the row (global tokens are the first ones).
            if bool((position_ids == torch.arange(position_ids.shape[-1], device=position_ids.device)).all()):
                return plan, False
        allowed = build_attention_mask(position_ids, key_positions, key_valid, config.causal, None)
        allowed = allowed & pattern_mask(config.attention_pattern, position_ids, key_positions, config.causal)[:, None]
        if document_ids is not None:
            allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
        if key_valid is not None:  # as build_attention_mask: a padding query sees everything
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        return bias.masked_fill_(~allowed, float("-inf")), False


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the document id changes along a packed row."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=-1).values


def _check_packed(document_ids: torch.Tensor, shape: tuple[int, int], cache, attention_mask) -> None:
    if tuple(document_ids.shape) != shape:
        raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}; expected (batch, seq) = {shape}")
    if cache is not None or attention_mask is not None:
        raise ValueError(
            "document_ids marks the examples of packed training rows; it takes no cache and no attention_mask "
            "(give the padding at a row's end a document id of its own)"
        )
