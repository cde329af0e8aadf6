"""Packed CPU inference gives the unpacked model's results."""

import pytest
import torch

import reference_models
from genforge.checkpoint import load_model, save_model
from genforge.generate.generator import generate
from genforge.generate.processors import SamplingParams
from genforge.inference import PackedLinear, can_pack, pack_for_cpu_inference

pytestmark = pytest.mark.skipif(not can_pack(torch.nn.Linear(2, 2)), reason="needs oneDNN (x86 CPU build of torch)")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3", "mixtral", "gemma"])
def test_packed_model_matches_unpacked(family, hf_model_dir):
    directory = hf_model_dir(family)[1]
    plain, packed = load_model(directory), pack_for_cpu_inference(load_model(directory))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    ids = torch.randint(3, reference_models.VOCAB, (3, 19), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=1e-4)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    prompts = ids.tolist()
    assert [c.token_ids for c in generate(packed, prompts, params, eos_token_ids=[])] == \
           [c.token_ids for c in generate(plain, prompts, params, eos_token_ids=[])]


def test_packed_model_cannot_be_exported(hf_model_dir, tmp_path):
    model = pack_for_cpu_inference(load_model(hf_model_dir("llama")[1]))
    with pytest.raises(ValueError, match="export the model as loaded, before"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_half_precision_models_are_left_alone(hf_model_dir):
    model = load_model(hf_model_dir("llama")[1], dtype="bfloat16")
    assert pack_for_cpu_inference(model) is model
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())
