"""DoRA (genforge.finetune.lora with use_dora=True) checked against PEFT 0.21.2 on tiny random
Llama (GQA) and GPT-2 models: the same adapter gives the same logits and gradients, adapter
directories go both ways, and merging is exact."""

import json

import peft
import pytest
import reference_models
import torch
import torch.nn.functional as F
from finetune_shared import TOKENS, randomize, saved_families
from safetensors.torch import load_file

from genforge.checkpoint import load_model
from genforge.finetune import (
    DoraLinear,
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    peft_names,
    save_adapter,
    trainable_parameter_count,
    unmerge_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return saved_families(tmp_path_factory)


def randomize_dora(named_parameters, seed: int = 1) -> None:
    """Random non-zero A and B, and magnitudes moved off the row norms (else f = 1 would hide them)."""
    randomize(named_parameters(), seed)
    with torch.no_grad():
        for name, parameter in named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.empty_like(parameter).uniform_(0.5, 1.5))


def peft_dora(family: str, **lora):
    model = peft.get_peft_model(reference_models.build(family), peft.LoraConfig(use_dora=True, **lora))
    randomize_dora(model.named_parameters)
    return model.eval()


def peft_parameter(model, peft_key: str):
    """PEFT's live parameter for a saved key: `.lora_A.weight` -> `.lora_A.default.weight`,
    `.lora_magnitude_vector` -> `.lora_magnitude_vector.default.weight`."""
    if peft_key.endswith(".lora_magnitude_vector"):
        return model.get_parameter(f"{peft_key}.default.weight")
    return model.get_parameter(peft_key.replace(".weight", ".default.weight"))


def next_token_loss(logits):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))


PEFT_CASES = {
    "llama q,v (k untargeted)": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama all, patterns, rslora": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
            rank_pattern={"k_proj": 2},
            alpha_pattern={"down_proj": 16},
        ),
    ),
    "llama up only of gate_up": ("llama", dict(r=4, lora_alpha=4, target_modules=["up_proj", "o_proj"])),
    "gpt2 c_attn, c_proj, c_fc (Conv1D)": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_a_peft_dora_adapter_gives_peft_logits(case, base_dir, tmp_path):
    family, lora = PEFT_CASES[case]
    reference = peft_dora(family, **lora)
    reference.save_pretrained(tmp_path / "adapter")
    base = load_model(base_dir(family))
    with torch.no_grad():
        before = base(TOKENS).logits
    model = load_adapter(base, tmp_path / "adapter")
    assert all(isinstance(m, DoraLinear) for m in model.modules() if isinstance(m, LoraLinear))
    with torch.no_grad():
        expected = reference(TOKENS).logits
        got = model(TOKENS).logits
    assert (got - expected).abs().max() < 1e-4
    assert (got - before).abs().max() > 1e-2  # the adapter shows: the parity is not trivial
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(peft_names(model).values()) == sorted(key for key in stored if ".base_layer." not in key)
    assert any(key.endswith(".lora_magnitude_vector") for key in stored)


def test_the_magnitudes_alone_change_the_logits(base_dir, tmp_path):
    """With B = 0 the DoRA update is the magnitude's rescaling of W: checks it is applied per part's rows."""
    reference = peft.get_peft_model(
        reference_models.build("llama"), peft.LoraConfig(r=4, target_modules=["k_proj", "gate_proj"], use_dora=True)
    )
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(2.0)
    reference.eval().save_pretrained(tmp_path / "adapter")
    model = load_adapter(load_model(base_dir("llama")), tmp_path / "adapter")
    with torch.no_grad():
        assert (model(TOKENS).logits - reference(TOKENS).logits).abs().max() < 1e-4


@pytest.mark.parametrize(
    "family, lora",
    [
        ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
        ("gpt2", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_fc"])),
    ],
)
def test_dora_gradients_equal_peft(family, lora, base_dir, tmp_path):
    reference = peft_dora(family, **lora)
    reference.save_pretrained(tmp_path / "adapter")
    model = load_adapter(load_model(base_dir(family)), tmp_path / "adapter")
    next_token_loss(reference(TOKENS).logits).backward()
    next_token_loss(model(TOKENS).logits).backward()
    names = peft_names(model)
    assert len(names) == sum(1 for _, p in reference.named_parameters() if p.requires_grad)
    assert sum(".lora_magnitude_vector." in name for name in names) == len(names) // 3
    for name, peft_key in names.items():
        ours, theirs = model.get_parameter(name).grad, peft_parameter(reference, peft_key).grad
        assert theirs.abs().max() > 0, name
        assert (ours - theirs).abs().max() < 1e-4, name


ROUND_TRIPS = {
    "llama genforge names, patterns": (
        "llama",
        LoraConfig(target_modules=["qkv", "down"], r=4, lora_alpha=8, rank_pattern={"k_proj": 2}, use_dora=True),
    ),
    "llama q,v": ("llama", LoraConfig(target_modules=["q_proj", "v_proj"], r=2, use_dora=True)),
    "gpt2 genforge names, rslora": (
        "gpt2",
        LoraConfig(target_modules=["qkv", "up"], r=4, use_rslora=True, use_dora=True),
    ),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_a_genforge_dora_adapter_loads_in_peft(case, base_dir, tmp_path):
    family, config = ROUND_TRIPS[case]
    model = apply_lora(load_model(base_dir(family)), config)
    randomize_dora(model.named_parameters)
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["peft_type"] == "LORA"
    reference = peft.PeftModel.from_pretrained(reference_models.build(family), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (reference(TOKENS).logits - model(TOKENS).logits).abs().max() < 1e-4
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for peft_key, tensor in stored.items():
        assert torch.equal(peft_parameter(reference, peft_key), tensor), peft_key
    assert len(stored) == sum(1 for n, _ in reference.named_parameters() if "lora_" in n)
    again = load_adapter(load_model(base_dir(family)), tmp_path / "adapter")
    for name, tensor in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(again)[name], tensor), name


# --------------------------------------------------------------------------- the layer
def dora_llama(base_dir, **config):
    model = apply_lora(load_model(base_dir("llama")), LoraConfig(use_dora=True, **config))
    randomize_dora(model.named_parameters)
    return model.eval()


def test_magnitudes_start_at_the_row_norms_and_train(base_dir):
    base = load_model(base_dir("llama"))
    with torch.no_grad():
        plain = base(TOKENS).logits
        qkv = base.blocks[0].attn.qkv.weight.detach().clone()
    model = apply_lora(base, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, use_dora=True))
    layer = model.blocks[0].attn.qkv
    assert torch.allclose(layer.lora_magnitude_vector["q_proj"], qkv[:64].norm(dim=1))
    assert torch.allclose(layer.lora_magnitude_vector["v_proj"], qkv[96:].norm(dim=1))
    with torch.no_grad():
        assert (model(TOKENS).logits - plain).abs().max() < 1e-5  # B = 0 and m = ||W||: the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) == set(peft_names(model))
    assert "blocks.1.attn.qkv.lora_magnitude_vector.v_proj" in trainable
    count, _ = trainable_parameter_count(model)
    assert count == 2 * (4 * 64 + 64 * 4 + 64 + 4 * 64 + 32 * 4 + 32)


def test_dora_merge_and_unmerge_are_exact(base_dir):
    model = dora_llama(base_dir, target_modules=["q_proj", "v_proj", "o", "gate_up", "down", "lm_head"], r=4)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        unmerged = model(TOKENS).logits
        merge_lora(model)
        assert (model(TOKENS).logits - unmerged).abs().max() < 1e-5
        # k has no DoRA: its rows of the fused weight do not move.
        assert torch.equal(model.blocks[0].attn.qkv.weight[64:96], base_weights["blocks.0.attn.qkv.weight"][64:96])
        merge_lora(model)  # a second merge changes nothing
        assert (model(TOKENS).logits - unmerged).abs().max() < 1e-5
        unmerge_lora(model)
        for name, weight in base_weights.items():
            assert (model.get_parameter(name) - weight).abs().max() < 1e-6, name
        assert (model(TOKENS).logits - unmerged).abs().max() < 1e-5
        merge_and_unload(model)
        assert not any(isinstance(m, LoraLinear) for m in model.modules())
        assert (model(TOKENS).logits - unmerged).abs().max() < 1e-5


def test_dora_merges_as_peft_does(base_dir, tmp_path):
    reference = peft_dora("gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    reference.save_pretrained(tmp_path / "adapter")
    model = merge_lora(load_adapter(load_model(base_dir("gpt2")), tmp_path / "adapter"))
    merged = reference.merge_and_unload()
    # genforge holds GPT-2's Conv1D weights as nn.Linear's (out, in).
    assert (model.blocks[1].attn.qkv.weight - merged.transformer.h[1].attn.c_attn.weight.t()).abs().max() < 1e-5
    with torch.no_grad():
        assert (model(TOKENS).logits - merged(TOKENS).logits).abs().max() < 1e-4


def test_dora_dropout_applies_in_training_only(base_dir):
    model = dora_llama(base_dir, target_modules=["q_proj", "v_proj"], r=4, lora_dropout=0.5)
    with torch.no_grad():
        evaluated = model(TOKENS).logits
        assert torch.equal(model(TOKENS).logits, evaluated)
        model.train()
        assert (model(TOKENS).logits - evaluated).abs().max() > 1e-4


def test_dora_dropout_matches_peft_with_the_same_masks(base_dir, tmp_path):
    """In training PEFT drops x for both W x and B A x, one mask per module; genforge draws the
    masks in the same order (q, then v), so with the same seed the outputs agree."""
    reference = peft_dora("llama", r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"])
    reference.save_pretrained(tmp_path / "adapter")
    model = load_adapter(load_model(base_dir("llama")), tmp_path / "adapter")
    layer, peft_attention = model.blocks[0].attn.qkv, reference.base_model.model.model.layers[0].self_attn
    layer.train(), peft_attention.train()
    x = torch.randn(2, 5, 64)
    torch.manual_seed(7)
    q, v = peft_attention.q_proj(x), peft_attention.v_proj(x)
    torch.manual_seed(7)
    ours = layer(x)
    assert (ours[..., :64] - q).abs().max() < 1e-5 and (ours[..., 96:] - v).abs().max() < 1e-5


def test_a_bfloat16_model_keeps_its_dora_in_float32(base_dir):
    model = apply_lora(
        load_model(base_dir("llama"), dtype="bfloat16"), LoraConfig(target_modules=["qkv"], r=4, use_dora=True)
    )
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert model(TOKENS).logits.dtype == torch.bfloat16


def test_use_dora_must_be_a_bool():
    with pytest.raises(ValueError, match="use_dora must be True or False; got 'yes'"):
        LoraConfig(target_modules=["qkv"], use_dora="yes")
