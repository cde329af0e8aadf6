"""Tiny random Hugging Face models, built on the fly, that genforge is checked against.

Each entry is small enough to build in well under a second yet exercises what makes its
family different: GQA, sliding windows with a window shorter than the test sequences,
RoPE scaling, partial rotary, q/k norm, experts, fused or transposed weights.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 96
_DECODER = dict(
    vocab_size=VOCAB,
    bos_token_id=1,
    eos_token_id=2,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(_DECODER)),
    "llama3-rope-scaling": (
        transformers.LlamaConfig,
        dict(
            _DECODER,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama-yarn": (
        transformers.LlamaConfig,
        dict(
            _DECODER,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
        ),
    ),
    "llama-linear-rope": (
        transformers.LlamaConfig,
        dict(_DECODER, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ),
    # A trained context of 32 so that the rope-scaling tests run past it in a few dozen tokens.
    "llama-dynamic-rope": (
        transformers.LlamaConfig,
        dict(
            _DECODER,
            max_position_embeddings=32,
            rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
        ),
    ),
    "llama-mqa-tied": (transformers.LlamaConfig, dict(_DECODER, num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(_DECODER, sliding_window=5, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict(_DECODER)),
    "qwen2-sliding": (
        transformers.Qwen2Config,
        dict(_DECODER, use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
    ),
    "qwen3": (transformers.Qwen3Config, dict(_DECODER, head_dim=32)),
    "gemma": (transformers.GemmaConfig, dict(_DECODER, head_dim=32, num_key_value_heads=1)),
    "phi3": (
        transformers.Phi3Config,
        dict(
            _DECODER,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
    ),
    "mixtral": (transformers.MixtralConfig, dict(_DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "gpt2": (
        transformers.GPT2Config,
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
    ),
}
# BLOOM: ALiBi with 6 heads, so that the slopes' interleaved non-power-of-two branch is used.
FAMILIES |= {
    "bloom": (
        transformers.BloomConfig,
        dict(vocab_size=VOCAB, hidden_size=72, n_layer=2, n_head=6, bos_token_id=1, eos_token_id=2),
    ),
    # MPT: ALiBi too, bias-free LayerNorms, exact GELU; 6 heads as above.
    "mpt": (
        transformers.MptConfig,
        dict(
            vocab_size=VOCAB,
            d_model=72,
            n_layers=2,
            n_heads=6,
            max_seq_len=256,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


def build(name: str, seed: int = 0, dtype=torch.float32):
    """A random-weight transformers causal LM of the named tiny family, in eval mode."""
    config_class, kwargs = FAMILIES[name]
    config = config_class(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves norms at 1 and biases at 0; perturb them so a wrong mapping shows.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def bert(seed: int = 0):
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=112,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
