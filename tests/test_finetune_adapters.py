"""BitFit, bottleneck adapters and AdapterFusion (genforge.finetune.adapters), checked against
the papers' formulas computed here on the same tensors."""

import json

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
from factories import tiny_encoder, tiny_model

from genforge.checkpoint import load_model, save_model
from genforge.finetune.adapters import (
    FUSION,
    AdapterConfig,
    AdapterError,
    AdapterLinear,
    adapter_state_dict,
    apply_adapter_fusion,
    apply_adapters,
    apply_bitfit,
    fusion_regularization,
    load_adapters,
    merge_adapters,
    save_adapters,
    set_active_adapter,
)
from genforge.finetune.lora import LoraConfig, apply_lora, save_adapter, trainable_parameter_count

TOKENS = torch.tensor([[5, 17, 3, 44, 60, 12, 8, 61, 33], [7, 7, 21, 50, 2, 45, 19, 36, 4]])

# The activations as the papers write them, independently of genforge's table.
REFERENCE_ACTIVATIONS = {
    "relu": lambda x: torch.clamp(x, min=0),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "tanh": lambda x: (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
}


def randomize(model, seed=1, std=0.2):
    """Random values in every trainable tensor, so a fresh adapter's zero up-projection shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, std)


def reference_adapter(h, adapter, act):
    """Houlsby et al. 2019: h + W_up act(W_down h + b_down) + b_up."""
    down, up = adapter.down, adapter.up
    return h + act(h @ down.weight.T + down.bias) @ up.weight.T + up.bias


def reference_fusion(h, outputs, fusion):
    """Pfeiffer et al. 2021, eqs. for AdapterFusion: s = softmax_n(h^T Q . z_n^T K),
    o = sum_n s_n z_n^T V, written per token with explicit loops over the adapters."""
    q = h @ fusion.query.weight.T
    scores = torch.stack([(q * (z @ fusion.key.weight.T)).sum(-1) for z in outputs], dim=-1)
    weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
    weights = weights / weights.sum(-1, keepdim=True)
    return sum(weights[..., n, None] * (z @ fusion.value.weight.T) for n, z in enumerate(outputs))


# ------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("activation", sorted(REFERENCE_ACTIVATIONS))
def test_adapter_layer_computes_the_houlsby_formula(activation):
    model = apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=5, activation=activation))
    randomize(model)
    layer = model.blocks[0].attn.o
    x = torch.randn(2, 3, layer.in_features)
    h = x @ layer.weight.T  # Llama's o has no bias
    expected = reference_adapter(h, layer.adapters["default"], REFERENCE_ACTIVATIONS[activation])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_fusion_layer_computes_the_papers_attention_over_adapters():
    model = apply_adapters(tiny_encoder(), AdapterConfig(bottleneck_size=4, activation="gelu"), name="a")
    randomize(model, seed=1)
    apply_adapters(model, AdapterConfig(bottleneck_size=6), name="b")
    randomize(model, seed=2)
    apply_adapter_fusion(model, ["a", "b"])
    randomize(model, seed=3, std=0.5)  # query, key and value all away from their start
    layer = model.blocks[1].mlp.down
    x = torch.randn(2, 3, layer.in_features)
    h = x @ layer.weight.T + layer.bias
    outputs = [
        reference_adapter(h, layer.adapters["a"], REFERENCE_ACTIVATIONS["gelu"]),
        reference_adapter(h, layer.adapters["b"], REFERENCE_ACTIVATIONS["relu"]),
    ]
    expected = reference_fusion(h, outputs, layer.fusion)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # The adapters' weights are not uniform here, so the check above is not an average in disguise.
    assert not torch.allclose(expected, (outputs[0] + outputs[1]) @ layer.fusion.value.weight.T / 2, atol=1e-3)


# ------------------------------------------------------------------------- installation
@pytest.mark.parametrize("build", [tiny_model, tiny_encoder], ids=["llama", "bert"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_fresh_adapters_leave_the_logits_unchanged(build, placement):
    model = build().eval()
    kwargs = {} if build is tiny_model else {"token_type_ids": torch.zeros_like(TOKENS)}
    before = model(TOKENS, **kwargs).logits
    apply_adapters(model, AdapterConfig(bottleneck_size=8, placement=placement, activation="gelu"))
    assert torch.equal(model(TOKENS, **kwargs).logits, before)


def test_adapters_of_a_bfloat16_model_are_float32_and_start_as_the_identity():
    model = tiny_model().to(torch.bfloat16).eval()
    before = model(TOKENS).logits
    apply_adapters(model, AdapterConfig(bottleneck_size=4), name="a")
    assert torch.equal(model(TOKENS).logits, before)
    assert {p.dtype for n, p in model.named_parameters() if ".adapters." in n} == {torch.float32}
    randomize(model)
    assert model(TOKENS).logits.dtype == torch.bfloat16
    apply_adapter_fusion(model, ["a"])
    assert {p.dtype for n, p in model.named_parameters() if ".fusion." in n} == {torch.float32}


def test_houlsby_and_pfeiffer_put_adapters_where_the_papers_do():
    houlsby = apply_adapters(tiny_model(num_layers=3), AdapterConfig(placement="houlsby", reduction_factor=8))
    wrapped = [name for name, m in houlsby.named_modules() if isinstance(m, AdapterLinear)]
    assert wrapped == [f"blocks.{i}.{leaf}" for i in range(3) for leaf in ("attn.o", "mlp.down")]
    assert houlsby.blocks[0].attn.o.adapters["default"].down.out_features == 32 // 8

    pfeiffer = apply_adapters(tiny_model(num_layers=3), AdapterConfig(placement="pfeiffer", bottleneck_size=3))
    wrapped = [name for name, m in pfeiffer.named_modules() if isinstance(m, AdapterLinear)]
    assert wrapped == ["blocks.0.mlp.down", "blocks.1.mlp.down", "blocks.2.mlp.down"]

    some = apply_adapters(tiny_model(num_layers=3), AdapterConfig(bottleneck_size=3, target_layers=[0, -1]))
    wrapped = [name for name, m in some.named_modules() if isinstance(m, AdapterLinear)]
    assert wrapped == ["blocks.0.attn.o", "blocks.0.mlp.down", "blocks.2.attn.o", "blocks.2.mlp.down"]
    # The base layers keep their state-dict keys; the adapter's own sit under adapters.<name>.
    keys = set(some.state_dict())
    assert "blocks.0.attn.o.weight" in keys and "blocks.2.mlp.down.adapters.default.up.weight" in keys
    trainable, _ = trainable_parameter_count(some)
    assert trainable == 4 * (32 * 3 + 3 + 3 * 32 + 32)


def _changed_after_training(model, steps=3, fusion_penalty=False):
    """Names of parameters a few AdamW steps change, for a model in train mode."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        logits = model(TOKENS[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))
        if fusion_penalty:
            loss = loss + 0.01 * fusion_regularization(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


def test_training_changes_only_the_adapter():
    model = apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4))
    changed = _changed_after_training(model)
    adapter = {name for name, _ in model.named_parameters() if ".adapters.default." in name}
    assert changed == adapter and len(adapter) == 4 * 4


def test_training_a_fusion_changes_only_the_fusion_layers():
    model = apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4), name="a")
    apply_adapters(model, AdapterConfig(bottleneck_size=4), name="b")
    randomize(model)
    for layer in model.modules():
        if isinstance(layer, AdapterLinear):
            layer.adapters["a"].requires_grad_(True)
    apply_adapter_fusion(model, ["a", "b"])
    changed = _changed_after_training(model, fusion_penalty=True)
    fusion = {name for name, _ in model.named_parameters() if ".fusion." in name}
    assert changed == fusion and len(fusion) == 4 * 3


def test_set_active_adapter_switches_between_adapters_and_the_base():
    model = tiny_model().eval()
    base = model(TOKENS).logits
    apply_adapters(model, AdapterConfig(bottleneck_size=4), name="a")
    randomize(model, seed=1)
    with_a = model(TOKENS).logits
    apply_adapters(model, AdapterConfig(bottleneck_size=4, placement="pfeiffer"), name="b")
    randomize(model, seed=2)
    with_b = model(TOKENS).logits
    assert not torch.allclose(with_a, with_b)
    assert torch.equal(set_active_adapter(model, "a")(TOKENS).logits, with_a)
    assert torch.equal(set_active_adapter(model, None)(TOKENS).logits, base)
    with pytest.raises(AdapterError, match=r"no adapter 'c'.*'a', 'b', 'None'"):
        set_active_adapter(model, "c")


# ------------------------------------------------------------------------------- fusion
def test_fusion_of_one_adapter_is_that_adapter(tmp_path):
    trained = apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4)).eval()
    randomize(trained)
    expected = trained(TOKENS).logits
    save_adapters(trained, tmp_path / "task")
    fused = apply_adapter_fusion(tiny_model().eval(), [tmp_path / "task"])
    assert set(fused.adapter_configs) == {"task"}
    randomize(fused, seed=3)  # any query and key: the softmax over one adapter is 1
    with torch.no_grad():
        for layer in fused.modules():
            if isinstance(layer, AdapterLinear):
                layer.fusion.value.weight.copy_(torch.eye(32))
    torch.testing.assert_close(fused(TOKENS).logits, expected, rtol=0, atol=1e-6)


def test_fusion_of_two_copies_of_an_adapter_is_that_adapter():
    """Whatever the query and key, the softmax weights sum to one over equal outputs."""
    model = apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4), name="a").eval()
    randomize(model)
    expected = model(TOKENS).logits
    apply_adapters(model, AdapterConfig(bottleneck_size=4), name="b")
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, AdapterLinear):
                layer.adapters["b"].load_state_dict(layer.adapters["a"].state_dict())
    apply_adapter_fusion(model, ["a", "b"])
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, AdapterLinear):
                layer.fusion.query.weight.normal_(0, 1)
                layer.fusion.key.weight.normal_(0, 1)
    torch.testing.assert_close(model(TOKENS).logits, expected, rtol=0, atol=1e-5)


def test_fused_adapters_must_sit_at_the_same_layers(tmp_path):
    model = apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4), name="a")
    apply_adapters(model, AdapterConfig(bottleneck_size=4, placement="pfeiffer"), name="b")
    with pytest.raises(AdapterError, match=r"same layers: 'a' is at blocks.0.attn.o, .*'b' is at blocks.0.mlp.down"):
        apply_adapter_fusion(model, ["a", "b"])
    save_adapters(apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4, target_layers=[1])), tmp_path / "c")
    with pytest.raises(
        AdapterError, match=r"'a' is at blocks.0.attn.o, .*; 'c' is at blocks.1.attn.o, blocks.1.mlp.down$"
    ):
        apply_adapter_fusion(model, ["a", tmp_path / "c"])
    # Refused before anything changed: c was not loaded, and no layer has a fusion.
    assert set(model.adapter_configs) == {"a", "b"}
    assert not any(isinstance(m, AdapterLinear) and m.fusion is not None for m in model.modules())


def test_fusing_an_adapter_trained_on_another_base_is_refused(tmp_path):
    for seed in (0, 1):
        trained = apply_adapters(tiny_model(seed=seed), AdapterConfig(bottleneck_size=4))
        randomize(trained)
        save_adapters(trained, tmp_path / f"seed{seed}", base_model_name_or_path=f"tiny-{seed}")
    with pytest.raises(AdapterError, match=r"seed1 was trained on other base weights: sampled weights of blocks.0"):
        apply_adapter_fusion(tiny_model(seed=0), [tmp_path / "seed0", tmp_path / "seed1"])
    # The same adapters fuse where each was trained on this base (check_base_weights only overrides).
    model = tiny_model(seed=0)
    load_adapters(model, tmp_path / "seed1", name="other", check_base_weights=False)
    apply_adapter_fusion(model, ["other", tmp_path / "seed0"])
    assert model.adapter_fusion == ("other", "seed0")


# --------------------------------------------------------------------------- save / load
def test_save_and_load_give_the_same_logits(tmp_path):
    model = apply_adapters(tiny_model(), AdapterConfig(reduction_factor=4, activation="silu", target_layers=[1]))
    randomize(model)
    model.eval()
    expected = model(TOKENS).logits
    save_adapters(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "GENFORGE_BOTTLENECK_ADAPTERS"
    assert config["adapters"]["default"]["bottleneck_size"] == 8
    assert config["adapters"]["default"]["layers"] == ["blocks.1.attn.o", "blocks.1.mlp.down"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    loaded = load_adapters(tiny_model().eval(), tmp_path / "adapter")
    assert torch.equal(loaded(TOKENS).logits, expected)
    assert {k: v for k, v in adapter_state_dict(loaded).items()}.keys() == adapter_state_dict(model).keys()
    renamed = load_adapters(tiny_model().eval(), tmp_path / "adapter", name="task")
    assert torch.equal(renamed(TOKENS).logits, expected) and set(renamed.adapter_configs) == {"task"}


def test_a_saved_fusion_loads_with_its_adapters(tmp_path):
    model = apply_adapters(tiny_encoder(), AdapterConfig(bottleneck_size=4), name="a")
    apply_adapters(model, AdapterConfig(bottleneck_size=2, activation="tanh"), name="b")
    randomize(model, seed=1)
    apply_adapter_fusion(model, ["a", "b"])
    randomize(model, seed=2)
    model.eval()
    expected = model(TOKENS).logits
    save_adapters(model, tmp_path / "fused")
    loaded = load_adapters(tiny_encoder().eval(), tmp_path / "fused")
    assert torch.equal(loaded(TOKENS).logits, expected)
    assert loaded.adapter_fusion == ("a", "b")
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, _ in loaded.named_parameters() if ".fusion." in n
    }


def test_loading_onto_another_base_says_both(tmp_path):
    save_adapters(apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4)), tmp_path / "adapter")
    with pytest.raises(
        AdapterError, match=r"different base model \(llama, hidden 32, 2 blocks\); this is llama, hidden 48"
    ):
        load_adapters(tiny_model(hidden_size=48), tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"blocks.0.mlp.down of shape \(32, 48\); this model's is \(32, 64\)"):
        load_adapters(tiny_model(intermediate_size=64), tmp_path / "adapter")


def test_loading_other_directories_is_refused(tmp_path):
    lora = apply_lora(tiny_model(), LoraConfig(target_modules=["q_proj"]))
    save_adapter(lora, tmp_path / "lora")
    with pytest.raises(AdapterError, match=r"'LORA' adapter; load_adapters loads .*genforge.finetune.load_adapter"):
        load_adapters(tiny_model(), tmp_path / "lora")
    save_adapters(apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4)), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        load_adapters(tiny_model(), tmp_path / "adapter")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "config, message",
    [
        (dict(bottleneck_size=0), "bottleneck_size must be at least 1; got 0"),
        (dict(bottleneck_size=4, reduction_factor=8), "not both"),
        (dict(reduction_factor=0.5), "reduction_factor must be a number of at least 1"),
        (dict(activation="softmax"), "unknown activation 'softmax'; accepted: gelu, gelu_tanh, relu"),
        (dict(placement="middle"), "unknown placement 'middle'"),
        (dict(target_layers=3), "target_layers must be a non-empty list"),
    ],
)
def test_bad_configs_are_refused(config, message):
    with pytest.raises(AdapterError, match=message):
        AdapterConfig(**config)


def test_bad_targets_and_sizes_are_refused_before_the_model_changes():
    model = tiny_model()
    with pytest.raises(AdapterError, match=r"target_layers \[2, -3\] name no block of this model; it has 2 blocks"):
        apply_adapters(model, AdapterConfig(target_layers=[0, 2, -3]))
    with pytest.raises(AdapterError, match=r"bottleneck_size 33 does not fit .* 1 to the hidden size \(32\)"):
        apply_adapters(model, AdapterConfig(bottleneck_size=33))
    with pytest.raises(AdapterError, match=r"reduction_factor 64 gives a bottleneck of 0"):
        apply_adapters(model, AdapterConfig(reduction_factor=64))
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    apply_adapters(model, AdapterConfig(bottleneck_size=4), name="a")
    with pytest.raises(AdapterError, match="already has an adapter named 'a'"):
        apply_adapters(model, AdapterConfig(bottleneck_size=4), name="a")
    with pytest.raises(AdapterError, match="adapter name 'fusion' must be"):
        apply_adapters(model, AdapterConfig(bottleneck_size=4), name=FUSION)
    with pytest.raises(
        AdapterError, match="'nope' is neither an adapter on this model \\('a'\\) nor an adapter directory"
    ):
        apply_adapter_fusion(model, ["a", "nope"])
    moe = tiny_model(family="mixtral", num_experts=2, num_experts_per_token=1)
    with pytest.raises(AdapterError, match="mixture of experts"):
        apply_adapters(moe, AdapterConfig(bottleneck_size=4))
    with pytest.raises(AdapterError, match="not a plain linear layer"):
        apply_adapters(apply_lora(tiny_model(), LoraConfig(target_modules=["o"])), AdapterConfig(bottleneck_size=4))


def test_merging_a_bottleneck_adapter_is_refused():
    model = apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4))
    with pytest.raises(AdapterError, match="cannot be merged: an adapter computes h \\+ up\\(act\\(down\\(h\\)\\)\\)"):
        merge_adapters(model)


# -------------------------------------------------------------------------------- BitFit
def test_bitfit_trains_every_bias_of_an_encoder():
    model = apply_bitfit(tiny_encoder())
    biases = {name for name, _ in model.named_parameters() if name.endswith(".bias")}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == biases
    assert "blocks.0.mlp_norm.bias" in biases and "lm_head.bias" in biases  # LayerNorm and head biases, as the paper
    trainable, total = trainable_parameter_count(model)
    assert trainable == sum(p.numel() for name, p in model.named_parameters() if name.endswith(".bias"))
    assert trainable / total < 0.04
    assert model.bitfit_added == []


def test_bitfit_adds_zero_biases_to_llama_and_exports_them(tmp_path):
    model = tiny_model().eval()
    before = model(TOKENS).logits
    apply_bitfit(model)
    assert torch.equal(model(TOKENS).logits, before)
    assert model.bitfit_added == [
        f"blocks.{i}.{leaf}.bias" for i in (0, 1) for leaf in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
    ]
    assert model.config.qkv_bias and model.config.attn_out_bias and model.config.mlp_bias
    changed = _changed_after_training(model.train())
    assert changed == set(model.bitfit_added)
    model.eval()
    expected = model(TOKENS).logits
    merge_adapters(model)
    directory = save_model(model, tmp_path / "bitfit")
    torch.testing.assert_close(load_model(directory)(TOKENS).logits, expected, rtol=0, atol=1e-6)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)


def test_bitfit_on_chosen_layers_adds_their_group_but_trains_only_them():
    model = apply_bitfit(tiny_model(), targets=["qkv"])
    # Llama's one attention_bias flag covers q, k, v and o: o gets a zero bias, frozen.
    assert model.bitfit_added == [
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.o.bias",
        "blocks.1.attn.qkv.bias",
        "blocks.1.attn.o.bias",
    ]
    assert model.bitfit_biases == ["blocks.0.attn.qkv.bias", "blocks.1.attn.qkv.bias"]
    assert not model.config.mlp_bias and model.blocks[0].mlp.down.bias is None
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(model.bitfit_biases)


def test_bitfit_refuses_biases_the_format_cannot_hold():
    with pytest.raises(
        AdapterError, match="mistral model has no bias terms and its Hugging Face format cannot hold any"
    ):
        apply_bitfit(mistral := tiny_model(family="mistral"))
    assert all(p.requires_grad for p in mistral.parameters())  # refused before anything changed
    with pytest.raises(AdapterError, match=r"blocks.0.mlp.down.* a gemma model's Hugging Face format cannot hold one"):
        apply_bitfit(tiny_model(family="gemma"), targets=["down"])
    with pytest.raises(ValueError, match="no linear layer matches 'q_proj'"):
        apply_bitfit(tiny_model(), targets=["q_proj"])
    with pytest.raises(AdapterError, match="already carries an adapter"):
        apply_bitfit(apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4)))


# ----------------------------------------------------------------- gradient checkpointing
def _checkpoint_blocks(model):
    for block in model.blocks:
        original = block.forward
        block.forward = lambda *args, _original=original, **kwargs: torch.utils.checkpoint.checkpoint(
            _original, *args, use_reentrant=False, **kwargs
        )
    return model


def _adapter_model():
    model = apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4))
    randomize(model)
    return model


def _fusion_model():
    model = apply_adapters(tiny_model(), AdapterConfig(bottleneck_size=4), name="a")
    apply_adapters(model, AdapterConfig(bottleneck_size=4), name="b")
    randomize(model)
    return apply_adapter_fusion(model, ["a", "b"])


def _bitfit_model():
    model = apply_bitfit(tiny_model())
    randomize(model)
    return model


@pytest.mark.parametrize("build", [_adapter_model, _fusion_model, _bitfit_model], ids=["adapter", "fusion", "bitfit"])
def test_gradient_checkpointing_gives_the_same_gradients(build):
    def gradients(model):
        logits = model(TOKENS[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1)).backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(build()), gradients(_checkpoint_blocks(build()))
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)
