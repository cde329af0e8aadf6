"""IA3 (genforge.finetune.ia3) checked against PEFT 0.21.2's IA3 on tiny random Llama (GQA)
and GPT-2 models: the same vectors give the same logits and gradients, adapter directories go
both ways, and merging is exact."""

import json

import peft
import pytest
import reference_models
import torch
import torch.nn.functional as F
from finetune_shared import TOKENS, saved_families
from safetensors.torch import load_file

from genforge.checkpoint import load_model
from genforge.finetune import (
    IA3Config,
    IA3Error,
    IA3Linear,
    LoraConfig,
    LoraError,
    apply_ia3,
    apply_lora,
    ia3_peft_names,
    load_adapter,
    load_ia3_adapter,
    merge_ia3,
    save_ia3_adapter,
    trainable_parameter_count,
    unmerge_ia3,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return saved_families(tmp_path_factory)


def randomize_vectors(named_parameters, seed: int = 1) -> None:
    """Vectors away from their starting ones, so each shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in named_parameters:
            if "ia3_l" in name:
                parameter.uniform_(0.5, 1.5)


def peft_ia3(family: str, **ia3):
    model = peft.get_peft_model(reference_models.build(family), peft.IA3Config(**ia3))
    randomize_vectors(model.named_parameters())
    return model.eval()


def peft_parameter(model, peft_key: str):
    return model.get_parameter(f"{peft_key}.default")


def next_token_loss(logits):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))


PEFT_CASES = {
    "llama k,v,down (down feedforward)": (
        "llama",
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "llama fused parts, one feedforward": (
        "llama",
        dict(target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "o_proj"], feedforward_modules=["up_proj"]),
    ),
    "gpt2 c_attn, c_fc, c_proj (feedforward)": (
        "gpt2",
        dict(target_modules=["c_attn", "c_fc", "c_proj"], feedforward_modules=["c_proj"]),
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_a_peft_ia3_adapter_gives_peft_logits(case, base_dir, tmp_path):
    family, ia3 = PEFT_CASES[case]
    reference = peft_ia3(family, **ia3)
    reference.save_pretrained(tmp_path / "adapter")
    base = load_model(base_dir(family))
    with torch.no_grad():
        before = base(TOKENS).logits
    model = load_ia3_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        got = model(TOKENS).logits
        assert (got - reference(TOKENS).logits).abs().max() < 1e-4
    assert (got - before).abs().max() > 1e-2
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(ia3_peft_names(model).values()) == sorted(stored)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_ia3_gradients_equal_peft(case, base_dir, tmp_path):
    family, ia3 = PEFT_CASES[case]
    reference = peft_ia3(family, **ia3)
    reference.save_pretrained(tmp_path / "adapter")
    model = load_ia3_adapter(load_model(base_dir(family)), tmp_path / "adapter")
    next_token_loss(reference(TOKENS).logits).backward()
    next_token_loss(model(TOKENS).logits).backward()
    names = ia3_peft_names(model)
    assert len(names) == sum(1 for _, p in reference.named_parameters() if p.requires_grad)
    for name, peft_key in names.items():
        ours, theirs = model.get_parameter(name).grad, peft_parameter(reference, peft_key).grad
        assert theirs.abs().max() > 0, name
        assert (ours - theirs).abs().max() < 1e-4, name


ROUND_TRIPS = {
    "llama genforge names, feedforward down": ("llama", IA3Config(["qkv", "down"], ["down"])),
    "llama k,v,down": ("llama", IA3Config(["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    "llama gate of gate_up feedforward, up not": (
        "llama",
        IA3Config(["gate_up"], "model\\.layers\\.\\d\\.mlp\\.gate_proj"),
    ),
    "gpt2 genforge names": ("gpt2", IA3Config(["qkv", "up", "down"], ["down"])),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_a_genforge_ia3_adapter_loads_in_peft(case, base_dir, tmp_path):
    family, config = ROUND_TRIPS[case]
    model = apply_ia3(load_model(base_dir(family)), config)
    randomize_vectors(model.named_parameters())
    save_ia3_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["fan_in_fan_out"] == (family == "gpt2")
    reference = peft.PeftModel.from_pretrained(reference_models.build(family), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (reference(TOKENS).logits - model(TOKENS).logits).abs().max() < 1e-4
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for peft_key, tensor in stored.items():
        assert torch.equal(peft_parameter(reference, peft_key), tensor), peft_key
    assert len(stored) == sum(1 for n, _ in reference.named_parameters() if "ia3_l" in n)
    again = load_ia3_adapter(load_model(base_dir(family)), tmp_path / "adapter")
    for name in ia3_peft_names(model):
        assert torch.equal(again.get_parameter(name), model.get_parameter(name)), name


def test_ia3_starts_as_the_base_model_and_trains_only_its_vectors(base_dir):
    base = load_model(base_dir("llama"))
    with torch.no_grad():
        plain = base(TOKENS).logits
    model = apply_ia3(base, IA3Config(["k_proj", "v_proj", "down_proj"], ["down_proj"]))
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, plain)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ia3_peft_names(model))
    assert tuple(model.blocks[0].mlp.down.ia3_l["down_proj"].shape) == (1, 112)
    assert tuple(model.blocks[0].attn.qkv.ia3_l["k_proj"].shape) == (32, 1)
    assert trainable_parameter_count(model)[0] == 2 * (32 + 32 + 112)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ia3_merge_and_unmerge_are_exact(family, base_dir):
    # Feedforward: every down, and the up part of one layer's gate_up (GPT-2: its c_fc; lm_head is tied).
    if family == "llama":
        config = IA3Config(["qkv", "gate_up", "down", "lm_head"], ["down", "model.layers.0.mlp.up_proj"])
    else:
        config = IA3Config(["qkv", "up", "down"], ["down", "transformer.h.0.mlp.c_fc"])
    model = apply_ia3(load_model(base_dir(family)), config)
    randomize_vectors(model.named_parameters())
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "ia3_l" not in n}
    with torch.no_grad():
        unmerged = model(TOKENS).logits
        merge_ia3(model)
        assert (model(TOKENS).logits - unmerged).abs().max() < 1e-5
        merge_ia3(model)  # a second merge changes nothing
        assert (model(TOKENS).logits - unmerged).abs().max() < 1e-5
        unmerge_ia3(model)
        for name, weight in base_weights.items():
            assert (model.get_parameter(name) - weight).abs().max() < 1e-6, name


def test_ia3_refusals(base_dir, tmp_path):
    with pytest.raises(IA3Error, match="feedforward_modules 'down_proj' select no module of target_modules"):
        apply_ia3(load_model(base_dir("llama")), IA3Config(["k_proj"], ["down_proj"]))
    with pytest.raises(IA3Error, match="'query' match no linear layer.*k_proj"):
        apply_ia3(load_model(base_dir("llama")), IA3Config(["k_proj", "query"]))
    with pytest.raises(IA3Error, match="tied embeddings"):
        apply_ia3(load_model(base_dir("llama-mqa-tied")), IA3Config(["lm_head"]))
    model = apply_ia3(load_model(base_dir("llama")), IA3Config(["k_proj"]))
    with pytest.raises(IA3Error, match="already has adapter layers"):
        apply_ia3(model, IA3Config(["v_proj"]))
    with pytest.raises(LoraError, match="already has"):
        apply_lora(model, LoraConfig(target_modules=["v_proj"]))
    assert all(
        not isinstance(m, IA3Linear) for m in apply_lora(load_model(base_dir("llama")), LoraConfig(["qkv"])).modules()
    )
    # PEFT saves Llama's default feedforward_modules (down_proj) though only k_proj is targeted.
    peft_ia3("llama", target_modules=["k_proj"]).save_pretrained(tmp_path / "ia3")
    assert load_ia3_adapter(load_model(base_dir("llama")), tmp_path / "ia3").blocks[0].attn.qkv.parts[0].key == "k_proj"
    with pytest.raises(LoraError, match="'IA3' adapter; load_adapter loads peft_type 'LORA'.*load_ia3_adapter"):
        load_adapter(load_model(base_dir("llama")), tmp_path / "ia3")
    with pytest.raises(IA3Error, match="does not fit this model.*match no linear layer"):
        load_ia3_adapter(load_model(base_dir("gpt2")), tmp_path / "ia3")


def test_a_bfloat16_model_keeps_its_ia3_vectors_in_float32(base_dir):
    model = apply_ia3(
        load_model(base_dir("llama"), dtype="bfloat16"), IA3Config(["k_proj", "down_proj"], ["down_proj"])
    )
    assert {p.dtype for n, p in model.named_parameters() if "ia3_l" in n} == {torch.float32}
    assert model(TOKENS).logits.dtype == torch.bfloat16
