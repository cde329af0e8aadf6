"""Hugging Face checkpoints in and out: weight maps per family, safetensors only.

A weight map is a list of `Rule`s, each naming one genforge parameter and the Hugging Face
tensors it holds. Most rules are renames. genforge computes queries, keys and values in one
product (`qkv`), and a gated MLP's gate and up projections in another (`gate_up`): where a
family stores those as separate tensors (Llama's q_proj, k_proj, v_proj), the rule lists them
as parts concatenated along the output dimension; where it already fuses them (GPT-2's
c_attn, Phi-3's qkv_proj) the rule is a rename. GPT-2 stores linear weights transposed (its
`Conv1D`), and BLOOM interleaves its fused query_key_value per head (a rule's `row_order`).
The same rules drive loading and export, so a round trip is exact by construction.
Encoder-decoder families (T5, BART, Marian) load into `seq2seq.EncoderDecoderTransformer`
through the same rules; their cross-attention keys and values are one fused `kv` product.

Weights are read with `safetensors` only; a directory holding nothing but pickled
`pytorch_model.bin` files is refused, because unpickling can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import staged_directory
from .config import SUPPORTED_FAMILIES, Config, ConfigError
from .model import RotaryEmbedding, Transformer, sinusoidal_positions
from .seq2seq import EncoderDecoderTransformer


class CheckpointError(ValueError):
    """A checkpoint genforge cannot read or write; the message says what was wrong."""


def qkv_sizes(config: Config) -> tuple[int, ...]:
    """Output rows of the query, key and value parts of a fused `qkv` projection."""
    kv = config.num_kv_heads * config.head_dim
    return config.num_heads * config.head_dim, kv, kv


def gate_up_sizes(config: Config) -> tuple[int, ...]:
    """Output rows of the gate and up parts of a fused `gate_up` projection."""
    return config.intermediate_size, config.intermediate_size


@dataclass(frozen=True)
class Rule:
    """genforge parameter `gf` holds the Hugging Face tensors `hf`, concatenated along dim 0
    in that order, `sizes(config)` rows each where there are several; `transpose` for weights
    stored (in, out) like GPT-2's Conv1D. Templates use `{i}` for the layer and `{e}` for the
    expert index."""

    gf: str
    hf: tuple[str, ...]
    sizes: Callable[[Config], tuple[int, ...]] | None = None
    transpose: bool = False
    # Rows stored in another order than genforge's (BLOOM's per-head interleaved q/k/v):
    # genforge's row r is Hugging Face's row `row_order(config)[r]`.
    row_order: Callable[[Config], torch.Tensor] | None = None


def _renames(pairs: dict[str, str]) -> list[Rule]:
    return [Rule(gf, (hf,)) for gf, hf in pairs.items()]


def _with_bias(pairs: dict[str, str]) -> dict[str, str]:
    """Each `.weight` rename together with the `.bias` beside it (used where present)."""
    out = {}
    for gf, hf in pairs.items():
        out[gf + ".weight"] = hf + ".weight"
        out[gf + ".bias"] = hf + ".bias"
    return out


def _joined(gf: str, hf: list[str], sizes: Callable[[Config], tuple[int, ...]]) -> list[Rule]:
    """The weight and bias of the fused projection `gf` from the separate projections `hf`."""
    return [Rule(f"{gf}.{kind}", tuple(f"{h}.{kind}" for h in hf), sizes) for kind in ("weight", "bias")]


_LLAMA_LAYER = "model.layers.{i}"
_LLAMA_ATTENTION = _joined(
    "blocks.{i}.attn.qkv", [f"{_LLAMA_LAYER}.self_attn.{p}_proj" for p in "qkv"], qkv_sizes
) + _renames(
    _with_bias({"blocks.{i}.attn.o": f"{_LLAMA_LAYER}.self_attn.o_proj"})
    | {
        "blocks.{i}.attn.q_norm.weight": f"{_LLAMA_LAYER}.self_attn.q_norm.weight",
        "blocks.{i}.attn.k_norm.weight": f"{_LLAMA_LAYER}.self_attn.k_norm.weight",
    }
)
_LLAMA_FRAME = _renames(
    {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "blocks.{i}.attn_norm.weight": f"{_LLAMA_LAYER}.input_layernorm.weight",
        "blocks.{i}.mlp_norm.weight": f"{_LLAMA_LAYER}.post_attention_layernorm.weight",
        "final_norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
)
_LLAMA_MLP = _joined(
    "blocks.{i}.mlp.gate_up", [f"{_LLAMA_LAYER}.mlp.{p}_proj" for p in ("gate", "up")], gate_up_sizes
) + _renames(_with_bias({"blocks.{i}.mlp.down": f"{_LLAMA_LAYER}.mlp.down_proj"}))
_LLAMA = _LLAMA_FRAME + _LLAMA_ATTENTION + _LLAMA_MLP

_MIXTRAL_EXPERT = f"{_LLAMA_LAYER}.block_sparse_moe.experts.{{e}}"
_MIXTRAL = (
    _LLAMA_FRAME
    + _LLAMA_ATTENTION
    + [
        Rule(
            "blocks.{i}.mlp.experts.{e}.gate_up.weight",
            (f"{_MIXTRAL_EXPERT}.w1.weight", f"{_MIXTRAL_EXPERT}.w3.weight"),
            gate_up_sizes,
        )
    ]
    + _renames(
        {
            "blocks.{i}.mlp.router.weight": f"{_LLAMA_LAYER}.block_sparse_moe.gate.weight",
            "blocks.{i}.mlp.experts.{e}.down.weight": f"{_MIXTRAL_EXPERT}.w2.weight",
        }
    )
)

_PHI3 = _LLAMA_FRAME + _renames(
    {
        "blocks.{i}.attn.qkv.weight": f"{_LLAMA_LAYER}.self_attn.qkv_proj.weight",
        "blocks.{i}.attn.o.weight": f"{_LLAMA_LAYER}.self_attn.o_proj.weight",
        "blocks.{i}.mlp.gate_up.weight": f"{_LLAMA_LAYER}.mlp.gate_up_proj.weight",
        "blocks.{i}.mlp.down.weight": f"{_LLAMA_LAYER}.mlp.down_proj.weight",
    }
)

_GPT2_LAYER = "transformer.h.{i}"
_GPT2 = (
    _renames(
        {
            "embed_tokens.weight": "transformer.wte.weight",
            "embed_positions.weight": "transformer.wpe.weight",
            "lm_head.weight": "lm_head.weight",
        }
        | _with_bias(
            {
                "blocks.{i}.attn_norm": f"{_GPT2_LAYER}.ln_1",
                "blocks.{i}.mlp_norm": f"{_GPT2_LAYER}.ln_2",
                "final_norm": "transformer.ln_f",
            }
        )
    )
    + [
        Rule(f"blocks.{{i}}.{gf}.weight", (f"{_GPT2_LAYER}.{hf}.weight",), transpose=True)
        for gf, hf in (
            ("attn.qkv", "attn.c_attn"),
            ("attn.o", "attn.c_proj"),
            ("mlp.up", "mlp.c_fc"),
            ("mlp.down", "mlp.c_proj"),
        )
    ]
    + _renames(
        {
            "blocks.{i}.attn.qkv.bias": f"{_GPT2_LAYER}.attn.c_attn.bias",
            "blocks.{i}.attn.o.bias": f"{_GPT2_LAYER}.attn.c_proj.bias",
            "blocks.{i}.mlp.up.bias": f"{_GPT2_LAYER}.mlp.c_fc.bias",
            "blocks.{i}.mlp.down.bias": f"{_GPT2_LAYER}.mlp.c_proj.bias",
        }
    )
)

_BERT_LAYER = "bert.encoder.layer.{i}"
_BERT = _joined(
    "blocks.{i}.attn.qkv", [f"{_BERT_LAYER}.attention.self.{p}" for p in ("query", "key", "value")], qkv_sizes
) + _renames(
    {
        "embed_tokens.weight": "bert.embeddings.word_embeddings.weight",
        "embed_positions.weight": "bert.embeddings.position_embeddings.weight",
        "embed_types.weight": "bert.embeddings.token_type_embeddings.weight",
    }
    | _with_bias(
        {
            "embed_norm": "bert.embeddings.LayerNorm",
            "blocks.{i}.attn.o": f"{_BERT_LAYER}.attention.output.dense",
            "blocks.{i}.attn_norm": f"{_BERT_LAYER}.attention.output.LayerNorm",
            "blocks.{i}.mlp.up": f"{_BERT_LAYER}.intermediate.dense",
            "blocks.{i}.mlp.down": f"{_BERT_LAYER}.output.dense",
            "blocks.{i}.mlp_norm": f"{_BERT_LAYER}.output.LayerNorm",
        }
    )
    # BertForMaskedLM's head; its decoder weight is the word embedding matrix when tied.
    | {
        "lm_transform.dense.weight": "cls.predictions.transform.dense.weight",
        "lm_transform.dense.bias": "cls.predictions.transform.dense.bias",
        "lm_transform.norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "lm_transform.norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "lm_head.weight": "cls.predictions.decoder.weight",
        "lm_head.bias": "cls.predictions.bias",
    }
)

_BERT_HEAD_BIAS, _BERT_DECODER_BIAS = "cls.predictions.bias", "cls.predictions.decoder.bias"


# --------------------------------------------------- encoder-decoder weight maps (seq2seq.py)
# Kept in one block so that other families' entries above merge without touching it.
def kv_sizes(config: Config) -> tuple[int, ...]:
    """Output rows of the key and value parts of a cross-attention's fused `kv` projection."""
    kv = config.num_kv_heads * config.head_dim
    return kv, kv


def _t5_stack(stack: str) -> list[Rule]:
    """One T5 stack: layer.0 self-attention, (decoder) layer.1 cross-attention, then the MLP
    layer; the relative position bias lives in the first block only."""
    block = f"{stack}.block.{{i}}.layer"
    mlp = f"{block}.2" if stack == "decoder" else f"{block}.1"
    rules = _joined("blocks.{i}.attn.qkv", [f"{block}.0.SelfAttention.{p}" for p in "qkv"], qkv_sizes)
    rules += _joined(
        "blocks.{i}.mlp.gate_up", [f"{mlp}.DenseReluDense.wi_0", f"{mlp}.DenseReluDense.wi_1"], gate_up_sizes
    )
    renames = {
        "relative_bias.bias.weight": f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "blocks.{i}.attn.o.weight": f"{block}.0.SelfAttention.o.weight",
        "blocks.{i}.attn_norm.weight": f"{block}.0.layer_norm.weight",
        "blocks.{i}.mlp.up.weight": f"{mlp}.DenseReluDense.wi.weight",
        "blocks.{i}.mlp.down.weight": f"{mlp}.DenseReluDense.wo.weight",
        "blocks.{i}.mlp_norm.weight": f"{mlp}.layer_norm.weight",
        "final_norm.weight": f"{stack}.final_layer_norm.weight",
    }
    if stack == "decoder":
        cross = f"{block}.1.EncDecAttention"
        rules += _joined("blocks.{i}.cross_attn.kv", [f"{cross}.k", f"{cross}.v"], kv_sizes)
        renames |= {
            "blocks.{i}.cross_attn.q.weight": f"{cross}.q.weight",
            "blocks.{i}.cross_attn.o.weight": f"{cross}.o.weight",
            "blocks.{i}.cross_norm.weight": f"{block}.1.layer_norm.weight",
        }
    return [Rule(f"{stack}.{rule.gf}", rule.hf, rule.sizes) for rule in rules + _renames(renames)]


_T5 = _renames({"embed_tokens.weight": "shared.weight", "lm_head.weight": "lm_head.weight"})
_T5 += _t5_stack("encoder") + _t5_stack("decoder")


def _bart_stack(stack: str) -> list[Rule]:
    """One BART/Marian stack (Marian has no layernorm_embedding and computes its positions)."""
    layer = f"model.{stack}.layers.{{i}}"
    rules = _joined("blocks.{i}.attn.qkv", [f"{layer}.self_attn.{p}_proj" for p in "qkv"], qkv_sizes)
    pairs = {
        "embed_norm": f"model.{stack}.layernorm_embedding",
        "blocks.{i}.attn.o": f"{layer}.self_attn.out_proj",
        "blocks.{i}.attn_norm": f"{layer}.self_attn_layer_norm",
        "blocks.{i}.mlp.up": f"{layer}.fc1",
        "blocks.{i}.mlp.down": f"{layer}.fc2",
        "blocks.{i}.mlp_norm": f"{layer}.final_layer_norm",
    }
    if stack == "decoder":
        rules += _joined("blocks.{i}.cross_attn.kv", [f"{layer}.encoder_attn.{p}_proj" for p in "kv"], kv_sizes)
        pairs |= {
            "blocks.{i}.cross_attn.q": f"{layer}.encoder_attn.q_proj",
            "blocks.{i}.cross_attn.o": f"{layer}.encoder_attn.out_proj",
            "blocks.{i}.cross_norm": f"{layer}.encoder_attn_layer_norm",
        }
    rules += _renames(_with_bias(pairs) | {"embed_positions.weight": f"model.{stack}.embed_positions.weight"})
    return [Rule(f"{stack}.{rule.gf}", rule.hf, rule.sizes) for rule in rules]


_BART = _renames(
    {
        "embed_tokens.weight": "model.shared.weight",
        "lm_head.weight": "lm_head.weight",
        "final_logits_bias": "final_logits_bias",
    }
)
_BART += _bart_stack("encoder") + _bart_stack("decoder")
_SEQ2SEQ_WEIGHT_MAPS = {"t5": _T5, "bart": _BART, "marian": _BART}
# Tensors their checkpoints carry that genforge does not load: the stacks' copies of the
# shared embedding, Marian's sinusoidal tables (computed) and a cross-attention relative
# bias that old T5 checkpoints stored and never used.
_SEQ2SEQ_IGNORED = re.compile(
    r"^(model\.)?(encoder|decoder)\.embed_tokens\.weight$|^model\.(encoder|decoder)\.embed_positions\.weight$"
    r"|EncDecAttention\.relative_attention_bias\.weight$"
)


def bloom_qkv_order(config: Config) -> torch.Tensor:
    """BLOOM's fused query_key_value stores its rows per head, [heads, (q, k, v), head_dim];
    genforge's `qkv` stores [(q, k, v), heads, head_dim]. The Hugging Face row of each
    genforge row."""
    heads, dim = config.num_heads, config.head_dim
    return torch.arange(heads * 3 * dim).view(heads, 3, dim).transpose(0, 1).reshape(-1)


_BLOOM_LAYER = "transformer.h.{i}"
_BLOOM = [
    Rule(
        f"blocks.{{i}}.attn.qkv.{kind}",
        (f"{_BLOOM_LAYER}.self_attention.query_key_value.{kind}",),
        None,
        False,
        bloom_qkv_order,
    )
    for kind in ("weight", "bias")
] + _renames(
    {"embed_tokens.weight": "transformer.word_embeddings.weight", "lm_head.weight": "lm_head.weight"}
    | _with_bias(
        {
            "embed_norm": "transformer.word_embeddings_layernorm",
            "blocks.{i}.attn_norm": f"{_BLOOM_LAYER}.input_layernorm",
            "blocks.{i}.attn.o": f"{_BLOOM_LAYER}.self_attention.dense",
            "blocks.{i}.mlp_norm": f"{_BLOOM_LAYER}.post_attention_layernorm",
            "blocks.{i}.mlp.up": f"{_BLOOM_LAYER}.mlp.dense_h_to_4h",
            "blocks.{i}.mlp.down": f"{_BLOOM_LAYER}.mlp.dense_4h_to_h",
            "final_norm": "transformer.ln_f",
        }
    )
)

WEIGHT_MAPS: dict[str, list[Rule]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "phi3": _PHI3,
    "mixtral": _MIXTRAL,
    "gpt2": _GPT2,
    "bert": _BERT,
}
WEIGHT_MAPS |= _SEQ2SEQ_WEIGHT_MAPS
# The base-model prefix of each family's CausalLM/MaskedLM checkpoints. Bare base-model
# checkpoints (a `BertModel` such as all-MiniLM, a `GPT2Model`) store names without it.
_MPT_LAYER = "transformer.blocks.{i}"
# MPT's fused Wqkv is already [q, k, v]; its norms have no bias.
_MPT = _renames(
    {
        "embed_tokens.weight": "transformer.wte.weight",
        "lm_head.weight": "lm_head.weight",
        "blocks.{i}.attn_norm.weight": f"{_MPT_LAYER}.norm_1.weight",
        "blocks.{i}.attn.qkv.weight": f"{_MPT_LAYER}.attn.Wqkv.weight",
        "blocks.{i}.attn.o.weight": f"{_MPT_LAYER}.attn.out_proj.weight",
        "blocks.{i}.mlp_norm.weight": f"{_MPT_LAYER}.norm_2.weight",
        "blocks.{i}.mlp.up.weight": f"{_MPT_LAYER}.ffn.up_proj.weight",
        "blocks.{i}.mlp.down.weight": f"{_MPT_LAYER}.ffn.down_proj.weight",
        "final_norm.weight": "transformer.norm_f.weight",
    }
)
WEIGHT_MAPS |= {"bloom": _BLOOM, "mpt": _MPT}
_BASE_PREFIX = {family: "model." for family in WEIGHT_MAPS} | {"gpt2": "transformer.", "bert": "bert.", "t5": ""}
_BASE_PREFIX |= {"bloom": "transformer.", "mpt": "transformer."}
# Tensors that some checkpoints carry and genforge has no use for.
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$|^bert\.pooler\.|^pooler\.|^cls\.|position_ids$)")


@dataclass(frozen=True)
class _Binding:
    gf: str
    hf: tuple[str, ...]
    sizes: tuple[int, ...] | None  # rows of each part, where there are several
    transpose: bool
    row_order: torch.Tensor | None = None  # Rule.row_order for this config


def _bindings(model: Transformer, buffers: Sequence[str] = ()) -> list[_Binding]:
    """Every parameter of `model` (and the named `buffers`, e.g. an NF4 layer's packed `weight`),
    with the concrete Hugging Face tensors it holds."""
    config = model.config
    names = [name for name, _ in model.named_parameters()]  # a tied lm_head appears once, as embed_tokens
    names += list(buffers)
    bound: dict[str, _Binding] = {}
    for rule in WEIGHT_MAPS[config.family]:
        pattern = re.compile(re.escape(rule.gf).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)") + "$")
        for name in names:
            match = pattern.match(name)
            if match:
                hf = tuple(part.format(**match.groupdict()) for part in rule.hf)
                order = rule.row_order(config) if rule.row_order else None
                bound[name] = _Binding(name, hf, rule.sizes(config) if rule.sizes else None, rule.transpose, order)
    missing = set(names) - set(bound)
    if missing:  # a genforge bug, not a user error: the weight map forgot a parameter
        raise AssertionError(f"weight map for {config.family} does not cover {sorted(missing)}")
    return list(bound.values())


@dataclass(frozen=True)
class LinearParts:
    """The Hugging Face linear modules one genforge linear layer computes, in output-row order:
    Llama's fused `qkv` holds q_proj, k_proj and v_proj (`sizes` rows each); a rename holds
    one. `transposed` where Hugging Face stores the weight (in, out), as GPT-2's Conv1D does."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    transposed: bool
    # BLOOM's query_key_value: genforge's output row r is Hugging Face's row row_order[r]
    # (an adapter's B matrix exported under the Hugging Face name needs its rows put back).
    row_order: torch.Tensor | None = None


def hf_linear_parts(model: Transformer, kinds: tuple[type[nn.Module], ...] = (nn.Linear,)) -> dict[str, LinearParts]:
    """Each `nn.Linear` of `model` (and each module of another of `kinds`, such as
    `NF4Linear`, named by its `weight`) by genforge module name (`blocks.0.attn.qkv`), with the
    Hugging Face modules it holds (`model.layers.0.self_attn.q_proj`, ...). Adapters read
    this to name their tensors the way PEFT does. Call it on the model as loaded (or quantized)."""
    # A quantized layer's weight is a buffer of packed codes, under the same name.
    buffers = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, kinds)]
    buffers = [name for name in buffers if name in dict(model.named_buffers())]
    bound = {binding.gf: binding for binding in _bindings(model, buffers)}
    rules = {rule.gf: rule for rule in WEIGHT_MAPS[model.config.family]}
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        binding = bound.get(f"{name}.weight")
        if binding is None:  # a head tied to the embeddings is bound once, as embed_tokens
            rule = rules[f"{name}.weight"]
            binding = _Binding(rule.gf, rule.hf, None, rule.transpose)
        names = tuple(hf.removesuffix(".weight") for hf in binding.hf)
        layers[name] = LinearParts(names, binding.sizes or (module.out_features,), binding.transpose, binding.row_order)
    return layers


# ------------------------------------------------------------------------------------ load
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(
    dtype: str | torch.dtype | None, config_dict: dict | None = None, device: str | torch.device = "cpu"
) -> torch.dtype:
    """float32 by default on CPU (bf16 matmul is slow there); "auto" takes the checkpoint's."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"dtype {dtype} is not supported; accepted: {', '.join(DTYPES)}")
        return dtype
    if dtype is None:
        dtype = "float32" if torch.device(device).type == "cpu" else "auto"
    if dtype == "auto":
        dtype = (config_dict or {}).get("dtype") or (config_dict or {}).get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def _weight_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a safetensors index (expected a 'weight_map'): {err}") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(absent)}")
        return files
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory} holds only pickled weights (*.bin / *.pt). genforge loads safetensors only, because "
            "unpickling can run arbitrary code; convert once with transformers: "
            "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"no weights in {directory}: expected model.safetensors or model.safetensors.index.json")


def read_config(directory: str | Path) -> Config:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; expected a Hugging Face model directory")
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory} has no config.json; expected a Hugging Face model directory")
    try:
        return Config.from_file(config_path)
    except KeyError as err:
        raise CheckpointError(f"{config_path} lacks the field {err}") from None


def read_generation_config(directory: str | Path) -> dict:
    """The checkpoint's `generation_config.json` (sampling defaults, eos ids), or {}."""
    path = Path(directory) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def load_model(
    directory: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Load a Hugging Face model directory (config.json + safetensors) into a genforge model."""
    model, _ = _load(directory, dtype, device, head_tensors=None)
    return model


def load_model_body(
    directory: str | Path,
    head_tensors: Sequence[str],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """The model of a checkpoint whose head is not the LM head (a transformers
    `...ForSequenceClassification` has `score.weight` instead): the genforge model without
    `lm_head`, and the named head tensors as stored (in `dtype`, on `device`)."""
    return _load(directory, dtype, device, head_tensors=tuple(head_tensors))


def _load(
    directory: str | Path,
    dtype: str | torch.dtype | None,
    device: str | torch.device,
    head_tensors: tuple[str, ...] | None,
) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """`load_model`'s work; `head_tensors` None loads the LM head, a tuple names the tensors of
    another head to return beside a model without one."""
    directory = Path(directory)
    try:
        config = read_config(directory)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    _refuse_quantized(directory, config)
    dtype = resolve_dtype(dtype, config.hf_extra, device)
    files = _weight_files(directory)

    if config.family == "t5":
        # transformers 5 writes tie_word_embeddings true into every T5 config.json and unties a
        # head stored apart (v1.1, Flan-T5): the weights, not the flag, say which it is.
        config = dataclasses.replace(config, tie_word_embeddings=not _stores_tensor(files, "lm_head.weight"))
    with torch.device("meta"):
        model = build_model(config)
    if head_tensors is not None:
        model.lm_head = None
    bindings = _bindings(model)
    expected = {name: p.shape for name, p in model.named_parameters()}
    base = _BASE_PREFIX[config.family]

    available: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, name in file)
    for file in files:
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():
                available[_canonical(key, base)] = (file, key)
    if not config.tie_word_embeddings and _BERT_DECODER_BIAS in available:
        # An untied BertForMaskedLM adds its decoder's own bias; cls.predictions.bias is then unused.
        available[_BERT_HEAD_BIAS] = available[_BERT_DECODER_BIAS]
    # A head's tensors sit beside the base model's (`score.weight`, not `model.score.weight`).
    head_names = {_canonical(name, base): name for name in head_tensors or ()}
    if head_tensors is None and _canonical("score.weight", base) in available:
        raise CheckpointError(
            f"{directory} holds a sequence classifier (a `score` head, e.g. a reward model), not a language model; "
            "load it with genforge.align.RewardModel.from_pretrained"
        )
    missing = [name for b in bindings for name in b.hf if name not in available]
    missing += [name for key, name in head_names.items() if key not in available]
    if missing:
        raise CheckpointError(
            f"{directory} lacks {len(missing)} tensor(s) a {config.family} model with this config.json needs: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    # A tied head may still be stored (and BERT's decoder bias is a second name for cls.predictions.bias).
    known = {name for b in bindings for name in b.hf} | {
        "lm_head.weight",
        "cls.predictions.decoder.weight",
        "cls.predictions.decoder.bias",
        *head_names,
    }
    ignored = _SEQ2SEQ_IGNORED if config.encoder_decoder else _IGNORED
    unused = sorted(k for k in available if k not in known and not ignored.search(k))
    if unused:
        raise CheckpointError(
            f"{directory} has tensors genforge's {config.family} weight map does not place: "
            f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}. Is config.json the right one for these weights?"
        )
    by_file: dict[Path, list[str]] = defaultdict(list)
    for binding in bindings:
        for name in binding.hf:
            by_file[available[name][0]].append(name)
    pieces: dict[str, torch.Tensor] = {}
    for file, group in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as reader:
            for name in group:
                pieces[name] = _checked_float(reader.get_tensor(available[name][1]), name)
    state = {
        b.gf: _joined_tensor(b, pieces, expected[b.gf]).to(device=device, dtype=dtype).contiguous() for b in bindings
    }
    head = {}
    for key, name in head_names.items():
        with safe_open(available[key][0], framework="pt", device="cpu") as reader:
            head[name] = _checked_float(reader.get_tensor(available[key][1]), name).to(device=device, dtype=dtype)

    if config.tie_word_embeddings and model.lm_head is not None:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    if not config.encoder_decoder:
        model.rotary = RotaryEmbedding(config).to(device) if config.position == "rope" else None
    for module in model.modules():  # tables built on the meta device: compute them for real
        table = getattr(module, "sinusoidal_table", None)
        if table is not None:
            module.sinusoidal_table = sinusoidal_positions(*table.shape).to(device)
    return model.eval(), head


def _stores_tensor(files: list[Path], name: str) -> bool:
    for file in files:
        with safe_open(file, framework="pt") as reader:
            if name in reader.keys():
                return True
    return False


def build_model(config: Config) -> Transformer | EncoderDecoderTransformer:
    """The genforge model of `config`: an `EncoderDecoderTransformer` for encoder-decoder
    families, else a `Transformer`."""
    return EncoderDecoderTransformer(config) if config.encoder_decoder else Transformer(config)


def _refuse_quantized(directory: Path, config: Config) -> None:
    """A quantized checkpoint's integer tensors are not floating-point weights: say what it is and
    what loads it, rather than fail on the first tensor's dtype."""
    block = config.hf_extra.get("quantization_config")
    if not isinstance(block, dict):
        return
    method = block.get("quant_method")
    if method == "genforge":  # quantize.saved.QUANT_METHOD; not imported, so checkpoint stays below quantize
        raise CheckpointError(
            f"{directory} holds a model quantized by `genforge quantize` (method {block.get('method')!r}); "
            "checkpoint.load_model reads floating-point weights only. genforge generate, chat, serve and eval ppl "
            "load it as it is (genforge.quantize.load_quantized in Python). To train or convert it, start from the "
            "floating-point model: fine-tune that and quantize after, or use --method qlora on it"
        )
    raise CheckpointError(
        f"{directory} holds a checkpoint quantized with {method!r} (its config.json's quantization_config); "
        "genforge loads floating-point checkpoints and its own quantized ones (`genforge quantize`). Load the "
        "floating-point model and quantize it with `genforge quantize`"
    )


def _canonical(key: str, base: str) -> str:
    key = key.replace(".gamma", ".weight").replace(".beta", ".bias")  # pre-2019 BERT names
    if key.startswith(base) or key.startswith("lm_head.") or key.startswith("cls.") or key == "final_logits_bias":
        return key
    return base + key


def _checked_float(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"tensor {name} has dtype {tensor.dtype}; genforge loads float32, float16 or bfloat16 weights "
            "(quantized checkpoints need their own loader)"
        )
    return tensor


def _joined_tensor(binding: _Binding, pieces: dict[str, torch.Tensor], expected: torch.Size) -> torch.Tensor:
    """The parameter `binding.gf` from its Hugging Face parts, each checked against config.json."""
    sizes = binding.sizes or (expected[0],)
    parts = []
    for name, rows in zip(binding.hf, sizes, strict=True):
        tensor = pieces[name]
        if binding.transpose:
            if tensor.dim() != 2:
                raise CheckpointError(f"tensor {name} should be 2-D, has shape {tuple(tensor.shape)}")
            tensor = tensor.t()
        want = (rows, *expected[1:])
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {want} from config.json"
                f"{' (stored transposed, as GPT-2 Conv1D weights are)' if binding.transpose else ''}"
            )
        parts.append(tensor)
    joined = parts[0] if len(parts) == 1 else torch.cat(parts)
    return joined if binding.row_order is None else joined[binding.row_order]


# ---------------------------------------------------------------------------------- export
def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """`model`'s weights under their Hugging Face names and in Hugging Face's layout: fused
    projections split into their parts (`qkv` into q_proj, k_proj, v_proj), GPT-2's Conv1D
    weights transposed. The tensors are detached views of the parameters, not copies (except
    where rows are reordered, BLOOM's query_key_value); a head tied to the embeddings appears
    once, as the embedding."""
    params = dict(model.named_parameters())
    tensors = {}
    for binding in _bindings(model):
        param = params[binding.gf].detach()
        if binding.row_order is not None:  # back to Hugging Face's row order (a copy, not a view)
            param = param[torch.argsort(binding.row_order.to(param.device))]
        parts = param.split(binding.sizes or len(param))
        for name, tensor in zip(binding.hf, parts, strict=True):
            tensors[name] = tensor.t() if binding.transpose else tensor
    return tensors


def save_model(
    model: Transformer,
    directory: str | Path,
    tokenizer=None,
    max_shard_bytes: int = 5 * 2**30,
    generation_config: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    config_updates: dict | None = None,
) -> Path:
    """Write `model` as a Hugging Face directory transformers loads (config.json, safetensors,
    generation_config.json, and the tokenizer's files when given).

    `extra_tensors` (Hugging Face names) and `config_updates` (config.json keys) are for a
    model saved with another head: a reward model's `score.weight` and its
    `...ForSequenceClassification` architecture.

    The directory is assembled beside the target and renamed into place, so an interrupted
    export never leaves a half-written model where a good one was.
    """
    config = model.config
    if getattr(model, "packed_for_inference", False):
        raise CheckpointError(
            "this model was packed for CPU inference and its weights are no longer exportable; "
            "export the model as loaded, before genforge.inference.pack_for_cpu_inference"
        )
    directory = Path(directory)
    with staged_directory(directory) as staging:
        tensors = {name: tensor.contiguous().cpu() for name, tensor in hf_state_dict(model).items()}
        tensors.update({name: tensor.detach().contiguous().cpu() for name, tensor in (extra_tensors or {}).items()})
        if _BERT_HEAD_BIAS in tensors and "cls.predictions.decoder.weight" in tensors:
            # Untied, transformers reads the decoder's own bias: write the same values under both names.
            tensors[_BERT_DECODER_BIAS] = tensors[_BERT_HEAD_BIAS].clone()
        _write_shards(tensors, staging, max_shard_bytes)
        hf_config = config.to_hf()
        hf_config["dtype"] = {v: k for k, v in DTYPES.items()}[model.dtype]
        hf_config.update(config_updates or {})
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        if config.encoder_decoder:  # what transformers' generate starts and forces the decoder with
            generation.update(decoder_start_token_id=config.decoder_start_token_id, pad_token_id=config.pad_token_id)
            for key in ("forced_bos_token_id", "forced_eos_token_id"):
                if config.hf_extra.get(key) is not None:
                    generation[key] = config.hf_extra[key]
        generation.update(generation_config or {})
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer is not None:
            tokenizer.save(staging)
    return directory


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata=metadata)
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


__all__ = [
    "CheckpointError",
    "LinearParts",
    "Rule",
    "WEIGHT_MAPS",
    "SUPPORTED_FAMILIES",
    "hf_linear_parts",
    "hf_state_dict",
    "load_model",
    "load_model_body",
    "save_model",
    "read_config",
    "read_generation_config",
    "resolve_dtype",
]
