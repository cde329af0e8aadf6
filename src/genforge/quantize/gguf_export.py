"""GGUF export: a Llama-family model directory as one file that llama.cpp, ollama and LM Studio run.

GGUF is llama.cpp's container (ggml's "GGUF" format, github.com/ggml-org/ggml, docs/gguf.md):
a header, typed key/value metadata (the architecture's hyper-parameters and the tokenizer),
then each tensor's name, shape and element type, then the tensor data, aligned. The file is
written with the `gguf` package (llama.cpp's own Python writer, `gguf.GGUFWriter`), and its
element types come from `gguf.quants.quantize`, the same code llama.cpp's converter uses:

- `f32`, `f16`: every 2-D weight in that float type;
- `q8_0`: blocks of 32 consecutive values of a row, each stored as one fp16 scale
  d = max|w| / 127 and 32 int8 codes round(w / d): 8.5 bits per weight;
- `q4_0`: blocks of 32, one fp16 scale d = w_m / -8 (w_m the value of largest magnitude) and
  32 four-bit codes min(15, trunc(w / d + 8.5)), meaning (code - 8) * d: 4.5 bits per weight.

As in llama.cpp's converter, norms and biases (1-D tensors) stay in f32, and a weight whose
rows are not a whole number of 32-value blocks falls back to f16. With `q4_0` the output
head (or the embedding, when the head is tied to it) is written in q8_0: llama.cpp's own
quantizer keeps that tensor at higher precision (Q6_K, which the `gguf` package cannot write).

The weights come from genforge's checkpoint loader: `load_model` joins and checks the Hugging
Face tensors, and `checkpoint.hf_state_dict` splits genforge's fused `qkv` and `gate_up` back
into q/k/v and gate/up along the same weight map. Tensor names are mapped to GGUF's
(`blk.0.attn_q.weight`, ...) by the `gguf` package's `TensorNameMap`.

Rotary layout. Hugging Face's Llama rotates the two halves of each head (`rotate_half`:
channel j pairs with j + d/2). llama.cpp's `llama` architecture rotates adjacent pairs
(2j, 2j + 1), so the query and key rows of each head are reordered on the way out: the row
of channel j of the first half goes to 2j and that of the second half to 2j + 1 (and the same
for q/k biases). The attention scores are unchanged because queries and keys are reordered
alike. Qwen2 runs in llama.cpp with the NeoX (half-split) rotation and is written as is.

Tokenizer. Byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM, genforge's own
`genforge tokenizer train`) are written as `tokenizer.ggml.model = "gpt2"`: the tokens in id
order (padded with `[PAD<i>]` up to the embedding rows), their types (normal, control for
special added tokens, user-defined for other added tokens, unused for padding), the merges
in rank order, the special token ids, whether a BOS/EOS is added, and the chat template.
llama.cpp re-implements each pre-tokenizer (the regex that cuts text before BPE) by name, so
the name is read off `tokenizer.json`'s pre-tokenizer: GPT-2's byte-level regex is "gpt-2",
digits split one by one before it is "smollm", Llama 3's split regex is "llama-bpe" and
Qwen2's "qwen2". Another pre-tokenizer is refused unless its llama.cpp name is given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..checkpoint import hf_state_dict, load_model, read_config
from ..config import Config, ConfigError
from ..model import RotaryEmbedding
from ..tokenizer import Tokenizer

__all__ = [
    "GGUF_TYPES",
    "SUPPORTED_GGUF_FAMILIES",
    "GGUFExport",
    "GGUFExportError",
    "GGUFVocabulary",
    "detect_pre_tokenizer",
    "export_gguf",
    "gguf_vocabulary",
    "interleave_rotary_halves",
]

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
# Hugging Face model_type -> llama.cpp architecture. Mistral's checkpoints are Llama's layout
# (llama.cpp's converter writes them as "llama"); Qwen2 has its own graph (q/k/v biases, NeoX rotation).
_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
SUPPORTED_GGUF_FAMILIES = tuple(_ARCHITECTURES)
# Architectures whose llama.cpp graph rotates adjacent channel pairs (see the module docstring).
_INTERLEAVED_ROTARY = {"llama"}

# llama.cpp's names for the pre-tokenizer regexes of Llama 3 and Qwen2 (tokenizer.json's Split pattern).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_SPLIT_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_RECOGNISED_PRE_TOKENIZERS = (
    "gpt-2 (ByteLevel with its regex), smollm (Digits one by one, then ByteLevel), "
    "llama-bpe (Llama 3's Split regex, then ByteLevel), qwen2 (Qwen2's Split regex, then ByteLevel)"
)


class GGUFExportError(ValueError):
    """A model or tokenizer that GGUF export cannot write faithfully; the message says why and what is accepted."""


@dataclass(frozen=True)
class GGUFExport:
    """What `export_gguf` wrote: the file, llama.cpp's architecture name, the requested type,
    each tensor's GGUF element type by GGUF name, the pre-tokenizer name, the file size, and
    notes on where llama.cpp will not compute exactly what genforge computes."""

    path: Path
    architecture: str
    type: str
    tensor_types: dict[str, str]
    pre_tokenizer: str
    num_bytes: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class GGUFVocabulary:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" tokenizer model reads it."""

    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right", in rank order
    pre_tokenizer: str
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | dict[str, str] | None


# ----------------------------------------------------------------------------------- export
def export_gguf(
    model_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    type: str = "f16",
    *,
    pre_tokenizer: str | None = None,
    show_progress: bool = False,
) -> GGUFExport:
    """Write the Hugging Face model directory `model_dir` (config.json, safetensors,
    tokenizer.json; what genforge's training and fine-tuning save) as the GGUF file `out_file`,
    with weights of `type` (f32, f16, q8_0 or q4_0). Families: llama, mistral, qwen2.

    `pre_tokenizer` names llama.cpp's pre-tokenizer when it cannot be read off tokenizer.json
    (see `detect_pre_tokenizer`). The file is written beside its target and renamed into place.
    """
    import gguf

    if type not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type {type!r} is not supported; accepted: {', '.join(GGUF_TYPES)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    try:
        config = read_config(model_dir)
    except ConfigError as err:
        raise GGUFExportError(str(err)) from None
    architecture = _architecture(config)
    notes = _model_notes(config)
    try:
        tokenizer = Tokenizer.from_dir(model_dir)
    except FileNotFoundError as err:
        raise GGUFExportError(
            f"GGUF export writes the tokenizer into the file (llama.cpp tokenizes with it), and {model_dir} "
            f"has none: {err}"
        ) from None
    vocabulary = gguf_vocabulary(tokenizer, config.vocab_size, pre_tokenizer)
    # A tokenizer without named BOS/EOS tokens (Qwen2 names no BOS) takes config.json's ids,
    # as llama.cpp's converter does.
    eos_ids = (config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]) or [None]
    vocabulary = dataclasses.replace(
        vocabulary,
        bos_token_id=vocabulary.bos_token_id if vocabulary.bos_token_id is not None else config.bos_token_id,
        eos_token_id=vocabulary.eos_token_id if vocabulary.eos_token_id is not None else eos_ids[0],
        pad_token_id=vocabulary.pad_token_id if vocabulary.pad_token_id is not None else config.pad_token_id,
    )
    if vocabulary.eos_token_id is None:
        notes.append("no end-of-sequence token is known (tokenizer or config.json); llama.cpp will use its default")

    model = load_model(model_dir, dtype="auto")
    tensors = _gguf_tensors(model, architecture)
    element_types = _element_types(tensors, type)
    fallback = [name for name, kind in element_types.items() if kind == "F16" and type in ("q8_0", "q4_0")]
    if fallback:
        notes.append(
            f"{len(fallback)} weight(s) have rows that are not a whole number of 32-value blocks and are written "
            f"in f16, as llama.cpp's converter does: {', '.join(fallback[:4])}{' ...' if len(fallback) > 4 else ''}"
        )
    if type == "q4_0":
        head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        notes.append(f"{head} (the output head) is written in {element_types[head].lower()}, not q4_0")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_file) as temporary:
        writer = gguf.GGUFWriter(temporary, architecture)
        try:
            _write_metadata(writer, config, model_dir.resolve().name, type)
            _write_vocabulary(writer, vocabulary)
            for name, tensor in tensors.items():
                kind = gguf.GGMLQuantizationType[element_types[name]]
                shape = tuple(tensor.shape)
                if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
                    writer.add_tensor_info(name, shape, np.dtype(dtype), tensor.numel() * np.dtype(dtype).itemsize)
                else:
                    byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
                    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            # One tensor at a time: memory holds the model plus one converted tensor, not a second copy.
            for name in _progress(list(tensors), show_progress, f"writing {out_file.name}"):
                kind = gguf.GGMLQuantizationType[element_types[name]]
                writer.write_tensor_data(gguf.quants.quantize(_checked_array(name, tensors[name], kind), kind))
        finally:
            writer.close()
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        num_bytes = temporary.stat().st_size
    return GGUFExport(
        path=out_file,
        architecture=architecture,
        type=type,
        tensor_types=element_types,
        pre_tokenizer=vocabulary.pre_tokenizer,
        num_bytes=num_bytes,
        notes=tuple(notes),
    )


def _architecture(config: Config) -> str:
    """llama.cpp's architecture for `config`, or a GGUFExportError naming what it would compute differently."""
    if config.family not in _ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export does not support the {config.family!r} family; supported: "
            f"{', '.join(SUPPORTED_GGUF_FAMILIES)} (the Llama family, whose llama.cpp graphs genforge's layout maps onto)"
        )
    architecture = _ARCHITECTURES[config.family]
    problems = []
    if config.norm != "rmsnorm" or config.norm_weight_offset != 0.0:
        problems.append(f"norm {config.norm!r} with weight offset {config.norm_weight_offset} (expected plain RMSNorm)")
    if config.activation != "silu" or not config.gated_mlp:
        problems.append(f"MLP activation {config.activation!r}, gated={config.gated_mlp} (expected SwiGLU)")
    if config.position != "rope" or config.partial_rotary_factor != 1.0:
        problems.append(
            f"positions {config.position!r} over {config.partial_rotary_factor:g} of each head (expected full RoPE)"
        )
    if config.qk_norm:
        problems.append("q/k norm (Qwen3's)")
    if config.num_experts:
        problems.append(f"{config.num_experts} experts (Mixtral's)")
    if config.embedding_multiplier != 1.0:
        problems.append(f"embedding multiplier {config.embedding_multiplier:g}")
    if not config.causal:
        problems.append("bidirectional attention")
    allowed_rope = ("default", "linear", "llama3") if architecture in _INTERLEAVED_ROTARY else ("default", "linear")
    if config.rope_type not in allowed_rope:
        problems.append(f"RoPE scaling {config.rope_type!r} (written: {', '.join(allowed_rope)})")
    if architecture == "qwen2" and (config.attn_out_bias or config.mlp_bias or not config.qkv_bias):
        problems.append("Qwen2 with biases other than on q/k/v")
    if problems:
        raise GGUFExportError(
            f"this {config.family} model has {'; '.join(problems)}, which llama.cpp's {architecture!r} graph does not "
            "compute; GGUF export would write a file that runs a different model"
        )
    return architecture


def _model_notes(config: Config) -> list[str]:
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        return [
            f"the model attends over a sliding window of {config.sliding_window} tokens, which llama.cpp's "
            f"{_ARCHITECTURES[config.family]!r} graph does not apply: outputs differ past {config.sliding_window} tokens"
        ]
    return []


def _write_metadata(writer, config: Config, name: str, type: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.rotary_dim)
    if config.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_file_type(file_types[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------------- tensors
def interleave_rotary_halves(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection (or its bias) from Hugging Face's rotary
    layout, where channel j of a head pairs with channel j + head_dim / 2, to llama.cpp's, where
    pairs are adjacent: within each head, rows (j, j + head_dim / 2) move to (2j, 2j + 1)."""
    head_dim = weight.shape[0] // num_heads
    halves = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return halves.transpose(1, 2).reshape(weight.shape)


def _gguf_tensors(model, architecture: str) -> dict[str, torch.Tensor]:
    """The model's tensors under their GGUF names, in llama.cpp's layout, embeddings first,
    then the blocks in order, then the final norm and head."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config.num_layers)
    tensors = {}
    for hf_name, tensor in hf_state_dict(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:  # a genforge bug, not a user error: a tensor the architecture has no place for
            raise AssertionError(f"no GGUF name for {hf_name} in llama.cpp's {architecture!r} architecture")
        if architecture in _INTERLEAVED_ROTARY and re.search(r"\.attn_[qk]\.", name):
            heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
            tensor = interleave_rotary_halves(tensor, heads)
        tensors[name] = tensor
    if config.rope_type == "llama3":
        tensors["rope_freqs.weight"] = _rope_frequency_factors(config)

    def order(name: str) -> tuple[int, int, str]:
        block = re.match(r"blk\.(\d+)\.", name)
        if block:
            return 1, int(block.group(1)), name
        return (0 if name.startswith(("token_embd", "rope_freqs")) else 2), 0, name

    return {name: tensors[name] for name in sorted(tensors, key=order)}


def _rope_frequency_factors(config: Config) -> torch.Tensor:
    """llama.cpp's `rope_freqs`: per rotary pair, the factor its frequency is divided by. For
    Llama 3's scaling these are read off genforge's own frequencies, scaled over unscaled."""
    unscaled = RotaryEmbedding(dataclasses.replace(config, rope_scaling=None)).inv_freq
    return unscaled / RotaryEmbedding(config).inv_freq


def _element_types(tensors: dict[str, torch.Tensor], type: str) -> dict[str, str]:
    """GGUF element type of each tensor (a `gguf.GGMLQuantizationType` name)."""
    import gguf

    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    wanted = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[type]
    kinds = {}
    for name, tensor in tensors.items():
        kind = wanted
        if tensor.dim() == 1:
            kind = "F32"
        elif kind == "Q4_0" and name == head:
            kind = "Q8_0"
        if kind in ("Q8_0", "Q4_0"):
            block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
            if tensor.shape[-1] % block:
                kind = "F16"
        kinds[name] = kind
    return kinds


def _checked_array(name: str, tensor: torch.Tensor, kind) -> np.ndarray:
    import gguf

    values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(values).all():
        raise GGUFExportError(f"tensor {name} holds inf or NaN; GGUF export writes finite weights only")
    # f16 values, and the fp16 scales of Q8_0 (max / 127) and Q4_0 (max / 8), overflow past
    # float16's largest finite value.
    largest = float(np.finfo(np.float16).max)
    limit = {
        gguf.GGMLQuantizationType.F16: largest,
        gguf.GGMLQuantizationType.Q8_0: largest * 127,
        gguf.GGMLQuantizationType.Q4_0: largest * 8,
    }.get(kind)
    if limit is not None and values.numel() and values.abs().max().item() > limit:
        raise GGUFExportError(
            f"tensor {name} has values up to {values.abs().max().item():.4g}, beyond what {kind.name} stores "
            f"(|w| <= {limit:g}); export with --type f32"
        )
    return values.numpy()


def _progress(items: list[str], show: bool, description: str):
    if not show:
        return items
    from rich.progress import track

    from ..console import console

    return track(items, description=description, console=console, transient=True)


# -------------------------------------------------------------------------------- tokenizer
def detect_pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE `tokenizer.json` (parsed), or
    None when it is none of those genforge recognises: "gpt-2", "smollm", "llama-bpe", "qwen2"."""
    normalizer = tokenizer_json.get("normalizer")
    # NFC leaves already-composed text as it is; llama.cpp does not apply it, and Qwen2 ships with it.
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None
    spec = tokenizer_json.get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if kinds[-1:] != ["ByteLevel"] or last.get("add_prefix_space", False):
        return None
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        split = steps[0]
        if split.get("behavior") == "Isolated" and not split.get("invert", False):
            return _SPLIT_PRE_TOKENIZERS.get((split.get("pattern") or {}).get("Regex"))
    return None


def gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int, pre_tokenizer: str | None = None) -> GGUFVocabulary:
    """`tokenizer` (byte-level BPE) as llama.cpp's "gpt2" tokenizer model: `vocab_size` tokens
    (the model's embedding rows; ids the tokenizer lacks become unused `[PAD<i>]` tokens)."""
    import gguf

    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style: tokenizer.ggml.model 'gpt2'; Llama 3, "
            f"Qwen2, SmolLM, `genforge tokenizer train`); this tokenizer is a {model.get('type')} model with "
            f"byte_fallback={bool(model.get('byte_fallback'))} and a {decoder.get('type')} decoder. SentencePiece-style "
            "tokenizers (Llama 2, Mistral v0.1) are not written yet"
        )
    detected = detect_pre_tokenizer(spec)
    if pre_tokenizer is None:
        if detected is None:
            raise GGUFExportError(
                f"cannot tell which of llama.cpp's pre-tokenizers matches this tokenizer.json (normalizer "
                f"{(spec.get('normalizer') or {}).get('type')}, pre_tokenizer {_describe(spec.get('pre_tokenizer'))}); "
                f"recognised: {_RECOGNISED_PRE_TOKENIZERS}. If you know llama.cpp's name for it, pass it as "
                "pre_tokenizer (--pre-tokenizer NAME)"
            )
        pre_tokenizer = detected
    if len(tokenizer) > vocab_size:
        raise GGUFExportError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab_size} rows; "
            "they must belong to the same model"
        )

    added = backend.get_added_tokens_decoder()
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = backend.id_to_token(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (0.20 and later).
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    probe_plain = tokenizer.encode("a", add_special_tokens=False)
    probe = tokenizer.encode("a", add_special_tokens=True)
    return GGUFVocabulary(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        pre_tokenizer=pre_tokenizer,
        bos_token_id=bos,
        eos_token_id=eos,
        unk_token_id=tokenizer.unk_token_id,
        pad_token_id=tokenizer.pad_token_id,
        add_bos_token=bos is not None and probe[:1] == [bos] and probe_plain[:1] != [bos],
        add_eos_token=eos is not None and probe[-1:] == [eos] and probe_plain[-1:] != [eos],
        chat_template=tokenizer.chat_template,
    )


def _describe(spec: dict | None) -> str:
    if not spec:
        return "none"
    if spec.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe(step) for step in spec.get("pretokenizers", [])) + "]"
    return str(spec.get("type"))


def _write_vocabulary(writer, vocabulary: GGUFVocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre_tokenizer)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    writer.add_token_merges(vocabulary.merges)
    for token_id, add in (
        (vocabulary.bos_token_id, writer.add_bos_token_id),
        (vocabulary.eos_token_id, writer.add_eos_token_id),
        (vocabulary.unk_token_id, writer.add_unk_token_id),
        (vocabulary.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocabulary.add_bos_token)
    writer.add_add_eos_token(vocabulary.add_eos_token)
    template = vocabulary.chat_template
    if isinstance(template, dict):
        writer.add_chat_template([{"name": name, "template": text} for name, text in template.items()])
    elif template:
        writer.add_chat_template(template)
