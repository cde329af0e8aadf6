"""Architecture as data.

Every model family genforge runs is one `Config`: GPT-2, Llama 2/3, Mistral, Qwen2, Qwen3,
Gemma, Phi-3, Mixtral and BERT differ in the fields below (norm kind, activation, position
scheme, bias flags, key/value heads, window, experts), never in classes. A new family is a
`from_hf` reader here plus a weight map in `checkpoint.py`.
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
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
POSITIONS = ("rope", "learned")
ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "llama3", "yarn")
# Scalings whose `factor` is required (>= 1). "ntk" (static NTK-aware) is genforge's own
# name: Hugging Face has no such rope_type, so export writes it as the larger rope_theta it is.
_FACTOR_ROPE_TYPES = ("linear", "ntk", "dynamic")


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

    # Embeddings and head.
    tie_word_embeddings: bool = False
    embedding_multiplier: float = 1.0  # Gemma scales embeddings by sqrt(hidden_size)
    embedding_norm: bool = False  # BERT normalises the summed embeddings
    masked_lm_head: bool = False  # encoder with BertForMaskedLM's prediction head (cls.predictions)

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
        if self.masked_lm_head and self.causal:
            raise ConfigError("masked_lm_head is the head of a bidirectional encoder; a causal model has an LM head")
        if self.attention_pattern is not None:
            self._check_attention_pattern()
        if self.num_experts and not 0 < self.num_experts_per_token <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_token must be in 1..{self.num_experts}, got {self.num_experts_per_token}"
            )

    def _check_attention_pattern(self) -> None:
        # Imported here: sparse_attention needs torch, which reading a config.json does not.
        from .sparse_attention import PatternError, check_pattern

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
        if limit > self.max_position_embeddings and self.rope_type != "dynamic":
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
            embed += self.max_position_embeddings * d
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
    }
    if name not in table:
        raise ConfigError(f"activation {name!r} is not supported; accepted: {', '.join(sorted(table))}")
    return table[name]


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

SUPPORTED_FAMILIES = tuple(sorted(_HF_READERS))


# ---------------------------------------------------------------------------- family writers
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
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
