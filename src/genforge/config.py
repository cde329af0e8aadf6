"""Architecture as data.

Every model family genforge runs is one `Config`: GPT-2, Llama 2/3, Mistral, Qwen2, Qwen3,
Gemma, Phi-3, Mixtral, BERT and BLOOM differ in the fields below (norm kind, activation, position
scheme, bias flags, key/value heads, window, experts), never in classes. A new family is a
`from_hf` reader here plus a weight map in `checkpoint.py`. The encoder-decoder families (T5,
BART, Marian; `seq2seq.py`) are configs too: `encoder_decoder` plus the fields of their block.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration genforge cannot build a model from; the message says what is accepted."""


NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "quick_gelu")  # quick_gelu: CLIP's x * sigmoid(1.702 x)
# "sinusoidal": the fixed table of Vaswani et al. 2017 (`model.sinusoidal_positions`);
# "relative": T5's bucketed relative position bias, encoder-decoder models only.
POSITIONS = ("rope", "learned", "sinusoidal", "relative")
POSITIONS += ("alibi",)  # linear biases on attention scores (Press et al. 2022): BLOOM
ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "llama3", "yarn")
# Scalings whose `factor` is required (>= 1). "ntk" (static NTK-aware) is genforge's own
# name: Hugging Face has no such rope_type, so export writes it as the larger rope_theta it is.
_FACTOR_ROPE_TYPES = ("linear", "ntk", "dynamic")
ROUTERS = ("topk", "switch")  # mixture-of-experts routing: Mixtral's top-k, Switch's top-1 with capacity


@dataclass
class Config:
    """All the hyper-parameters of a transformer, decoder or encoder.

    Field names are genforge's own; `from_hf` maps a Hugging Face `config.json` onto them.
    """

    family: str  # the Hugging Face `model_type` this config reads and writes
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None  # None: as many as query heads (MHA); 1: MQA; else GQA
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    # The longest sequence (prompt + generation) genforge runs this model on; None: see
    # `max_context`. Past max_position_embeddings only under dynamic RoPE scaling.
    context_limit: int | None = None

    # Block layout.
    causal: bool = True  # False: bidirectional encoder (BERT)
    post_norm: bool = False  # True: original Transformer / BERT order, norm after the residual add
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0  # Gemma stores RMSNorm weights as (w - 1)
    norm_bias: bool = True  # False: LayerNorm without a bias (MPT)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys before RoPE
    activation: str = "silu"
    gated_mlp: bool = True  # SwiGLU/GeGLU (Shazeer 2020) versus a plain two-layer MLP

    # Bias flags.
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False

    # Positions.
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": ..., factor, ...}
    partial_rotary_factor: float = 1.0
    type_vocab_size: int = 0  # BERT's segment embeddings

    # Attention extent.
    sliding_window: int | None = None
    # Per layer: "full" or "sliding". None: every layer "sliding" when a window is set.
    layer_types: tuple[str, ...] | None = None

    # Mixture of experts (Mixtral). 0 experts: dense MLP.
    num_experts: int = 0
    num_experts_per_token: int = 2
    # Switch routing (Fedus et al. 2022): router="switch" sends each token to one expert
    # (num_experts_per_token=1), at most `expert_capacity` tokens per expert and sequence, or
    # ceil(expert_capacity_factor x seq / num_experts); neither: no limit. Tokens over capacity
    # are dropped (the residual carries them). Jitter multiplies the router input by
    # U(1 - noise, 1 + noise) in training; the z-loss (ST-MoE) is added with its coefficient.
    router: str = "topk"
    expert_capacity: int | None = None
    expert_capacity_factor: float | None = None
    router_jitter_noise: float = 0.0
    router_z_loss_coef: float = 0.0

    # Embeddings and head.
    tie_word_embeddings: bool = False
    embedding_multiplier: float = 1.0  # Gemma scales embeddings by sqrt(hidden_size)
    embedding_norm: bool = False  # BERT normalises the summed embeddings
    masked_lm_head: bool = False  # encoder with BertForMaskedLM's prediction head (cls.predictions)

    # Encoder-decoder models (seq2seq.py: T5, BART, Marian). `num_layers` counts encoder
    # layers there; `causal` stays True, for the decoder.
    encoder_decoder: bool = False
    num_decoder_layers: int | None = None  # None: as many as encoder layers
    relative_attention_num_buckets: int = 32  # T5's relative position buckets
    relative_attention_max_distance: int = 128  # distances past this share the last bucket
    position_offset: int = 0  # BART's learned table starts at row 2 for position 0
    attention_scale: float | None = None  # None: 1 / sqrt(head_dim); T5 scales by 1
    output_multiplier: float = 1.0  # T5 v1.0 scales the decoder output by hidden_size ** -0.5
    final_logits_bias: bool = False  # BART and Marian add a (vocab,) bias to the logits
    decoder_start_token_id: int | None = None  # the first decoder input

    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    # Sparse attention (sparse_attention.py): None for dense attention, else a pattern dict
    # such as {"kind": "longformer", "window": 128, "global_tokens": 4}. genforge's own key in
    # config.json ("attention_pattern"); transformers ignores it.
    attention_pattern: dict[str, Any] | None = None

    # The config.json this was read from, kept so export writes back what it did not model.
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} "
                "(grouped-query attention shares each key/value head among a whole group)"
            )
        for name, value, accepted in (
            ("norm", self.norm, NORMS),
            ("activation", self.activation, ACTIVATIONS),
            ("position", self.position, POSITIONS),
        ):
            if value not in accepted:
                raise ConfigError(f"{name}={value!r} is not supported; accepted: {', '.join(accepted)}")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type {rope_type!r} is not supported; accepted: {', '.join(ROPE_TYPES)}")
        if rope_type in _FACTOR_ROPE_TYPES:
            factor = self.rope_scaling.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
                raise ConfigError(f"rope_type {rope_type!r} needs a numeric factor >= 1, got {factor!r}")
        self._check_context_limit()
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - {"full", "sliding"}:
                raise ConfigError(
                    f"layer_types must list 'full' or 'sliding' for each of the {self.num_layers} layers, "
                    f"got {self.layer_types}"
                )
        self._check_encoder_decoder()
        if self.masked_lm_head and self.causal:
            raise ConfigError("masked_lm_head is the head of a bidirectional encoder; a causal model has an LM head")
        if self.attention_pattern is not None:
            self._check_attention_pattern()
        if self.num_experts and not 0 < self.num_experts_per_token <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_token must be in 1..{self.num_experts}, got {self.num_experts_per_token}"
            )

        self._check_switch()

    def _check_switch(self) -> None:
        if self.router not in ROUTERS:
            raise ConfigError(f"router={self.router!r} is not supported; accepted: {', '.join(ROUTERS)}")
        if self.router != "switch":
            return
        if not self.num_experts or self.num_experts_per_token != 1:
            raise ConfigError(
                "router='switch' routes each token to one expert: it needs num_experts > 0 and "
                f"num_experts_per_token=1, got {self.num_experts} and {self.num_experts_per_token}"
            )
        if self.expert_capacity is not None and self.expert_capacity_factor is not None:
            raise ConfigError("give expert_capacity (tokens) or expert_capacity_factor, not both")
        capacity = self.expert_capacity
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ConfigError(f"expert_capacity must be a positive number of tokens, got {capacity!r}")
        factor = self.expert_capacity_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
            raise ConfigError(f"expert_capacity_factor must be a number > 0, got {factor!r}")
        if not 0 <= self.router_jitter_noise < 1:
            raise ConfigError(f"router_jitter_noise must be in [0, 1), got {self.router_jitter_noise!r}")
        if self.router_z_loss_coef < 0:
            raise ConfigError(f"router_z_loss_coef must be >= 0, got {self.router_z_loss_coef!r}")

    def _check_encoder_decoder(self) -> None:
        if not self.encoder_decoder:
            if self.position == "relative":
                raise ConfigError(
                    "position='relative' (T5's bucketed bias) is built for encoder-decoder models only; "
                    "a decoder-only model accepts rope, learned or sinusoidal"
                )
            return
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if not self.causal:
            raise ConfigError("an encoder-decoder config keeps causal=True: its decoder is causal")
        if self.position == "rope" or self.num_experts or self.sliding_window is not None or self.masked_lm_head:
            raise ConfigError(
                "encoder-decoder models take relative, learned or sinusoidal positions and a dense MLP, "
                "without a sliding window or masked-LM head"
            )

    @property
    def decoder_stack(self) -> Config:
        """An encoder-decoder config as its decoder stack alone (`num_layers` = decoder layers):
        what the decoder's self-attention KV cache is sized from."""
        if not self.encoder_decoder:
            return self
        return dataclasses.replace(self, num_layers=self.num_decoder_layers, hf_extra=self.hf_extra)

    def _check_attention_pattern(self) -> None:
        # Imported here: sparse_attention needs torch, which reading a config.json does not.
        from .sparse_attention import PatternError, check_pattern

        if self.position == "alibi" or self.encoder_decoder:
            raise ConfigError(
                "attention_pattern runs on decoder-only and encoder models without ALiBi (the banded kernel and the "
                f"pattern masks carry no position bias); this config has position={self.position!r}"
                + (" and is an encoder-decoder" if self.encoder_decoder else "")
            )
        if self.sliding_window is not None:
            raise ConfigError(
                "attention_pattern and sliding_window both restrict attention; use the pattern "
                '{"kind": "local", "window": W} instead of sliding_window'
            )
        try:
            self.attention_pattern = check_pattern(self.attention_pattern)
        except PatternError as err:
            raise ConfigError(str(err)) from None

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def max_context(self) -> int:
        """Tokens (prompt plus generation) a sequence may reach: `context_limit` when set, else
        the trained context `max_position_embeddings`, or `factor` times it under dynamic RoPE
        scaling, whose frequencies adapt to the length (as transformers lets it run past the
        trained context; `factor` x is the extended context the scaling is usually quoted at)."""
        if self.context_limit is not None:
            return self.context_limit
        if self.rope_type == "dynamic":
            return int(self.max_position_embeddings * self.rope_scaling["factor"])
        return self.max_position_embeddings

    def with_context_limit(self, tokens: int | None) -> Config:
        """This config with `context_limit=tokens` (checked: ConfigError past what the model
        can run)."""
        return dataclasses.replace(self, context_limit=tokens)

    def _check_context_limit(self) -> None:
        limit = self.context_limit
        if limit is None:
            return
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"context_limit must be a positive number of tokens (None: the model's), got {limit!r}")
        # ALiBi has no trained position table; it is made to run past its training length.
        if limit > self.max_position_embeddings and self.rope_type != "dynamic" and self.position != "alibi":
            raise ConfigError(
                f"context_limit {limit} is past this model's trained context of {self.max_position_embeddings} "
                f"tokens; only a model with dynamic RoPE scaling (rope_type 'dynamic', not {self.rope_type!r}) "
                "runs past it"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def window_of_layer(self, layer: int) -> int | None:
        """The sliding-window size layer `layer` attends over, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] == "full":
            return None
        return self.sliding_window

    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (embeddings counted once when tied)."""
        d, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = d * (q + 2 * kv) + q * d
        mlp_one = d * self.intermediate_size * (3 if self.gated_mlp else 2)
        mlp = mlp_one * self.num_experts + d * self.num_experts if self.num_experts else mlp_one
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings or not self.causal else 2)
        if self.position == "learned":
            embed += (self.max_position_embeddings + self.position_offset) * d * (2 if self.encoder_decoder else 1)
        if self.position == "relative":  # a (bucket, head) table per stack
            embed += 2 * self.relative_attention_num_buckets * self.num_heads
        if self.encoder_decoder:  # decoder layers add a cross-attention (q, k, v, o) and its norm
            cross = d * q + 2 * d * kv + q * d + d
            return self.num_layers * per_layer + self.num_decoder_layers * (per_layer + cross) + embed + 2 * d
        return self.num_layers * per_layer + embed + d

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("hf_extra")
        return data

    # ----------------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Config:
        """Read a Hugging Face `config.json` dict."""
        model_type = hf.get("model_type")
        reader = _HF_READERS.get(model_type)
        if reader is None:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(_HF_READERS))}"
            )
        fields = reader(hf)
        common = dict(
            family=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            attention_pattern=hf.get("attention_pattern"),
            hf_extra=dict(hf),
        )
        return cls(**common, **fields)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        return cls.from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict transformers builds this architecture from."""
        writer = _HF_WRITERS.get(self.family)
        if writer is None:
            raise ConfigError(f"no Hugging Face export for family {self.family!r}")
        if self.position == "sinusoidal" and not self.encoder_decoder:
            raise ConfigError(
                f"a decoder-only {self.family} model with sinusoidal positions has no Hugging Face counterpart "
                "to export to (transformers' decoder-only families use RoPE or learned positions)"
            )
        if self.router != "topk":
            raise ConfigError(
                f"router={self.router!r} has no transformers decoder-only architecture to export to (a {self.family} "
                "config would load with top-k routing and give other logits); keep the training checkpoint instead"
            )
        out = dict(self.hf_extra)
        out.update(writer(self))
        out.update(
            model_type=self.family,
            vocab_size=self.vocab_size,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        # Keys of older transformers releases that the fields above now express; keeping
        # them could contradict what the writer wrote. A quantization_config describes the
        # weights a checkpoint was read from, not this architecture: whoever writes quantized
        # weights adds its own (quantize.saved).
        if self.attention_pattern is not None:
            out["attention_pattern"] = dict(self.attention_pattern)
        else:
            out.pop("attention_pattern", None)
        for stale in ("transformers_version", "rope_theta", "rope_scaling", "torch_dtype", "quantization_config"):
            out.pop(stale, None)
        return out


# ---------------------------------------------------------------------------- family readers
def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 nests theta and scaling in `rope_parameters`; older files use
    # `rope_theta` plus an optional `rope_scaling` dict with `type` or `rope_type`.
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    params = {**legacy, **params}
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if params["rope_type"] in ("llama3", "yarn") and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = hf.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings")
        )
    scaling = None if params["rope_type"] == "default" else params
    return dict(rope_theta=float(theta), rope_scaling=scaling, partial_rotary_factor=float(partial))


def _llama_like(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or None,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=_activation(hf.get("hidden_act", "silu")),
        qkv_bias=hf.get("attention_bias", False),
        attn_out_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=hf.get("sliding_window"),
        **_rope_fields(hf),
    )


def _read_llama(hf):
    return _llama_like(hf)


def _read_mistral(hf):
    return _llama_like(hf)


def _qwen_window(hf: dict[str, Any]) -> dict[str, Any]:
    # Qwen checkpoints carry a sliding_window value even when `use_sliding_window` is off.
    if not hf.get("use_sliding_window", False):
        return dict(sliding_window=None)
    types = hf.get("layer_types")
    if types is None:  # older files: the first max_window_layers layers attend fully
        cut = hf.get("max_window_layers", hf["num_hidden_layers"])
        types = ["full_attention" if i < cut else "sliding_attention" for i in range(hf["num_hidden_layers"])]
    layer_types = tuple("sliding" if t == "sliding_attention" else "full" for t in types)
    return dict(sliding_window=hf["sliding_window"], layer_types=layer_types)


def _read_qwen2(hf):
    # Qwen2 has biases on the q/k/v projections only.
    return {**_llama_like(hf), "qkv_bias": True, "attn_out_bias": False, **_qwen_window(hf)}


def _read_qwen3(hf):
    return {**_llama_like(hf), "qk_norm": True, **_qwen_window(hf)}


def _read_gemma(hf):
    fields = _llama_like(hf)
    fields.update(
        norm_weight_offset=1.0,
        embedding_multiplier=math.sqrt(hf["hidden_size"]),
        activation=_activation(hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )
    return fields


def _read_phi3(hf):
    fields = _llama_like(hf)
    fields.update(qkv_bias=False, attn_out_bias=False, mlp_bias=False)
    return fields


def _read_mixtral(hf):
    fields = _llama_like(hf)
    fields.update(num_experts=hf["num_local_experts"], num_experts_per_token=hf.get("num_experts_per_tok", 2))
    return fields


def _read_gpt2(hf):
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ConfigError(
            "GPT-2 variants with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported"
        )
    d = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * d,
        max_position_embeddings=hf.get("n_positions", 1024),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_activation(hf.get("activation_function", "gelu_new")),
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        position="learned",
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def _read_bert(hf):
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError("BERT with relative position embeddings is not supported; accepted: absolute")
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        causal=False,
        post_norm=True,
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=_activation(hf.get("hidden_act", "gelu")),
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        position="learned",
        type_vocab_size=hf.get("type_vocab_size", 2),
        embedding_norm=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        # BertModel checkpoints (sentence encoders) have no head; BertForMaskedLM ones do.
        masked_lm_head="BertForMaskedLM" in (hf.get("architectures") or ()),
    )


def _activation(name: str) -> str:
    table = {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "relu": "relu",
        "quick_gelu": "quick_gelu",
    }
    if name not in table:
        raise ConfigError(f"activation {name!r} is not supported; accepted: {', '.join(sorted(table))}")
    return table[name]


# ------------------------------------------------------------------------------------ BLOOM
def _read_bloom(hf):
    # BLOOM (BigScience 2022): ALiBi, LayerNorm on the embeddings, plain GELU(tanh) MLP with
    # 4x width, biases everywhere, head tied to the embeddings.
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ConfigError(
            "BLOOM with apply_residual_connection_post_layernorm=true is not supported; accepted: false "
            "(the residual is the block input, as in every released BLOOM checkpoint)"
        )
    d = hf.get("hidden_size") or hf["n_embed"]
    heads = hf.get("n_head") or hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        num_layers=hf.get("n_layer") or hf["num_hidden_layers"],
        num_heads=heads,
        intermediate_size=4 * d,
        # ALiBi has no trained table: this is only the context genforge lets a sequence reach.
        max_position_embeddings=hf.get("seq_length") or 2048,
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation="gelu_tanh",
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        position="alibi",
        embedding_norm=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def _write_bloom(cfg: Config) -> dict[str, Any]:
    if cfg.intermediate_size != 4 * cfg.hidden_size or cfg.num_kv_heads != cfg.num_heads:
        raise ConfigError(
            "a BLOOM export needs intermediate_size = 4 x hidden_size and as many key/value heads as query heads; "
            f"got {cfg.intermediate_size} and {cfg.num_kv_heads} of {cfg.num_heads}"
        )
    return dict(
        hidden_size=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        layer_norm_epsilon=cfg.norm_eps,
        seq_length=cfg.max_position_embeddings,
        apply_residual_connection_post_layernorm=False,
        slow_but_exact=False,
        pretraining_tp=1,
    )


# -------------------------------------------------------------------------------------- MPT
# MPT attention options genforge does not model, and the value it accepts for each.
_MPT_ATTENTION_DEFAULTS = {
    "alibi": True,
    "clip_qkv": None,
    "softmax_scale": None,
    "qk_ln": False,
    "prefix_lm": False,
    "attn_uses_sequence_id": False,
}


def _read_mpt(hf):
    # MPT (MosaicML 2023) as transformers' MptForCausalLM runs it: ALiBi with the default
    # maximum bias 8 (the same slopes as BLOOM's), LayerNorm without biases, no linear
    # biases, exact-GELU MLP of expansion_ratio x width, fused Wqkv in q, k, v order, tied head.
    attention = dict(hf.get("attn_config") or {})
    for key, accepted in _MPT_ATTENTION_DEFAULTS.items():
        if attention.get(key, accepted) != accepted:
            raise ConfigError(f"MPT with attn_config.{key}={attention[key]!r} is not supported; accepted: {accepted!r}")
    if attention.get("alibi_bias_max", 8) != 8:
        raise ConfigError(f"MPT with alibi_bias_max={attention['alibi_bias_max']!r} is not supported; accepted: 8")
    # transformers' MptMLP is 4 x wide whatever the config says, so 4 is what loads there.
    for key, accepted in (("logit_scale", None), ("embedding_fraction", 1.0), ("expansion_ratio", 4)):
        if hf.get(key, accepted) != accepted:
            raise ConfigError(f"MPT with {key}={hf[key]!r} is not supported; accepted: {accepted!r}")
    d = hf["d_model"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        num_layers=hf["n_layers"],
        num_heads=hf["n_heads"],
        intermediate_size=4 * d,
        max_position_embeddings=hf.get("max_seq_len", 2048),
        norm="layernorm",
        norm_bias=False,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation="gelu",
        gated_mlp=False,
        position="alibi",
        tie_word_embeddings=True,
    )


def _write_mpt(cfg: Config) -> dict[str, Any]:
    if cfg.intermediate_size != 4 * cfg.hidden_size or cfg.num_kv_heads != cfg.num_heads or not cfg.tie_word_embeddings:
        raise ConfigError(
            "an MPT export needs intermediate_size = 4 x hidden_size, as many key/value heads as query "
            f"heads and a tied head; got {cfg.intermediate_size}, {cfg.num_kv_heads} of {cfg.num_heads}, "
            f"tie_word_embeddings={cfg.tie_word_embeddings}"
        )
    attention = dict(cfg.hf_extra.get("attn_config") or {}) | _MPT_ATTENTION_DEFAULTS | {"alibi_bias_max": 8}
    return dict(
        d_model=cfg.hidden_size,
        n_heads=cfg.num_heads,
        n_layers=cfg.num_layers,
        expansion_ratio=4,
        max_seq_len=cfg.max_position_embeddings,
        layer_norm_epsilon=cfg.norm_eps,
        no_bias=True,
        attn_config=attention,
    )


_HF_READERS = {
    "llama": _read_llama,
    "mistral": _read_mistral,
    "qwen2": _read_qwen2,
    "qwen3": _read_qwen3,
    "gemma": _read_gemma,
    "phi3": _read_phi3,
    "mixtral": _read_mixtral,
    "gpt2": _read_gpt2,
    "bert": _read_bert,
}
_HF_READERS |= {"bloom": _read_bloom, "mpt": _read_mpt}


# ---------------------------------------------------------------------------- family writers
_HF_ACTIVATION = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
    "quick_gelu": "quick_gelu",
}
_CAUSAL_LM_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
}
_CAUSAL_LM_CLASS |= {"bloom": "BloomForCausalLM", "mpt": "MptForCausalLM"}


def _write_rope(cfg: Config) -> dict[str, Any]:
    if cfg.rope_type == "ntk":
        # Static NTK-aware scaling is plain RoPE with a larger base; written so, transformers
        # computes the same frequencies (model.rope_frequencies).
        dim = cfg.rotary_dim
        theta = cfg.rope_theta * cfg.rope_scaling["factor"] ** (dim / (dim - 2))
        return _write_rope(dataclasses.replace(cfg, rope_theta=theta, rope_scaling=None, hf_extra={}))
    params = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    if cfg.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = cfg.partial_rotary_factor
    return {"rope_parameters": params}


def _write_llama_like(cfg: Config) -> dict[str, Any]:
    out = dict(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        hidden_act=_HF_ACTIVATION[cfg.activation],
        **_write_rope(cfg),
    )
    if cfg.family in ("llama", "gemma", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.family in ("mistral", "mixtral", "phi3"):
        out["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = cfg.sliding_window is not None
        out["sliding_window"] = cfg.sliding_window
        types = cfg.layer_types or ("sliding" if cfg.sliding_window else "full",) * cfg.num_layers
        out["layer_types"] = ["sliding_attention" if t == "sliding" else "full_attention" for t in types]
    if cfg.family == "gemma":
        out["hidden_activation"] = out["hidden_act"]
    if cfg.family == "mixtral":
        out["num_local_experts"] = cfg.num_experts
        out["num_experts_per_tok"] = cfg.num_experts_per_token
    return out


def _write_gpt2(cfg: Config) -> dict[str, Any]:
    return dict(
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        n_positions=cfg.max_position_embeddings,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function="gelu_new" if cfg.activation == "gelu_tanh" else cfg.activation,
    )


def _write_bert(cfg: Config) -> dict[str, Any]:
    return dict(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.norm_eps,
        hidden_act="gelu_new" if cfg.activation == "gelu_tanh" else cfg.activation,
        type_vocab_size=cfg.type_vocab_size,
        position_embedding_type="absolute",
    )


def _with_architecture(writer):
    def write(cfg: Config) -> dict[str, Any]:
        architecture = _CAUSAL_LM_CLASS[cfg.family]
        if cfg.family == "bert" and not cfg.masked_lm_head:
            architecture = "BertModel"  # a headless encoder: no cls.predictions weights to load
        return {**writer(cfg), "architectures": [architecture]}

    return write


_HF_WRITERS = {
    family: _with_architecture(
        _write_gpt2 if family == "gpt2" else _write_bert if family == "bert" else _write_llama_like
    )
    for family in _HF_READERS
}


# ------------------------------------------------ encoder-decoder families (seq2seq.py)
# Kept in one block, after the decoder-only tables, so that other families' additions to the
# tables above merge without touching it.
def _read_t5(hf):
    """T5 v1.0 (ReLU MLP, head tied and fed d_model ** -0.5 times the decoder output) and T5
    v1.1 / Flan-T5 (gated-GELU MLP, untied head, no rescale); RMS norm without a mean, no
    biases, no attention scaling, relative position buckets."""
    projection = hf.get("feed_forward_proj", "relu")
    gated = projection.startswith("gated-")
    activation = "gelu_new" if projection == "gated-gelu" else projection.split("-")[-1]
    d = hf["d_model"]
    # transformers 5 writes `scale_decoder_outputs`; older files say it as tie_word_embeddings.
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"],
        head_dim=hf["d_kv"],
        intermediate_size=hf["d_ff"],
        # Relative positions have no table to run out of; this bounds generation's default length.
        max_position_embeddings=hf.get("n_positions") or 512,
        norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        activation=_activation(activation),
        gated_mlp=gated,
        position="relative",
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        attention_scale=1.0,
        output_multiplier=d**-0.5 if scale else 1.0,
        tie_word_embeddings=hf.get("tie_word_embeddings", True) is not False,
        encoder_decoder=True,
        # T5 starts its decoder from the pad token when config.json does not say.
        decoder_start_token_id=(
            hf["decoder_start_token_id"] if hf.get("decoder_start_token_id") is not None else hf.get("pad_token_id")
        ),
    )


def _bart_like(hf: dict[str, Any]) -> dict[str, Any]:
    """The fields BART and Marian share: post-norm layers with biases, one head count and MLP
    width for encoder and decoder, embeddings scaled by sqrt(d_model) under scale_embedding,
    a final logits bias."""
    for encoder_key, decoder_key in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if hf.get(encoder_key) != hf.get(decoder_key):
            raise ConfigError(
                f"{hf.get('model_type')} with {encoder_key}={hf.get(encoder_key)} but {decoder_key}={hf.get(decoder_key)} "
                "is not supported; genforge builds encoder and decoder layers of one shape"
            )
    d = hf["d_model"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        num_layers=hf["encoder_layers"],
        num_decoder_layers=hf["decoder_layers"],
        num_heads=hf["encoder_attention_heads"],
        intermediate_size=hf["encoder_ffn_dim"],
        max_position_embeddings=hf.get("max_position_embeddings", 1024),
        post_norm=True,
        norm="layernorm",
        norm_eps=1e-5,  # torch's LayerNorm default, which both use
        activation=_activation(hf.get("activation_function", "gelu")),
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        embedding_multiplier=math.sqrt(d) if hf.get("scale_embedding", False) else 1.0,
        final_logits_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        encoder_decoder=True,
        decoder_start_token_id=hf.get("decoder_start_token_id"),
    )


def _read_bart(hf):
    # Learned positions from a table whose first two rows are unused (offset 2), and a
    # LayerNorm on the summed embeddings of each stack (layernorm_embedding).
    return {**_bart_like(hf), "position": "learned", "position_offset": 2, "embedding_norm": True}


def _read_marian(hf):
    vocab, decoder_vocab = hf["vocab_size"], hf.get("decoder_vocab_size") or hf["vocab_size"]
    if decoder_vocab != vocab or hf.get("share_encoder_decoder_embeddings", True) is False:
        raise ConfigError(
            "Marian models with separate source and target vocabularies (share_encoder_decoder_embeddings "
            "false, or decoder_vocab_size != vocab_size) are not supported; genforge shares one embedding"
        )
    return {**_bart_like(hf), "position": "sinusoidal"}


def _write_seq2seq_common(cfg: Config) -> dict[str, Any]:
    return dict(is_encoder_decoder=True, decoder_start_token_id=cfg.decoder_start_token_id)


def _write_t5(cfg: Config) -> dict[str, Any]:
    activation = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu", "gelu": "gelu"}[cfg.activation]
    if cfg.gated_mlp and cfg.activation == "gelu":
        raise ConfigError(
            "a gated T5 MLP with exact GELU has no feed_forward_proj; transformers' gated-gelu is tanh GELU"
        )
    return dict(
        _write_seq2seq_common(cfg),
        d_model=cfg.hidden_size,
        d_kv=cfg.head_dim,
        d_ff=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj=f"gated-{activation}" if cfg.gated_mlp else activation,
        scale_decoder_outputs=cfg.output_multiplier != 1.0,
        architectures=["T5ForConditionalGeneration"],
    )


def _write_bart_like(cfg: Config) -> dict[str, Any]:
    return dict(
        _write_seq2seq_common(cfg),
        d_model=cfg.hidden_size,
        encoder_layers=cfg.num_layers,
        decoder_layers=cfg.num_decoder_layers,
        encoder_attention_heads=cfg.num_heads,
        decoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.intermediate_size,
        decoder_ffn_dim=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        activation_function={"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
        scale_embedding=cfg.embedding_multiplier != 1.0,
    )


def _write_bart(cfg: Config) -> dict[str, Any]:
    return dict(_write_bart_like(cfg), architectures=["BartForConditionalGeneration"])


def _write_marian(cfg: Config) -> dict[str, Any]:
    return dict(
        _write_bart_like(cfg),
        decoder_vocab_size=cfg.vocab_size,
        share_encoder_decoder_embeddings=True,
        architectures=["MarianMTModel"],
    )


_HF_READERS.update(t5=_read_t5, bart=_read_bart, marian=_read_marian)
_HF_WRITERS.update(t5=_write_t5, bart=_write_bart, marian=_write_marian)
_HF_WRITERS |= {"bloom": _with_architecture(_write_bloom), "mpt": _with_architecture(_write_mpt)}
SUPPORTED_FAMILIES = tuple(sorted(_HF_READERS))  # every family above, decoder-only and encoder-decoder
