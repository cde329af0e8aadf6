"""Switch routing (Fedus et al. 2022): top-1 experts with a capacity, token dropping, router
jitter, the Switch load-balancing loss and ST-MoE's router z-loss, against transformers'
SwitchTransformers router, sparse MLP and loss functions; a Switch decoder trains."""

import json
import math

import pytest
import torch
import transformers
from factories import tiny_model
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
    SwitchTransformersTop1Router,
    load_balancing_loss_func,
    router_z_loss_func,
)

from genforge.config import Config, ConfigError
from genforge.model import (
    MixtureOfExperts,
    dropped_token_share,
    router_z_loss,
    switch_load_balancing_loss,
    switch_route,
)

EXPERTS, HIDDEN, INNER = 4, 16, 24


def switch_config(**overrides) -> Config:
    fields = dict(
        family="mixtral",
        vocab_size=64,
        hidden_size=HIDDEN,
        num_layers=2,
        num_heads=2,
        intermediate_size=INNER,
        num_experts=EXPERTS,
        num_experts_per_token=1,
        router="switch",
        gated_mlp=False,
        activation="gelu_tanh",
    )
    return Config(**(fields | overrides))


def hf_switch_config(capacity: int) -> transformers.SwitchTransformersConfig:
    return transformers.SwitchTransformersConfig(
        d_model=HIDDEN,
        d_ff=INNER,
        num_experts=EXPERTS,
        expert_capacity=capacity,
        router_bias=False,
        router_jitter_noise=0.0,
        dense_act_fn="gelu_new",
        dropout_rate=0.0,
    )


def skewed_hidden(seed=0, batch=2, seq=12):
    """Hidden states whose router logits favour one expert, so that capacity bites."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, HIDDEN, generator=g)


def paired(capacity: int, seed: int = 0):
    """transformers' sparse MLP and genforge's Switch layer with the same weights."""
    torch.manual_seed(seed)
    hf = SwitchTransformersSparseMLP(hf_switch_config(capacity)).eval()
    ours = MixtureOfExperts(switch_config(expert_capacity=capacity)).eval()
    with torch.no_grad():
        weight = hf.router.classifier.weight
        weight[0] += 0.5 * weight[1:].abs().sum(0)  # expert 0 is popular
        ours.router.weight.copy_(weight)
        for e, expert in enumerate(ours.experts):
            expert.up.weight.copy_(hf.experts[f"expert_{e}"].wi.weight)
            expert.down.weight.copy_(hf.experts[f"expert_{e}"].wo.weight)
    return hf, ours


@pytest.mark.parametrize("capacity", [2, 3, 12])
def test_router_equals_transformers_top1_router(capacity):
    hf, ours = paired(capacity)
    assert isinstance(hf.router, SwitchTransformersTop1Router)
    hidden = skewed_hidden()
    with torch.no_grad():
        hf_dispatch, hf_probs, hf_logits = hf.router(hidden.clone())
        logits = torch.nn.functional.linear(hidden, ours.router.weight)
        routing = switch_route(logits, ours.capacity(hidden.shape[1]))
    torch.testing.assert_close(logits, hf_logits)
    dispatch = torch.nn.functional.one_hot(routing.expert, EXPERTS) * routing.kept[..., None]
    assert torch.equal(dispatch, hf_dispatch)
    torch.testing.assert_close(routing.probability, hf_probs.squeeze(-1))
    if capacity < 12:
        assert not routing.kept.all()  # the test really drops tokens
    else:
        assert routing.kept.all()


@pytest.mark.parametrize("capacity", [2, 5])
def test_layer_output_equals_transformers_sparse_mlp(capacity):
    """Kept tokens: the expert's output scaled by the top-1 probability; dropped: zero, so the
    residual carries them on unchanged."""
    hf, ours = paired(capacity, seed=1)
    hidden = skewed_hidden(seed=1)
    with torch.no_grad():
        expected = hf(hidden.clone())
        got, logits = ours(hidden)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert logits.shape == (hidden.shape[0] * hidden.shape[1], EXPERTS)
    routing = switch_route(logits.view(*hidden.shape[:2], EXPERTS), capacity)
    assert got[~routing.kept].eq(0).all() and got[routing.kept].ne(0).any()
    assert dropped_token_share(ours) == pytest.approx(float((~routing.kept).float().mean()))
    assert dropped_token_share(ours) is None  # reset by the first read


def test_losses_equal_transformers():
    g = torch.Generator().manual_seed(3)
    batch, seq = 3, 7
    layers = [torch.randn(batch * seq, EXPERTS, generator=g) * 2 for _ in range(2)]
    stacked = torch.cat([layer.view(batch, seq, EXPERTS) for layer in layers], dim=1)
    expected = load_balancing_loss_func(torch.softmax(stacked, dim=-1), stacked.argmax(dim=-1))
    torch.testing.assert_close(switch_load_balancing_loss(layers, EXPERTS, groups=batch), expected)
    torch.testing.assert_close(router_z_loss(layers), router_z_loss_func(stacked))
    # uniform routing gives the minimum, 1; all tokens on one expert gives num_experts
    uniform = torch.eye(EXPERTS).repeat(2, 1) * 1e-3
    assert switch_load_balancing_loss([uniform], EXPERTS).item() == pytest.approx(1.0, abs=1e-3)
    collapsed = torch.zeros(8, EXPERTS)
    collapsed[:, 2] = 30.0
    assert switch_load_balancing_loss([collapsed], EXPERTS).item() == pytest.approx(EXPERTS, rel=1e-3)


def test_capacity_from_factor_and_unlimited():
    layer = MixtureOfExperts(switch_config(expert_capacity_factor=1.25))
    assert layer.capacity(10) == math.ceil(1.25 * 10 / EXPERTS) == 4
    unlimited = MixtureOfExperts(switch_config())
    assert unlimited.capacity(10) is None
    with torch.no_grad():
        unlimited(skewed_hidden())
    assert dropped_token_share(unlimited) == 0.0


def test_jitter_applies_in_training_only():
    torch.manual_seed(0)
    layer = MixtureOfExperts(switch_config(router_jitter_noise=0.2))
    hidden = skewed_hidden()
    with torch.no_grad():
        layer.eval()
        first, second = layer(hidden)[1], layer(hidden)[1]
        layer.train()
        jittered = layer(hidden)[1]
    assert torch.equal(first, second)
    assert not torch.allclose(first, jittered)


def test_bad_switch_configs_are_refused():
    with pytest.raises(ConfigError, match="num_experts_per_token=1"):
        switch_config(num_experts_per_token=2)
    with pytest.raises(ConfigError, match="not both"):
        switch_config(expert_capacity=4, expert_capacity_factor=1.0)
    with pytest.raises(ConfigError, match="expert_capacity_factor must be a number > 0"):
        switch_config(expert_capacity_factor=0)
    with pytest.raises(ConfigError, match="router='dense' is not supported; accepted: topk, switch"):
        switch_config(router="dense")
    with pytest.raises(ConfigError, match="router_jitter_noise"):
        switch_config(router_jitter_noise=1.5)
    with pytest.raises(ConfigError, match="no transformers decoder-only architecture"):
        switch_config().to_hf()


@pytest.mark.slow
def test_switch_decoder_trains_and_reports_dropped_tokens(tmp_path):
    from genforge.train import TokenDataset, TrainConfig, Trainer

    model = tiny_model(
        family="mixtral",
        num_experts=4,
        num_experts_per_token=1,
        router="switch",
        expert_capacity_factor=1.0,
        router_jitter_noise=0.01,
        router_z_loss_coef=1e-3,
    )
    # a repeating pattern, learnable in a few steps
    data = TokenDataset(torch.arange(3, 19).repeat(40), 16)
    settings = dict(out_dir=tmp_path, max_steps=8, batch_size=4, lr=1e-2, warmup_steps=1, seed=0, progress=False)
    result = Trainer(model, data, TrainConfig(**settings, export=False)).train()
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0] * 0.8
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    shares = [r["dropped_tokens"] for r in records if "dropped_tokens" in r]
    assert len(shares) == 8 and all(0.0 <= s < 1.0 for s in shares)
