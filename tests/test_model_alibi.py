"""ALiBi (Press et al. 2022): slopes for any head count, the bias through padding, the cache and
packed rows, and BLOOM's checkpoint layout. BLOOM's logits, cached decoding, greedy generation
and export round trip against transformers run in test_model.py / test_generate_generator.py
as the "bloom" family."""

import pytest
import torch
from factories import tiny_model
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

from genforge.cache import ContiguousKVCache
from genforge.checkpoint import bloom_qkv_order
from genforge.config import Config, ConfigError
from genforge.model import alibi_bias, alibi_slopes

ALIBI_GQA = dict(position="alibi", num_heads=6, num_kv_heads=2, hidden_size=48)


def test_power_of_two_slopes_are_the_papers_geometric_sequence():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-k for k in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0**-k for k in (2, 4, 6, 8)]))


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 7, 8, 12, 16, 20, 24, 40, 71, 112])
def test_slopes_for_any_head_count_equal_bloom(heads):
    torch.testing.assert_close(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")))


def test_bias_equals_bloom_up_to_a_constant_per_query():
    """BLOOM adds slope x key position (counted over real tokens); genforge adds slope x
    (key - query). Per query row they differ by a constant, which softmax removes."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = mask.cumsum(-1) - 1
    ours = alibi_bias(alibi_slopes(6), positions, positions)  # (2, 6, 6, 6)
    bloom = build_alibi_tensor(mask, 6, torch.float32).view(2, 6, 1, 6).expand(2, 6, 6, 6)
    visible = (positions[:, None, None, :] <= positions[:, None, :, None]) & mask[:, None, None, :].bool()
    visible = visible.expand(2, 6, 6, 6)
    difference = ours - bloom
    largest = torch.where(visible, difference, -torch.inf).amax(-1)
    smallest = torch.where(visible, difference, torch.inf).amin(-1)
    rows = visible.any(-1)
    assert rows.sum() == 6 * (4 + 6)  # every real query of both rows
    assert (largest - smallest)[rows].abs().max() < 1e-5


def test_bias_penalises_distance_per_head():
    bias = alibi_bias(alibi_slopes(4), torch.tensor([[5]]), torch.arange(6)[None])
    assert bias.shape == (1, 4, 1, 6)
    assert bias[0, :, 0, -1].eq(0).all()
    assert (bias[0, :, 0, :-1].diff(dim=-1) > 0).all()  # nearer keys are penalised less
    assert (bias[0, :-1, 0, 0] < bias[0, 1:, 0, 0]).all()  # the first head has the steepest slope


def _batch(seed, lengths=(13, 6, 9)):
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, longest - n :] = torch.randint(1, 64, (n,), generator=g)
        mask[row, longest - n :] = 1
    return ids, mask


@pytest.mark.parametrize("overrides", [ALIBI_GQA, ALIBI_GQA | {"sliding_window": 4}, ALIBI_GQA | {"num_kv_heads": 1}])
def test_padded_rows_and_cached_decoding_equal_rows_alone(overrides):
    model = tiny_model(3, **overrides).eval()
    ids, mask = _batch(0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model(ids[row : row + 1, real]).logits[0]
            torch.testing.assert_close(full[row, real], alone, atol=1e-5, rtol=1e-5)
        cache = ContiguousKVCache(model.config, ids.shape[0], ids.shape[1])
        pieces = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
        for t in range(5, ids.shape[1]):
            pieces.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
        # unpadded rows with a cache take the no-mask path elsewhere; ALiBi must still add its bias
        alone_cache = ContiguousKVCache(model.config, 1, 13)
        first = model(ids[:1, :4], cache=alone_cache).logits
        steps = [first] + [model(ids[:1, t : t + 1], cache=alone_cache).logits for t in range(4, 13)]
    real = mask.bool()
    assert (torch.cat(pieces, dim=1)[real] - full[real]).abs().max() <= 1e-5
    assert (torch.cat(steps, dim=1)[0] - full[0]).abs().max() <= 1e-5


def test_alibi_changes_the_logits_of_a_rope_free_model():
    """Without the bias a model with no position information could not tell order apart."""
    ids = torch.tensor([[5, 9, 2, 7, 3]])
    alibi = tiny_model(1, position="alibi").eval()
    with torch.no_grad():
        forward = alibi(ids).logits[0, -1]
        swapped = alibi(ids[:, [1, 0, 2, 3, 4]]).logits[0, -1]
    assert not torch.allclose(forward, swapped, atol=1e-4)


def test_packed_rows_get_each_examples_own_logits():
    model = tiny_model(2, **ALIBI_GQA).eval()
    examples = [torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (4, 7)]
    documents = torch.cat([torch.full((1, e.shape[1]), i) for i, e in enumerate(examples)], dim=1)
    with torch.no_grad():
        together = model(torch.cat(examples, dim=1), document_ids=documents).logits
        alone = torch.cat([model(e).logits for e in examples], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_alibi_runs_past_its_training_length_when_asked():
    config = Config(**(dict(tiny_model().config.to_dict()) | {"position": "alibi", "max_position_embeddings": 16}))
    assert config.with_context_limit(64).max_context == 64
    with pytest.raises(ConfigError, match="past this model's trained context"):
        Config(**(config.to_dict() | {"position": "rope", "context_limit": 64}))


def test_bloom_qkv_order_is_a_per_head_interleave():
    config = Config.from_hf(dict(model_type="bloom", vocab_size=10, hidden_size=8, n_layer=1, n_head=2))
    order = bloom_qkv_order(config)  # 2 heads x (q, k, v) x 4 dims
    assert order[:8].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]  # queries of heads 0 and 1
    assert order[8:12].tolist() == [4, 5, 6, 7]  # keys of head 0
    assert sorted(order.tolist()) == list(range(24))


def test_bloom_config_reads_and_refuses():
    config = Config.from_hf(dict(model_type="bloom", vocab_size=10, n_embed=8, n_layer=1, n_head=2))
    assert (config.position, config.hidden_size, config.intermediate_size, config.embedding_norm) == (
        "alibi",
        8,
        32,
        True,
    )
    with pytest.raises(ConfigError, match="apply_residual_connection_post_layernorm=true is not supported"):
        Config.from_hf(
            dict(
                model_type="bloom",
                vocab_size=10,
                hidden_size=8,
                n_layer=1,
                n_head=2,
                apply_residual_connection_post_layernorm=True,
            )
        )


def test_bloom_linear_parts_carry_the_row_order(hf_model_dir):
    from genforge.checkpoint import hf_linear_parts, load_model

    model = load_model(hf_model_dir("bloom")[1])
    parts = hf_linear_parts(model)
    qkv = parts["blocks.0.attn.qkv"]
    assert qkv.names == ("transformer.h.0.self_attention.query_key_value",)
    assert torch.equal(qkv.row_order, bloom_qkv_order(model.config))
    assert parts["blocks.0.attn.o"].row_order is None


def test_onnx_export_refuses_alibi(tmp_path):
    pytest.importorskip("onnx")
    from genforge.quantize.onnx_export import ONNXExportError, export_onnx

    with pytest.raises(ONNXExportError, match="ALiBi attention biases"):
        export_onnx(tiny_model(position="alibi").eval(), tmp_path / "model.onnx")


def test_mpt_config_reads_and_refuses_what_it_does_not_model():
    base = dict(model_type="mpt", vocab_size=10, d_model=8, n_layers=1, n_heads=2)
    config = Config.from_hf(base)
    assert (config.position, config.norm_bias, config.intermediate_size, config.activation) == (
        "alibi",
        False,
        32,
        "gelu",
    )
    with pytest.raises(ConfigError, match=r"attn_config.clip_qkv=6.0 is not supported; accepted: None"):
        Config.from_hf(base | {"attn_config": {"clip_qkv": 6.0}})
    with pytest.raises(ConfigError, match=r"attn_config.alibi=False is not supported"):
        Config.from_hf(base | {"attn_config": {"alibi": False}})
    with pytest.raises(ConfigError, match=r"expansion_ratio=2 is not supported; accepted: 4"):
        Config.from_hf(base | {"expansion_ratio": 2})


def test_lora_on_blooms_reordered_qkv_is_refused_with_the_layers_that_work(hf_model_dir):
    from genforge.checkpoint import load_model
    from genforge.finetune.lora import LoraConfig, LoraError, apply_lora

    with pytest.raises(LoraError, match="query_key_value is not supported yet"):
        apply_lora(load_model(hf_model_dir("bloom")[1]), LoraConfig(r=2, target_modules=["query_key_value"]))
    model = apply_lora(load_model(hf_model_dir("bloom")[1]), LoraConfig(r=2, target_modules=["dense_h_to_4h"]))
    assert any("lora" in name for name, _ in model.named_parameters())
