"""Packed CPU inference gives the unpacked model's results."""

import pytest
import reference_models
import torch

from genforge.checkpoint import load_model, save_model
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.inference import SMALL_PRODUCT_MULTIPLY_ADDS, PackedLinear, can_pack, pack_for_cpu_inference

pytestmark = pytest.mark.skipif(not can_pack(torch.nn.Linear(2, 2)), reason="needs oneDNN (x86 CPU build of torch)")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3", "mixtral", "gemma", "bloom", "mpt"])
def test_packed_model_matches_unpacked(family, hf_model_dir):
    directory = hf_model_dir(family)[1]
    plain, packed = load_model(directory), pack_for_cpu_inference(load_model(directory))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    ids = torch.randint(3, reference_models.VOCAB, (3, 19), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.inference_mode():
        torch.testing.assert_close(
            packed(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4
        )
    params = SamplingParams(temperature=0, max_new_tokens=24)
    prompts = ids.tolist()
    assert [c.token_ids for c in generate(packed, prompts, params, eos_token_ids=[])] == [
        c.token_ids for c in generate(plain, prompts, params, eos_token_ids=[])
    ]


def test_packed_model_cannot_be_exported(hf_model_dir, tmp_path):
    model = pack_for_cpu_inference(load_model(hf_model_dir("llama")[1]))
    with pytest.raises(ValueError, match="export the model as loaded, before"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_half_precision_models_are_left_alone(hf_model_dir):
    model = load_model(hf_model_dir("llama")[1], dtype="bfloat16")
    assert pack_for_cpu_inference(model) is model
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())


# --- PackedLinear's choice of kernel: F.linear for small products, oneDNN for the rest ---


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls each kernel receives from `PackedLinear.forward` (looked up at call time,
    so patching the attributes it calls through is enough)."""
    from genforge import inference

    calls = {"plain": 0, "packed": 0}
    plain, packed = torch.nn.functional.linear, inference.matmul_nt

    def counted_plain(*args, **kwargs):
        calls["plain"] += 1
        return plain(*args, **kwargs)

    def counted_packed(*args, **kwargs):
        calls["packed"] += 1
        return packed(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", counted_plain)
    monkeypatch.setattr(inference, "matmul_nt", counted_packed)
    return calls


def _linear(in_features, out_features, bias, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    if bias:  # nn.Linear's bias is small; a larger one would show if it were dropped or doubled
        torch.nn.init.normal_(layer.bias)
    return layer


def _rows_under_threshold(in_features, out_features):
    """The largest row count whose product still counts as small."""
    return (SMALL_PRODUCT_MULTIPLY_ADDS - 1) // (in_features * out_features)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["2d", "3d", "non-contiguous"])
def test_small_and_large_products_both_match_f_linear(bias, layout, kernel_calls):
    layer = _linear(96, 160, bias)
    packed = PackedLinear(layer)
    assert packed.plain_weight is not None
    small_rows = _rows_under_threshold(96, 160)
    assert small_rows >= 2
    generator = torch.Generator().manual_seed(1)
    for rows, kernel in [(1, "plain"), (small_rows, "plain"), (small_rows + 1, "packed"), (4 * small_rows, "packed")]:
        if layout == "2d":
            x = torch.randn(rows, 96, generator=generator)
        elif layout == "3d":
            x = torch.randn(1, rows, 96, generator=generator)
        else:
            # Every other column of a wider tensor, transposed twice over: strided in both dims.
            x = torch.randn(192, rows, generator=generator).t()[:, ::2]
            assert not x.is_contiguous()
        before = dict(kernel_calls)
        with torch.inference_mode():
            got = packed(x)
            ran = {k: kernel_calls[k] - before[k] for k in kernel_calls}
            want = layer(x)
        assert ran == {"plain": int(kernel == "plain"), "packed": int(kernel == "packed")}, (rows, ran)
        assert got.shape == want.shape == (*x.shape[:-1], 160)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_large_layers_keep_only_the_packed_weight(kernel_calls):
    # in x out at the threshold: even one row is not a small product, so no plain copy is kept.
    out_features = -(-SMALL_PRODUCT_MULTIPLY_ADDS // 256)
    layer = _linear(256, out_features, bias=True)
    packed = PackedLinear(layer)
    assert packed.plain_weight is None
    x = torch.randn(1, 1, 256)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), layer(x), atol=1e-5, rtol=1e-5)
    assert kernel_calls["packed"] == 1


def test_the_plain_weight_of_a_tied_head_is_the_embedding_table(hf_model_dir):
    model = pack_for_cpu_inference(load_model(hf_model_dir("llama-mqa-tied")[1]))
    assert model.lm_head.plain_weight is not None
    assert model.lm_head.plain_weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_wrong_input_width_is_rejected():
    packed = PackedLinear(_linear(32, 48, bias=False))
    with pytest.raises(ValueError, match=r"inputs of shape \(\.\.\., 32\), got \(2, 5, 31\)"):
        packed(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match=r"inputs of shape \(\.\.\., 32\)"):
        packed(torch.tensor(1.0))


def test_generate_on_a_packed_model_uses_both_kernels_and_matches(hf_model_dir, kernel_calls):
    # The tiny test model's layers (in x out <= 64 x 224) are small products for a decode step
    # of 3 rows and large ones for the 3 x 19-token prefill.
    directory = hf_model_dir("llama")[1]
    plain, packed = load_model(directory), pack_for_cpu_inference(load_model(directory))
    prompts = torch.randint(3, reference_models.VOCAB, (3, 19), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=12)
    before = dict(kernel_calls)
    got = [c.token_ids for c in generate(packed, prompts, params, eos_token_ids=[])]
    ran = {k: kernel_calls[k] - before[k] for k in kernel_calls}
    want = [c.token_ids for c in generate(plain, prompts, params, eos_token_ids=[])]
    assert got == want
    layers = sum(isinstance(m, PackedLinear) for m in packed.modules())
    # The prefill (57 rows) packs every layer but the LM head, which sees only the last
    # position of each row; the 11 decode steps (3 rows) take F.linear in every layer.
    assert ran == {"packed": layers - 1, "plain": 11 * layers + 1}


# --- the greedy fast path (processors.greedy_next_token) ---


def test_greedy_next_token_is_sample_next_token_at_temperature_zero():
    from genforge.generate.sampling import greedy_next_token, sample_next_token

    generator = torch.Generator().manual_seed(3)
    # Few distinct values: many ties, where both must pick the first index.
    logits = torch.randint(0, 4, (16, 50), generator=generator).float()
    logits[3, :] = float("-inf")
    logits[3, 7] = 0.0
    logits[5, 9] = float("inf")
    assert torch.equal(greedy_next_token(logits), sample_next_token(logits, 0.0))


@pytest.mark.parametrize("bad", ["nan", "all -inf"])
def test_greedy_next_token_rejects_what_sample_next_token_rejects(bad):
    from genforge.generate.sampling import greedy_next_token, sample_next_token

    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    if bad == "nan":
        logits[2, 17] = float("nan")
    else:
        logits[2] = float("-inf")
    with pytest.raises(ValueError) as fast:
        greedy_next_token(logits)
    with pytest.raises(ValueError) as reference:
        sample_next_token(logits, 0.0)
    assert str(fast.value) == str(reference.value)
    assert "rows [2]" in str(fast.value)


def test_generate_with_and_without_left_padding_agree(hf_model_dir):
    # Equal-length prompts run without an attention mask; the same prompts beside a shorter
    # one run left-padded with it. Each row's tokens must not depend on which.
    model = pack_for_cpu_inference(load_model(hf_model_dir("llama")[1]))
    ids = torch.randint(3, reference_models.VOCAB, (3, 12), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=10)
    alone = [c.token_ids for c in generate(model, ids[:2], params, eos_token_ids=[])]
    padded = [c.token_ids for c in generate(model, ids[:2] + [ids[2][:5]], params, eos_token_ids=[])]
    assert alone == padded[:2]
    assert [c.token_ids for c in generate(model, [ids[2][:5]], params, eos_token_ids=[])] == padded[2:]
