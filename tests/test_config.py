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
    base = dict(model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=8)
    with pytest.raises(ConfigError, match="activation 'relu2' is not supported"):
        Config.from_hf({**base, "hidden_act": "relu2"})
    with pytest.raises(ConfigError, match="relative position embeddings"):
        Config.from_hf(dict(model_type="bert", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=8, position_embedding_type="relative_key"))


def test_window_per_layer():
    config = llama(sliding_window=8, layer_types=("full", "sliding"))
    assert [config.window_of_layer(i) for i in range(2)] == [None, 8]
    assert llama(sliding_window=8).window_of_layer(0) == 8
