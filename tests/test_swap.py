"""The Linear seam: `swap_linears` replaces linear layers by name pattern and keeps their keys."""

import copy

import pytest
import torch
from torch import nn

from genforge.config import Config
from genforge.model import Transformer
from genforge.onednn import OneDNNLinear, use_onednn
from genforge.swap import linear_names, swap_linears
from genforge.train import TokenDataset, TrainConfig, Trainer

CONFIG = Config(
    family="llama",
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    tie_word_embeddings=True,
)


class Scaled(nn.Linear):
    """A stand-in for an adapter or quantized layer: an nn.Linear subclass that changes the output."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None)
        self.weight, self.bias = layer.weight, layer.bias
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return super().forward(x) * self.scale


def model():
    torch.manual_seed(0)
    return Transformer(CONFIG)


def test_the_model_is_built_from_plain_linears_with_fused_projections():
    names = linear_names(model())
    assert "blocks.0.attn.qkv" in names and "blocks.1.mlp.gate_up" in names and "lm_head" in names
    assert not any(name.endswith((".q", ".k", ".v", ".gate", ".up")) for name in names)
    assert all(type(m) is nn.Linear for m in model().modules() if isinstance(m, nn.Linear))


def test_patterns_select_by_full_name_or_by_last_part():
    m = model()
    assert linear_names(m, ["qkv"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert linear_names(m, ["blocks.1.*"]) == [
        "blocks.1.attn.qkv",
        "blocks.1.attn.o",
        "blocks.1.mlp.gate_up",
        "blocks.1.mlp.down",
    ]
    assert linear_names(m, ["blocks.*.attn.*"], exclude=["o"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert "lm_head" not in linear_names(m, exclude=["lm_head"])


def test_a_pattern_that_matches_nothing_is_refused_with_the_names_there_are():
    with pytest.raises(ValueError, match=r"no linear layer matches 'q_proj'.*qkv"):
        linear_names(model(), ["q_proj"])
    with pytest.raises(TypeError, match="list of patterns"):
        linear_names(model(), "qkv")


def test_a_swapped_layer_keeps_the_state_dict_key_of_the_layer_it_replaces():
    m = model()
    keys = list(m.state_dict())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    before = m(ids).logits
    swapped = swap_linears(m, lambda layer, name: Scaled(layer), include=["qkv", "down"])
    assert swapped == ["blocks.0.attn.qkv", "blocks.0.mlp.down", "blocks.1.attn.qkv", "blocks.1.mlp.down"]
    assert all(isinstance(m.get_submodule(name), Scaled) for name in swapped)
    assert set(keys) <= set(m.state_dict())  # the old keys, plus each wrapper's own
    assert sorted(set(m.state_dict()) - set(keys)) == [f"{name}.scale" for name in swapped]
    torch.testing.assert_close(m(ids).logits, before)  # scale 1: the same function
    with torch.no_grad():
        m.blocks[0].attn.qkv.scale.fill_(0.5)
    assert not torch.allclose(m(ids).logits, before)


def test_the_factory_sees_each_layer_and_its_name():
    seen = []
    swap_linears(model(), lambda layer, name: seen.append((name, layer.out_features)) or layer, include=["o"])
    assert seen == [("blocks.0.attn.o", 32), ("blocks.1.attn.o", 32)]


def test_a_module_shared_by_two_parents_is_replaced_once_everywhere():
    parent = nn.Module()
    parent.a, parent.b = nn.Module(), nn.Module()
    shared = nn.Linear(3, 3)
    parent.a.proj = parent.b.proj = shared
    calls = []
    swap_linears(parent, lambda layer, name: calls.append(name) or Scaled(layer))
    assert calls == ["a.proj"] and parent.a.proj is parent.b.proj and isinstance(parent.a.proj, Scaled)


def test_use_onednn_shares_the_parameters_and_leaves_other_kinds_alone():
    m = model()
    reference = copy.deepcopy(m)
    swap_linears(m, lambda layer, name: Scaled(layer), include=["o"])
    use_onednn(m)
    kinds = {name: type(m.get_submodule(name)) for name in linear_names(m)}
    assert {kinds[n] for n in kinds if n.endswith(".o")} == {Scaled}
    assert {kinds[n] for n in kinds if not n.endswith(".o")} == {OneDNNLinear}
    assert m.lm_head.weight is m.embed_tokens.weight  # still tied
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    use_onednn(m)  # a second call changes nothing
    assert {name: type(m.get_submodule(name)) for name in linear_names(m)} == kinds


def test_the_trainer_sends_linear_layers_through_onednn_on_cpu(tmp_path):
    m = model()
    keys = list(m.state_dict())
    data = TokenDataset(torch.randint(3, 64, (256,), generator=torch.Generator().manual_seed(0)), 16)
    trainer = Trainer(m, data, TrainConfig(out_dir=tmp_path, max_steps=1, batch_size=2, progress=False, export=False))
    assert all(type(layer) is OneDNNLinear for layer in m.modules() if isinstance(layer, nn.Linear))
    assert list(trainer.model.state_dict()) == keys
