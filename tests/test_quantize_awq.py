"""AWQ (genforge.quantize.awq): the scale folds are exact (the fp model computes the same),
the searches never do worse than their neutral choice, the model pass, and held-out
perplexity of a trained tiny model against RTN INT4."""

import pytest
import quantize_shared
import torch
from factories import tiny_encoder, tiny_model

from genforge.quantize import awq
from genforge.quantize.awq import AWQError, awq_quantize_model
from genforge.quantize.grid import dequantize_int4, quantize_int4

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def randomize_norms(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # Llama: GQA, gated MLP, RMSNorm
        {"qkv_bias": True, "mlp_bias": True, "norm": "layernorm", "activation": "gelu"},
        {"family": "gemma", "norm_weight_offset": 1.0, "activation": "gelu_tanh"},
        {"family": "mixtral", "num_experts": 3, "num_experts_per_token": 2},
        {"num_kv_heads": 1, "qk_norm": True},
    ],
)
def test_folding_random_scales_keeps_the_fp_model(overrides):
    model = tiny_model(hidden_size=64, intermediate_size=64, **overrides).eval()
    randomize_norms(model)
    with torch.no_grad():
        before = model(IDS).logits
        selected = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks" in name}
        for index, block in enumerate(model.blocks):
            unscaled = {}
            for site in awq._sites(block, f"blocks.{index}", selected, unscaled):
                width = site.consumers[0][1].in_features // site.heads_per_value
                scales = torch.rand(width, generator=torch.Generator().manual_seed(index)) * 3 + 0.2
                site.fold(scales)
                for _, layer in site.consumers:
                    layer.weight.mul_(awq._expand(scales, site))
            assert unscaled == {}
        after = model(IDS).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_layers_without_an_exact_fold_are_left_unscaled_and_said_so():
    plain_mlp = tiny_model(hidden_size=64, intermediate_size=64, gated_mlp=False, activation="gelu")
    result = awq_quantize_model(plain_mlp, [IDS[0]], group_size=32, grid_points=4, clip=False)
    assert set(result.unscaled) == {"blocks.0.mlp.down", "blocks.1.mlp.down"}
    assert "not linear" in result.unscaled["blocks.0.mlp.down"]
    encoder = tiny_encoder(hidden_size=64, intermediate_size=64)
    result = awq_quantize_model(encoder, [IDS[0]], group_size=32, grid_points=4, clip=False)
    assert "post-norm" in result.unscaled["blocks.0.attn.qkv"]
    assert "post-norm" in result.unscaled["blocks.0.mlp.up"]
    assert "blocks.0.attn.o" in result.alphas  # o still folds into the value rows


def test_mixture_of_experts_pass_covers_every_expert():
    model = tiny_model(hidden_size=64, intermediate_size=64, family="mixtral", num_experts=4, num_experts_per_token=1)
    result = awq_quantize_model(model.eval(), [IDS[0][:3]], group_size=32, grid_points=3)
    experts = [f"blocks.{b}.mlp.experts.{e}.{n}" for b in range(2) for e in range(4) for n in ("gate_up", "down")]
    assert set(experts) <= set(result.grids) and "blocks.0.mlp.router" not in result.grids
    # Three tokens, one expert each: some expert's down saw none and is said so, not scaled.
    assert any("no calibration token" in reason for reason in result.unscaled.values())


def test_scale_search_never_does_worse_than_no_scaling():
    model = tiny_model(hidden_size=64, intermediate_size=64).eval()
    randomize_norms(model)
    block = model.blocks[0]
    from genforge.quantize.calibration import capture_block_inputs

    calls = capture_block_inputs(model, list(IDS))
    with torch.no_grad():
        for site in awq._sites(block, "blocks.0", {"blocks.0.attn.qkv", "blocks.0.mlp.gate_up"}, {}):
            weights = [layer.weight.clone() for _, layer in site.consumers]
            inputs, consumer_input = awq._record(block, calls, site)
            scales, alpha, plain_error, best_error = awq._search_scales(site, inputs, consumer_input, 10, 32)
            assert best_error <= plain_error and 0.0 <= alpha < 1.0
            assert all(torch.equal(w, layer.weight) for w, (_, layer) in zip(weights, site.consumers))


def test_clip_search_lowers_each_groups_error():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 64, generator=generator)
    weight[:, 3] *= 8  # an outlier column widens its groups' range
    x = torch.randn(200, 64, generator=generator)
    clipped = awq._search_clip(weight, x, 32, 20, 0.5, 4096)
    assert not torch.equal(clipped, weight)

    def group_error(w):
        q = dequantize_int4(quantize_int4(w, 32))
        return awq._group_error(x.reshape(-1, 2, 32), (weight - q).reshape(16, 2, 32))

    assert torch.all(group_error(clipped) <= group_error(weight) + 1e-5)


def test_model_pass_folds_in_place_and_keeps_the_head():
    model = tiny_model(hidden_size=64, intermediate_size=64).eval()
    head = model.lm_head.weight.detach().clone()
    norm = model.blocks[0].attn_norm.weight.detach().clone()
    rows = [torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    lines = []
    result = awq_quantize_model(model, rows, group_size=32, grid_points=5, progress=lines.append)
    assert len(result.grids) == 8 and set(result.alphas) == set(result.grids) and len(lines) == 8
    assert all(0.0 <= a < 1.0 for a in result.alphas.values())
    for name, grid in result.grids.items():
        assert torch.equal(model.get_submodule(name).weight, dequantize_int4(grid))
    assert torch.equal(model.lm_head.weight, head)
    if result.alphas["blocks.0.attn.qkv"] > 0:
        assert not torch.equal(model.blocks[0].attn_norm.weight, norm)


def test_bad_settings_are_refused():
    model = tiny_model(hidden_size=64, intermediate_size=48)
    with pytest.raises(AWQError, match="blocks.0.mlp.down"):
        awq_quantize_model(model, [IDS[0]], group_size=32)
    with pytest.raises(AWQError, match="grid_points"):
        awq_quantize_model(model, [IDS[0]], group_size=32, grid_points=0, exclude=["down"])
    with pytest.raises(AWQError, match="max_shrink"):
        awq_quantize_model(model, [IDS[0]], group_size=32, max_shrink=1.0, exclude=["down"])


@pytest.mark.slow
def test_held_out_perplexity_below_round_to_nearest():
    trained = quantize_shared.trained_model()
    rtn = quantize_shared.held_out_perplexity(quantize_shared.with_grids(trained, quantize_shared.rtn_grids(trained)))
    model = quantize_shared.trained_model()
    result = awq_quantize_model(model, quantize_shared.calibration_rows(), group_size=quantize_shared.GROUP_SIZE)
    # The grids belong with the model's folded norms: put them into that model.
    quantized = quantize_shared.held_out_perplexity(quantize_shared.with_grids(model, result.grids))
    fp = quantize_shared.held_out_perplexity(trained)
    assert quantized < rtn, (fp, quantized, rtn)
