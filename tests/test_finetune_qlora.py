"""QLoRA (genforge.finetune.lora on NF4 base layers): LoRA on a frozen NF4 base with double
quantization computes what the same LoRA computes on the dequantized weights, trains only the
adapter, and saves the same PEFT adapter as a plain model's."""

import pytest
import torch
from finetune_shared import TOKENS, randomize, saved_families
from torch import nn

from genforge.checkpoint import load_model
from genforge.finetune import (
    LoraConfig,
    LoraError,
    QLoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    save_adapter,
)
from genforge.quantize import NF4Error, NF4Linear, dequantize_nf4, quantize_linears_nf4

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return saved_families(tmp_path_factory)


def quantized(directory):
    model = load_model(directory)
    quantize_linears_nf4(model)
    return model


def dequantized(directory):
    """The quantized model with each NF4 layer turned back into a plain nn.Linear of its dequantized weight."""
    model = quantized(directory)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(dequantize_nf4(module.quantized_weight()))
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, plain)
    return model


def qlora_and_reference(directory, **config):
    qlora = apply_lora(quantized(directory), LoraConfig(**config))
    reference = apply_lora(dequantized(directory), LoraConfig(**config))
    randomize(qlora.named_parameters())
    randomize(reference.named_parameters())
    return qlora, reference


def test_qlora_forward_equals_lora_on_the_dequantized_weights(base_dir):
    qlora, reference = qlora_and_reference(base_dir("llama"), **CONFIG)
    layer = qlora.get_submodule("blocks.0.attn.qkv")
    assert isinstance(layer, QLoraLinear) and layer.weight.dtype == torch.uint8
    assert layer.lora_A["q_proj"].dtype == torch.float32
    # No full-precision copy of the base weight anywhere: the layer's tensors are all far smaller.
    for module in qlora.modules():
        if isinstance(module, QLoraLinear):
            for name, tensor in module.state_dict().items():
                assert tensor.numel() * tensor.element_size() < module.in_features * module.out_features, name
    with torch.no_grad():
        got, expected = qlora(TOKENS).logits, reference(TOKENS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The LoRA changes the output: the comparison is not of two base models.
    plain = quantized(base_dir("llama"))
    with torch.no_grad():
        assert (got - plain(TOKENS).logits).abs().max() > 1e-3


def test_state_dict_keeps_the_quantized_base_keys(base_dir):
    base_keys = set(quantized(base_dir("llama")).state_dict())
    qlora, _ = qlora_and_reference(base_dir("llama"), **CONFIG)
    keys = set(qlora.state_dict())
    assert keys - base_keys == set(lora_state_dict(qlora))
    assert base_keys <= keys
    assert "blocks.0.attn.qkv.weight_absmax" in keys and "blocks.0.attn.qkv.weight_nested_absmax" in keys


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: biases on every linear layer
def test_only_lora_parameters_get_gradients_and_change(base_dir, family):
    config = dict(CONFIG, target_modules=["c_attn", "c_fc"]) if family == "gpt2" else CONFIG
    qlora, reference = qlora_and_reference(base_dir(family), **config)
    before = {name: tensor.clone() for name, tensor in qlora.state_dict().items()}
    trainable = {name for name, p in qlora.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(qlora)) and trainable
    loss = qlora(TOKENS).logits.logsumexp(-1).mean()
    loss.backward()
    for name, parameter in qlora.named_parameters():
        assert (parameter.grad is not None) == (name in trainable), name
    assert all(buffer.grad is None for buffer in qlora.buffers())
    if family == "gpt2":
        assert qlora.get_submodule("blocks.0.attn.qkv").bias.grad is None
    # The same gradients as LoRA on the dequantized weights.
    reference(TOKENS).logits.logsumexp(-1).mean().backward()
    reference_parameters = dict(reference.named_parameters())
    for name in trainable:
        torch.testing.assert_close(
            qlora.get_parameter(name).grad, reference_parameters[name].grad, atol=1e-5, rtol=1e-4
        )
    torch.optim.AdamW(qlora.parameters(), lr=1e-2).step()
    changed = {name for name, tensor in qlora.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == set(lora_state_dict(qlora))


def test_a_qlora_adapter_loads_into_the_full_precision_model(base_dir, tmp_path):
    qlora, reference = qlora_and_reference(base_dir("llama"), **CONFIG)
    save_adapter(qlora, tmp_path / "adapter")
    save_adapter(reference, tmp_path / "reference")
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == (
        tmp_path / "reference" / "adapter_config.json"
    ).read_text()
    plain = load_adapter(load_model(base_dir("llama")), tmp_path / "adapter")
    saved = lora_state_dict(qlora)
    loaded = lora_state_dict(plain)
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name
    # And back onto a quantized model, as PEFT loads an adapter onto a 4-bit base.
    again = load_adapter(quantized(base_dir("llama")), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS).logits, qlora(TOKENS).logits, atol=0, rtol=0)


def test_merging_into_nf4_is_refused_and_changes_nothing(base_dir):
    qlora, _ = qlora_and_reference(base_dir("llama"), **CONFIG)
    before = {name: tensor.clone() for name, tensor in qlora.state_dict().items()}
    for merge in (merge_lora, merge_and_unload):
        with pytest.raises(LoraError, match="cannot merge a LoRA into an NF4.*Dequantize first"):
            merge(qlora)
    assert all(torch.equal(tensor, before[name]) for name, tensor in qlora.state_dict().items())
    assert isinstance(qlora.get_submodule("blocks.0.attn.qkv"), QLoraLinear)


def test_dora_on_nf4_is_refused_before_the_model_changes(base_dir):
    model = quantized(base_dir("llama"))
    with pytest.raises(LoraError, match="DoRA on an NF4"):
        apply_lora(model, LoraConfig(**CONFIG, use_dora=True))
    assert isinstance(model.get_submodule("blocks.0.attn.qkv"), NF4Linear)
    assert not any(isinstance(module, QLoraLinear) for module in model.modules())


def test_quantizing_after_apply_lora_is_refused(base_dir):
    model = apply_lora(load_model(base_dir("llama")), LoraConfig(**CONFIG))
    with pytest.raises(NF4Error, match="already has LoRA layers.*quantize_linears_nf4 first, then apply_lora"):
        quantize_linears_nf4(model)
    assert not any(isinstance(module, NF4Linear) for module in model.modules())


@pytest.mark.parametrize("chunk_values", [1 << 24, 64 * 32])  # one product, and 4 chunks of 32 rows
def test_nf4_product_gradients_equal_the_dequantized_ones(chunk_values):
    torch.manual_seed(0)
    linear = nn.Linear(64, 128)
    layer = NF4Linear(NF4Linear.from_linear(linear).quantized_weight(), linear.bias, chunk_values)
    layer.bias.requires_grad_(True)  # a trainable bias gets its gradient too
    weight = dequantize_nf4(layer.quantized_weight())
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, layer.bias), grad)
    bias = layer.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    expected = torch.autograd.grad(torch.nn.functional.linear(x2, weight, bias), (x2, bias), grad)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_training_keeps_no_dequantized_weight_for_backward(base_dir):
    qlora, reference = qlora_and_reference(base_dir("llama"), **CONFIG)
    shapes = {
        (module.out_features, module.in_features) for module in qlora.modules() if isinstance(module, QLoraLinear)
    }

    def saved_weights(model):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            model(TOKENS).logits.sum().backward()
        return [shape for shape in saved if shape in shapes]

    assert saved_weights(reference)  # plain LoRA keeps each fp32 weight for the input gradient
    assert saved_weights(qlora) == []  # QLoRA keeps the 4-bit codes only
