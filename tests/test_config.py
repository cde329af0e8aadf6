"""Config validation: bad architectures are refused with what is accepted."""

import pytest

from genforge.config import Config, ConfigError


def llama(**overrides):
    fields = dict(family="llama", vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)
    return Config(**{**fields, **overrides})


def test_defaults_derive_heads_and_head_dim():
    config = llama()
    assert (config.num_kv_heads, config.head_dim, config.rotary_dim) == (4, 16, 16)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_kv_heads=3), "multiple of num_kv_heads 3"),
        (dict(hidden_size=66), "not divisible by num_heads"),
        (dict(norm="batchnorm"), "accepted: rmsnorm, layernorm"),
        (dict(activation="relu6"), "accepted: silu, gelu, gelu_tanh"),
        (dict(rope_scaling={"rope_type": "longrope"}), "rope_type 'longrope' is not supported"),
        (dict(layer_types=("full",)), "for each of the 2 layers"),
        (dict(num_experts=4, num_experts_per_token=5), "num_experts_per_token must be in 1..4"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        llama(**overrides)


def test_hf_reader_refuses_unknown_activation_and_variants():
    base = dict(
        model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    with pytest.raises(ConfigError, match="activation 'relu2' is not supported"):
        Config.from_hf({**base, "hidden_act": "relu2"})
    with pytest.raises(ConfigError, match="relative position embeddings"):
        Config.from_hf(
            dict(
                model_type="bert",
                vocab_size=8,
                hidden_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=8,
                position_embedding_type="relative_key",
            )
        )


def test_window_per_layer():
    config = llama(sliding_window=8, layer_types=("full", "sliding"))
    assert [config.window_of_layer(i) for i in range(2)] == [None, 8]
    assert llama(sliding_window=8).window_of_layer(0) == 8


def test_legacy_rope_keys_are_read_and_not_written_back():
    legacy = dict(
        model_type="llama",
        vocab_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        torch_dtype="bfloat16",
        rope_scaling=dict(
            type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
    )
    config = Config.from_hf(legacy)
    assert config.rope_theta == 500000.0 and config.rope_type == "llama3"
    assert config.rope_scaling["original_max_position_embeddings"] == 8192
    written = config.to_hf()
    assert "rope_scaling" not in written and "rope_theta" not in written and "torch_dtype" not in written
    assert written["rope_parameters"]["rope_theta"] == 500000.0
    assert Config.from_hf(written).rope_scaling == config.rope_scaling
