"""GGUF export, read back with the `gguf` package's own reader and dequantizer.

The weights are checked against the model directory's safetensors, read here directly with
an independent table of llama.cpp's tensor names; the query/key rows are put back into
Hugging Face's rotary layout by the inverse reordering written out in this file.
"""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from finetune_shared import tiny_chat_model_dir
from safetensors.torch import load_file
from tokenizers import Regex, pre_tokenizers

from genforge.checkpoint import load_model, read_config, save_model
from genforge.cli import main
from genforge.quantize.gguf_export import (
    GGUFExportError,
    detect_pre_tokenizer,
    export_gguf,
    interleave_rotary_halves,
)
from genforge.tokenizer import Tokenizer

# Row lengths (hidden 64, intermediate 96) are whole numbers of 32-value blocks.
BLOCKED = dict(hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2)
FP16_EPS = 2.0**-11  # float16's relative rounding error (unit roundoff)


def _model_dir(directory, **overrides):
    """tiny_chat_model_dir with norms and biases moved off 1 and 0, so that a misplaced one shows."""
    tiny_chat_model_dir(directory, **(BLOCKED | overrides))
    model = load_model(directory)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    save_model(model, directory, Tokenizer.from_dir(directory))
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def exported(llama_dir, tmp_path_factory):
    """type -> (GGUFExport, GGUFReader) for the Llama model in each type."""
    out = tmp_path_factory.mktemp("gguf")
    results = {}
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        result = export_gguf(llama_dir, out / f"model-{kind}.gguf", kind)
        results[kind] = (result, gguf.GGUFReader(result.path))
    return results


def llama_cpp_names(num_layers: int, tied: bool) -> dict[str, str]:
    """Hugging Face tensor name -> llama.cpp's, for the Llama layout (llama.cpp's naming, written out)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(num_layers):
        for hf, ours in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{ours}.{kind}"
    return names


def rotary_halves_from_pairs(tensor: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k reordering: row 2j of a head back to j, row 2j + 1 to j + head_dim / 2."""
    head_dim = tensor.shape[0] // num_heads
    pairs = tensor.reshape(num_heads, head_dim // 2, 2, *tensor.shape[1:])
    return np.swapaxes(pairs, 1, 2).reshape(tensor.shape)


def read_tensors(reader) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name -> (element type name, values as float32 in (rows, columns) order)."""
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def expected_tensors(model_dir, config) -> dict[str, np.ndarray]:
    """The model directory's safetensors (Hugging Face's layout) under llama.cpp's names."""
    names = llama_cpp_names(config.num_layers, config.tie_word_embeddings)
    weights = load_file(model_dir / "model.safetensors")
    return {names[hf]: tensor.float().numpy() for hf, tensor in weights.items()}


def hf_layout(name: str, values: np.ndarray, config, rotary_pairs: bool) -> np.ndarray:
    if rotary_pairs and (".attn_q." in name or ".attn_k." in name):
        return rotary_halves_from_pairs(values, config.num_heads if ".attn_q." in name else config.num_kv_heads)
    return values


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


# ------------------------------------------------------------------------------------ weights
def test_f32_gives_the_weights_exactly_and_q_k_in_llama_cpp_rotary_layout(llama_dir, exported):
    config = read_config(llama_dir)
    result, reader = exported["f32"]
    read = read_tensors(reader)
    expected = expected_tensors(llama_dir, config)
    assert set(read) == set(expected)
    for name, (kind, values) in read.items():
        assert kind == "F32"
        assert np.array_equal(hf_layout(name, values, config, True), expected[name]), name
    # The reordering really moves rows (the file is not simply Hugging Face's layout).
    assert not np.array_equal(read["blk.0.attn_q.weight"][1], expected["blk.0.attn_q.weight"][1])
    assert result.architecture == "llama" and result.pre_tokenizer == "gpt-2"


def test_f16_gives_the_weights_rounded_to_half_precision(llama_dir, exported):
    config = read_config(llama_dir)
    result, reader = exported["f16"]
    expected = expected_tensors(llama_dir, config)
    for name, (kind, values) in read_tensors(reader).items():
        want = expected[name]
        if want.ndim == 1:  # norms stay in f32, as llama.cpp's converter keeps them
            assert kind == "F32" and np.array_equal(values, want), name
        else:
            assert kind == "F16", name
            rounded = torch.from_numpy(want).half().float().numpy()
            assert np.array_equal(hf_layout(name, values, config, True), rounded), name
            assert not np.array_equal(rounded, want)  # the check can fail: f16 does round these weights


@pytest.mark.parametrize(
    "kind, code_bound",
    # Q8_0 rounds to the nearest code: half a step. Q4_0's codes reach -8 * d but only +7 * d,
    # so a value on the positive side can be a whole step away.
    [("q8_0", 0.5), ("q4_0", 1.0)],
)
def test_quantized_weights_are_within_the_block_rounding(llama_dir, exported, kind, code_bound):
    config = read_config(llama_dir)
    result, reader = exported[kind]
    expected = expected_tensors(llama_dir, config)
    largest_code = {"Q8_0": 127, "Q4_0": 8}
    worst = 0.0
    for tensor in reader.tensors:
        name, type_name = tensor.name, tensor.tensor_type.name
        if expected[name].ndim == 1:
            assert type_name == "F32"
            continue
        assert type_name == ("Q8_0" if name == "output.weight" else kind.upper()), name  # q4_0 keeps the head in q8_0
        block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        # Compared block by block in the file's row order (llama.cpp's q/k layout).
        want = llama_cpp_layout(name, expected[name], config).reshape(-1, block)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, block)
        scales = np.abs(tensor.data.reshape(-1, type_size)[:, :2].copy().view(np.float16).astype(np.float32))
        step = 1.0 if type_name == "Q4_0" else 0.5
        # Rounding to a code, plus the scale's own rounding to fp16 times the largest code.
        error = np.abs(values - want) / scales
        assert (error <= step + (largest_code[type_name] + 1) * FP16_EPS).all(), name
        # Each block's scale comes from its largest magnitude, which is kept up to the scale's rounding.
        np.testing.assert_allclose(
            np.abs(values).max(axis=1), np.abs(want).max(axis=1), rtol=(largest_code[type_name] + 1) * FP16_EPS
        )
        if type_name == kind.upper():
            worst = max(worst, float(error.max()))
    assert worst > 0.4 * code_bound  # the codes really are that coarse: the bound is not vacuous
    assert result.notes == (("output.weight (the output head) is written in q8_0, not q4_0",) if kind == "q4_0" else ())


def llama_cpp_layout(name: str, values: np.ndarray, config) -> np.ndarray:
    """Hugging Face's q/k rows in llama.cpp's order (the module's reordering, checked on its own by
    test_interleaving_rotary_halves_keeps_attention_scores)."""
    if ".attn_q." in name or ".attn_k." in name:
        heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
        return interleave_rotary_halves(torch.from_numpy(values), heads).numpy()
    return values


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_block_layout_matches_the_format(exported, kind):
    """The bytes follow ggml's block formats, decoded here by hand: an fp16 scale d, then 32
    int8 codes (Q8_0, value = code * d) or 16 bytes whose low nibbles hold values 0-15 and high
    nibbles values 16-31 of the block (Q4_0, value = (nibble - 8) * d)."""
    _, reader = exported[kind.lower()]
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    assert tensor.tensor_type.name == kind
    block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    raw = tensor.data.reshape(-1, type_size)
    scale = raw[:, :2].copy().view(np.float16).astype(np.float32)
    if kind == "Q8_0":
        codes = raw[:, 2:].copy().view(np.int8).astype(np.float32)
    else:
        packed = raw[:, 2:]
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32) - 8
    assert codes.shape[1] == block
    by_hand = (codes * scale).reshape(tensor.data.shape[0], -1)
    assert np.array_equal(by_hand, gguf.quants.dequantize(tensor.data, tensor.tensor_type))


def test_interleaving_rotary_halves_keeps_attention_scores():
    """Hugging Face rotates channel j with j + d/2; llama.cpp's llama graph rotates 2j with 2j + 1.
    With q and k reordered, every query-key score is the same at every pair of positions."""
    torch.manual_seed(0)
    heads, head_dim, base = 3, 8, 10000.0
    q_proj, k_proj = torch.randn(heads * head_dim, 5), torch.randn(heads * head_dim, 5)
    x = torch.randn(4, 5)
    freqs = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)

    def rotate_halves(v, position):  # Hugging Face's rotate_half convention
        angle = position * freqs
        first, second = v[..., : head_dim // 2], v[..., head_dim // 2 :]
        return torch.cat([first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()], -1)

    def rotate_pairs(v, position):  # adjacent pairs, ggml's rope mode 0
        angle = position * freqs
        even, odd = v[..., 0::2], v[..., 1::2]
        out = torch.empty_like(v)
        out[..., 0::2] = even * angle.cos() - odd * angle.sin()
        out[..., 1::2] = odd * angle.cos() + even * angle.sin()
        return out

    def scores(qw, kw, rotate):
        q = (x @ qw.t()).view(4, heads, head_dim)
        k = (x @ kw.t()).view(4, heads, head_dim)
        q = torch.stack([rotate(q[p], p) for p in range(4)])
        k = torch.stack([rotate(k[p], p) for p in range(4)])
        return torch.einsum("qhd,khd->hqk", q, k)

    hf = scores(q_proj, k_proj, rotate_halves)
    llama_cpp = scores(interleave_rotary_halves(q_proj, heads), interleave_rotary_halves(k_proj, heads), rotate_pairs)
    torch.testing.assert_close(llama_cpp, hf)
    assert not torch.allclose(scores(q_proj, k_proj, rotate_pairs), hf)  # without the reordering they differ
    rows = interleave_rotary_halves(torch.arange(8.0).view(8, 1), 1).flatten().tolist()
    assert rows == [0, 4, 1, 5, 2, 6, 3, 7]


# ----------------------------------------------------------------------------------- metadata
def test_metadata_equals_the_model_config(llama_dir, exported):
    config = read_config(llama_dir)
    file_types = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}
    for kind, (_, reader) in exported.items():
        meta = fields(reader)
        assert meta["general.architecture"] == "llama"
        assert meta["general.file_type"] == file_types[kind]
        assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION
        assert meta["general.name"] == llama_dir.name
        expected = {
            "llama.vocab_size": config.vocab_size,
            "llama.context_length": config.max_position_embeddings,
            "llama.embedding_length": config.hidden_size,
            "llama.block_count": config.num_layers,
            "llama.feed_forward_length": config.intermediate_size,
            "llama.attention.head_count": config.num_heads,
            "llama.attention.head_count_kv": config.num_kv_heads,
            "llama.attention.key_length": config.head_dim,
            "llama.attention.value_length": config.head_dim,
            "llama.rope.dimension_count": config.head_dim,
        }
        assert {key: meta[key] for key in expected} == expected
        assert meta["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
        assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps, rel=1e-7)
        assert "llama.rope.scaling.type" not in meta


def test_tokenizer_round_trips(llama_dir, exported):
    tokenizer = Tokenizer.from_dir(llama_dir)
    config = read_config(llama_dir)
    meta = fields(exported["q8_0"][1])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == config.vocab_size == len(tokenizer)
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    spec = json.loads((llama_dir / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert meta["tokenizer.ggml.merges"] == merges and len(merges) > 10
    specials = {tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    types = meta["tokenizer.ggml.token_type"]
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == specials
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in specials)
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template

    # The file's vocabulary and merges alone, with GPT-2's pre-tokenizer, tokenize as the original does.
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    rebuilt = RustTokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    )
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.add_special_tokens([tokens[i] for i in sorted(specials)])
    for text in ("What is two plus three? It is five.", "def add(a, b):\n  return a+b", "<|im_start|>user\nBlue"):
        assert rebuilt.encode(text).ids == tokenizer.encode(text, add_special_tokens=False), text


def test_pre_tokenizers_are_recognised_from_tokenizers_json():
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    from genforge.quantize import gguf_export

    def spec(pre_tokenizer, normalizer=None):
        backend = RustTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizer
        if normalizer is not None:
            backend.normalizer = normalizer
        return json.loads(backend.to_str())

    from tokenizers import normalizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = lambda pattern: pre_tokenizers.Split(Regex(pattern), behavior="isolated")  # noqa: E731
    assert detect_pre_tokenizer(spec(pre_tokenizers.ByteLevel(add_prefix_space=False))) == "gpt-2"
    digits = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert detect_pre_tokenizer(spec(digits)) == "smollm"
    llama3 = pre_tokenizers.Sequence([split(gguf_export._LLAMA3_SPLIT), byte_level])
    assert detect_pre_tokenizer(spec(llama3)) == "llama-bpe"
    qwen2 = pre_tokenizers.Sequence([split(gguf_export._QWEN2_SPLIT), byte_level])
    assert detect_pre_tokenizer(spec(qwen2, normalizers.NFC())) == "qwen2"
    assert detect_pre_tokenizer(spec(qwen2, normalizers.NFKC())) is None
    assert detect_pre_tokenizer(spec(pre_tokenizers.ByteLevel(add_prefix_space=True))) is None
    assert detect_pre_tokenizer(spec(pre_tokenizers.Sequence([split(r"\d+"), byte_level]))) is None
    # The patterns are the real ones: Llama 3's keeps up to three digits together, Qwen2's one.
    assert [piece for piece, _ in split(gguf_export._LLAMA3_SPLIT).pre_tokenize_str("x 12345")] == [
        "x",
        " ",
        "123",
        "45",
    ]
    assert [p for p, _ in split(gguf_export._QWEN2_SPLIT).pre_tokenize_str("12")] == ["1", "2"]


# ----------------------------------------------------------------------------- other families
def test_qwen2_keeps_the_half_split_rotary_layout_and_its_biases(tmp_path):
    model_dir = _model_dir(tmp_path / "qwen", family="qwen2", qkv_bias=True, tie_word_embeddings=True)
    config = read_config(model_dir)
    result = export_gguf(model_dir, tmp_path / "qwen.gguf", "f32")
    reader = gguf.GGUFReader(result.path)
    read = read_tensors(reader)
    expected = expected_tensors(model_dir, config)
    assert result.architecture == "qwen2" and fields(reader)["general.architecture"] == "qwen2"
    assert set(read) == set(expected) and "output.weight" not in read  # tied: llama.cpp reuses token_embd
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(read)
    for name, (_, values) in read.items():
        assert np.array_equal(values, expected[name]), name  # no reordering for Qwen2
    assert fields(reader)["qwen2.attention.head_count_kv"] == config.num_kv_heads
    q4 = export_gguf(model_dir, tmp_path / "qwen-q4.gguf", "q4_0")
    assert q4.tensor_types["token_embd.weight"] == "Q8_0"  # the tied embedding is the head


def test_mistral_writes_llama_with_its_head_dim_and_notes_its_window(tmp_path):
    model_dir = _model_dir(tmp_path / "mistral", family="mistral", head_dim=32, sliding_window=16)
    config = read_config(model_dir)
    result = export_gguf(model_dir, tmp_path / "mistral.gguf", "f32")
    reader = gguf.GGUFReader(result.path)
    meta = fields(reader)
    assert result.architecture == "llama"
    assert meta["llama.attention.key_length"] == 32 and meta["llama.rope.dimension_count"] == 32
    expected = expected_tensors(model_dir, config)
    for name, (_, values) in read_tensors(reader).items():
        assert np.array_equal(hf_layout(name, values, config, True), expected[name]), name
    assert any("sliding window of 16 tokens" in note for note in result.notes)


def test_llama_with_q_biases_reorders_them_like_the_weights(tmp_path):
    model_dir = _model_dir(tmp_path / "biased", qkv_bias=True, attn_out_bias=True)
    config = read_config(model_dir)
    reader = gguf.GGUFReader(export_gguf(model_dir, tmp_path / "biased.gguf", "f32").path)
    read, expected = read_tensors(reader), expected_tensors(model_dir, config)
    for name in ("blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"):
        assert np.array_equal(hf_layout(name, read[name][1], config, True), expected[name])
    assert not np.array_equal(read["blk.1.attn_q.bias"][1], expected["blk.1.attn_q.bias"])


def test_llama3_rope_scaling_is_written_as_frequency_factors(tmp_path):
    scaling = dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    )
    model_dir = _model_dir(tmp_path / "llama3", rope_theta=500000.0, rope_scaling=scaling)
    reader = gguf.GGUFReader(export_gguf(model_dir, tmp_path / "llama3.gguf", "f16").path)
    meta, read = fields(reader), read_tensors(reader)
    factors = read["rope_freqs.weight"][1]
    assert read["rope_freqs.weight"][0] == "F32"
    # llama.cpp's frequency of pair i: base^(-2i/d) / factor_i. It equals genforge's scaled frequency.
    dims = meta["llama.rope.dimension_count"]
    base = meta["llama.rope.freq_base"] ** (-np.arange(0, dims, 2) / dims)
    model = load_model(model_dir)
    np.testing.assert_allclose(base / factors, model.rotary.inv_freq.numpy(), rtol=1e-6)
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)  # both ends of the ramp


def test_rows_not_made_of_whole_blocks_fall_back_to_f16(tmp_path):
    model_dir = _model_dir(tmp_path / "odd", intermediate_size=48)  # ffn_down rows hold 48 values
    result = export_gguf(model_dir, tmp_path / "odd.gguf", "q8_0")
    assert result.tensor_types["blk.0.ffn_down.weight"] == "F16"
    assert result.tensor_types["blk.0.ffn_up.weight"] == "Q8_0"
    assert any("blk.0.ffn_down.weight" in note for note in result.notes)
    read = read_tensors(gguf.GGUFReader(result.path))
    assert read["blk.0.ffn_down.weight"][0] == "F16"


# ------------------------------------------------------------------------------ refusals, CLI
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(family="gemma", norm_weight_offset=1.0), "supported: llama, mistral, qwen2"),
        (dict(family="qwen3", qk_norm=True), "supported: llama, mistral, qwen2"),
        (
            dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)),
            "RoPE scaling 'yarn'",
        ),
        (dict(activation="gelu_tanh"), "expected SwiGLU"),
    ],
)
def test_models_llama_cpp_would_compute_differently_are_refused(tmp_path, overrides, message):
    model_dir = tiny_chat_model_dir(tmp_path / "model", **(BLOCKED | overrides))
    with pytest.raises(GGUFExportError, match=message):
        export_gguf(model_dir, tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()


def test_bad_type_and_tokenizers_are_refused_with_a_way_out(llama_dir, tmp_path):
    with pytest.raises(GGUFExportError, match="accepted: f32, f16, q8_0, q4_0"):
        export_gguf(llama_dir, tmp_path / "x.gguf", "q5_k")

    no_tokenizer = shutil.copytree(llama_dir, tmp_path / "bare")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(GGUFExportError, match="writes the tokenizer into the file"):
        export_gguf(no_tokenizer, tmp_path / "x.gguf", "f16")

    other = shutil.copytree(llama_dir, tmp_path / "other")
    spec = json.loads((other / "tokenizer.json").read_text())
    byte_level = spec["pre_tokenizer"]
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, byte_level]}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GGUFExportError, match=r"Sequence\[WhitespaceSplit, ByteLevel\].*--pre-tokenizer"):
        export_gguf(other, tmp_path / "x.gguf", "f16")
    named = export_gguf(other, tmp_path / "x.gguf", "f16", pre_tokenizer="gpt-2")
    assert fields(gguf.GGUFReader(named.path))["tokenizer.ggml.pre"] == "gpt-2"

    spec["pre_tokenizer"] = byte_level
    spec["model"]["byte_fallback"] = True
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GGUFExportError, match="SentencePiece-style"):
        export_gguf(other, tmp_path / "y.gguf", "f16")


def test_a_failed_export_leaves_the_previous_file(llama_dir, tmp_path):
    out = tmp_path / "model.gguf"
    export_gguf(llama_dir, out, "q8_0")
    before = out.read_bytes()
    huge = shutil.copytree(llama_dir, tmp_path / "huge")
    weights = load_file(huge / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e6  # beyond float16
    from safetensors.torch import save_file

    save_file(weights, huge / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GGUFExportError, match="up to 1e\\+06, beyond what F16 stores"):
        export_gguf(huge, out, "f16")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge", "model.gguf"]  # no temporary left behind
    assert export_gguf(huge, tmp_path / "f32.gguf", "f32").num_bytes > 0


def test_cli_exports_and_reports(llama_dir, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", "--model", str(llama_dir), "--out", str(out), "--type", "q4_0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["architecture"] == "llama" and report["type"] == "q4_0"
    assert report["tensors"] == {"F32": 5, "Q4_0": 15, "Q8_0": 1} and report["bytes"] == out.stat().st_size
    assert fields(gguf.GGUFReader(out))["general.file_type"] == 2
    gemma_dir = tiny_chat_model_dir(tmp_path / "gemma", **(BLOCKED | dict(family="gemma", norm_weight_offset=1.0)))
    assert main(["export", "gguf", "--model", str(gemma_dir), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "supported: llama, mistral, qwen2" in capsys.readouterr().err
