"""Parity with transformers for every family: logits, cached decoding, export round trip."""

import json

import pytest
import reference_models
import torch
import transformers
from factories import tiny_model

from genforge.cache import ContiguousKVCache
from genforge.checkpoint import load_model, save_model
from genforge.model import document_positions

FAMILIES = list(reference_models.FAMILIES)


def padded_batch(seed=0, lengths=(23, 9, 16)):
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, longest - n :] = torch.randint(3, reference_models.VOCAB, (n,), generator=g)
        mask[row, longest - n :] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_logits_match_transformers(family, hf_model_dir):
    hf, directory = hf_model_dir(family)
    model = load_model(directory)
    ids, mask = padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_equal_rows_alone(family, hf_model_dir):
    model = load_model(hf_model_dir(family)[1])
    ids, mask = padded_batch(seed=1)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model(ids[row : row + 1, real]).logits[0]
            torch.testing.assert_close(batched[row, real], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_matches_full_forward(family, hf_model_dir):
    """Prefill in two chunks, then one token at a time, through a padded batch."""
    model = load_model(hf_model_dir(family)[1])
    ids, mask = padded_batch(seed=2)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = ContiguousKVCache(model.config, ids.shape[0], ids.shape[1])
        pieces = [
            model(ids[:, :7], attention_mask=mask[:, :7], cache=cache).logits,
            model(ids[:, 7:12], attention_mask=mask[:, :12], cache=cache).logits,
        ]
        for t in range(12, ids.shape[1]):
            pieces.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    stepped = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert (stepped[real] - full[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_through_transformers(family, hf_model_dir, tmp_path):
    hf, directory = hf_model_dir(family)
    model = load_model(directory)
    out = save_model(model, tmp_path / "export", max_shard_bytes=20_000)  # force several shards
    assert (out / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, _ = padded_batch(lengths=(17,))
    with torch.no_grad():
        assert (reloaded(ids).logits - hf(ids).logits).abs().max() <= 1e-4
        assert torch.equal(load_model(out)(ids).logits, model(ids).logits)


def test_export_replaces_directory_atomically(hf_model_dir, tmp_path):
    model = load_model(hf_model_dir("llama")[1])
    target = tmp_path / "model"
    save_model(model, target)
    (target / "stale.txt").write_text("from the previous export")
    save_model(model, target)
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_bf16_load_runs(hf_model_dir):
    model = load_model(hf_model_dir("llama")[1], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ids, _ = padded_batch(lengths=(5,))
    assert torch.isfinite(model(ids).logits.float()).all()


# ------------------------------------------------------------------------------ bad input
def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    with pytest.raises(ValueError, match=r"'rwkv' is not supported; supported: .*llama.*mixtral"):
        load_model(tmp_path)


def test_missing_files_are_named(tmp_path, hf_model_dir):
    with pytest.raises(ValueError, match="not a directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((hf_model_dir("llama")[1] / "config.json").read_text())
    with pytest.raises(ValueError, match="expected model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        load_model(tmp_path)


def test_wrong_shape_names_the_tensor(tmp_path, hf_model_dir):
    _, directory = hf_model_dir("llama")
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 100
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape .* expected"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path, hf_model_dir):
    from safetensors.torch import load_file, save_file

    _, directory = hf_model_dir("qwen2")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_model(tmp_path)


def test_unknown_dtype(hf_model_dir):
    with pytest.raises(ValueError, match="unknown dtype 'float8'; accepted: float32, float16, bfloat16"):
        load_model(hf_model_dir("llama")[1], dtype="float8")


def test_integer_tensor_is_refused(tmp_path, hf_model_dir):
    from safetensors.torch import load_file, save_file

    _, directory = hf_model_dir("llama")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.norm\.weight has dtype torch.int8"):
        load_model(tmp_path)


def test_moe_load_balancing_loss_matches_transformers(hf_model_dir):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from genforge.model import load_balancing_loss

    model = load_model(hf_model_dir("mixtral")[1])
    ids, _ = padded_batch(lengths=(12, 12))
    out = model(ids)
    assert len(out.router_logits) == model.config.num_layers
    expected = load_balancing_loss_func(
        tuple(out.router_logits), model.config.num_experts, model.config.num_experts_per_token
    )
    got = load_balancing_loss(out.router_logits, model.config.num_experts, model.config.num_experts_per_token)
    torch.testing.assert_close(got, expected)


def test_dropout_applies_in_training_only():
    from genforge.config import Config
    from genforge.model import Transformer

    fields = dict(
        family="llama",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    plain = Transformer(Config(**fields))
    dropped = Transformer(Config(**fields, dropout=0.5))
    dropped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 64, (2, 9))
    dropped.train()
    torch.manual_seed(1)
    first = dropped(ids).logits
    torch.manual_seed(2)
    assert not torch.allclose(first, dropped(ids).logits)  # embedding and residual dropout draw masks
    torch.manual_seed(1)
    assert torch.equal(first, dropped(ids).logits)  # ...from the global generator
    dropped.eval()
    torch.testing.assert_close(dropped(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------ packing, inputs_embeds
@pytest.mark.parametrize(
    "overrides", [{}, {"family": "gpt2", "position": "learned", "norm": "layernorm"}, {"sliding_window": 3}]
)
def test_packed_row_gives_each_example_its_own_logits(overrides):

    model = tiny_model(3, **overrides).eval()
    lengths = [5, 7, 4]
    examples = [torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    packed = torch.cat(examples, dim=1)
    documents = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = model(packed, document_ids=documents).logits
        alone = torch.cat([model(ids).logits for ids in examples], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    # without the block-diagonal mask the later examples would read the earlier ones
    with torch.no_grad():
        crossed = model(packed).logits
    assert not torch.allclose(crossed[:, lengths[0] :], alone[:, lengths[0] :], atol=1e-3)


def test_document_positions_restart_per_document():

    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 9, 9]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1]])
    assert torch.equal(document_positions(documents), expected)


def test_packed_rows_refuse_a_cache_or_padding_mask():

    model = tiny_model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no cache and no attention_mask"):
        model(ids, attention_mask=torch.ones(1, 4), document_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="document_ids has shape"):
        model(ids, document_ids=torch.zeros(1, 3, dtype=torch.long))


def test_inputs_embeds_equal_looking_up_the_ids():

    model = tiny_model(1).eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        by_ids = model(ids).logits
        by_embeds = model(None, inputs_embeds=model.embed_tokens(ids)).logits
    torch.testing.assert_close(by_ids, by_embeds, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.embed_tokens(ids))
