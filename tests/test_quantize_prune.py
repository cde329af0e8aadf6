"""genforge.quantize.prune: magnitude masks against torch.nn.utils.prune, N:M structure, neurons
and heads removed (exported models against transformers' logits), and the `genforge prune` command."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from factories import tiny_model
from finetune_shared import tiny_chat_model_dir
from torch.nn.utils import prune as torch_prune

from genforge.checkpoint import load_model, save_model
from genforge.cli import main
from genforge.quantize.prune import (
    PruneError,
    apply_masks,
    calibration_rows,
    head_importance,
    heads_to_remove,
    hold_masks,
    magnitude_masks,
    n_m_mask,
    n_m_masks,
    neuron_importance,
    prune_heads,
    prune_magnitude,
    prune_model,
    prune_n_m,
    prune_neurons,
    remove_heads,
    weight_sparsity,
)
from genforge.tokenizer import Tokenizer
from genforge.train import TokenDataset, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 3, 44, 9, 12, 8, 61, 33, 2], [7, 7, 21, 40, 2, 45, 19, 56, 4, 30]])
# A model for head pruning: 8 query heads in 2 key/value groups of 4, head_dim 8, and a hidden
# size (96) that 6, 4 and 2 heads divide (transformers' Llama config asks that of the heads).
GQA = dict(hidden_size=96, num_heads=8, num_kv_heads=2, head_dim=8, intermediate_size=64)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _with_ties(model):
    """Weights rounded to a coarse grid, so many magnitudes tie (and some are zero)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_((parameter * 50).round() / 50)
    return model


# ------------------------------------------------------------------------- magnitude masks
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_layer_masks_equal_l1_unstructured(ties, sparsity):
    model = tiny_model().eval()
    if ties:
        _with_ties(model)
    masks = magnitude_masks(model, sparsity, scope="layer")
    reference = copy.deepcopy(model)
    assert list(masks) == [
        f"blocks.{i}.{part}" for i in range(2) for part in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
    ]
    for name, keep in masks.items():
        layer = reference.get_submodule(name)
        torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
        assert torch.equal(keep, layer.weight_mask.bool()), name
        assert int((~keep).sum()) == round(sparsity * keep.numel())


@pytest.mark.parametrize("ties", [False, True])
def test_global_masks_equal_global_unstructured(ties):
    model = tiny_model().eval()
    if ties:
        _with_ties(model)
    masks = magnitude_masks(model, 0.6, scope="global")
    reference = copy.deepcopy(model)
    layers = [(reference.get_submodule(name), "weight") for name in masks]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=0.6)
    for (layer, _), keep in zip(layers, masks.values()):
        assert torch.equal(keep, layer.weight_mask.bool())
    # One threshold: every dropped magnitude is at most every kept one, across layers.
    kept = torch.cat([model.get_submodule(n).weight.detach().abs()[k] for n, k in masks.items()])
    dropped = torch.cat([model.get_submodule(n).weight.detach().abs()[~k] for n, k in masks.items()])
    assert dropped.max() <= kept.min()
    shares = {float((~k).float().mean()) for k in masks.values()}
    assert len(shares) > 1  # unlike per-layer pruning, layers lose different shares


def test_prune_magnitude_zeroes_in_place_and_keeps_shapes():
    model = tiny_model().eval()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    result, masks = prune_magnitude(model, 0.5, scope="layer")
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert result.parameters_after == result.parameters_before
    assert weight_sparsity(model) == pytest.approx(0.5, abs=1e-3)
    assert result.zero_fraction == weight_sparsity(model)
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        assert not weight[~keep].any() and weight[keep].all()
    assert model.lm_head.weight.all()  # the head is not selected by default


# ------------------------------------------------------------------------------------ N:M
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_n_m_keeps_the_n_largest_of_every_group(n, m):
    model = tiny_model().eval()
    original = {name: model.get_submodule(name).weight.detach().clone() for name in n_m_masks(model, n, m)}
    result, masks = prune_n_m(model, n, m)
    assert result.sparsity == 1 - n / m
    for name, before in original.items():
        weight = model.get_submodule(name).weight.detach()
        groups = weight.reshape(weight.shape[0], -1, m)
        assert ((groups != 0).sum(dim=-1) == n).all(), name
        magnitudes = before.abs().reshape(weight.shape[0], -1, m)
        keep = masks[name].reshape(magnitudes.shape)
        smallest_kept = magnitudes.masked_fill(~keep, float("inf")).amin(dim=-1)
        largest_dropped = magnitudes.masked_fill(keep, -1.0).amax(dim=-1)
        assert (smallest_kept >= largest_dropped).all(), name
        assert torch.equal(weight[masks[name]], before[masks[name]])


def test_n_m_mask_on_ties_keeps_exactly_n():
    weight = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    keep = n_m_mask(weight, 2, 4)
    assert keep.view(2, 4).sum(dim=-1).tolist() == [2, 2]


# --------------------------------------------------------------------- recovery training
def test_hold_masks_keeps_pruned_weights_zero_through_training(tmp_path):
    model = tiny_model()
    _, masks = prune_n_m(model)
    before = {name: model.get_submodule(name).weight.detach().clone() for name in masks}
    handles = hold_masks(model, masks)
    data = TokenDataset(torch.randint(0, 64, (64 * 16,)), 16)
    config = TrainConfig(out_dir=tmp_path, max_steps=3, batch_size=4, lr=1e-2, progress=False, export=False)
    Trainer(model, data, config).train()
    for handle in handles:
        handle.remove()
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert not weight[~keep].any(), name
        assert not torch.equal(weight[keep], before[name][keep]), name  # the kept weights did train


# -------------------------------------------------------------------------------- neurons
@pytest.mark.parametrize(
    "overrides",
    [{}, dict(family="gpt2", gated_mlp=False, activation="gelu_tanh", mlp_bias=True, norm="layernorm")],
    ids=["gated", "plain-with-bias"],
)
def test_removing_zero_importance_neurons_leaves_logits_unchanged(overrides):
    model = tiny_model(**overrides).eval()
    with torch.no_grad():
        model.blocks[0].mlp.down.weight[:, [3, 30]] = 0
        model.blocks[1].mlp.down.weight[:, [0, 47]] = 0
    importance = neuron_importance(model)
    assert importance[0, [3, 30]].eq(0).all() and importance[1, [0, 47]].eq(0).all()
    assert (importance > 0).sum() == 2 * 48 - 4
    before = _logits(model)
    result = prune_neurons(model, 2 / 48)
    assert result.config_changes == {"intermediate_size": (48, 46)} and model.config.intermediate_size == 46
    assert result.parameters_before - result.parameters_after == 2 * 2 * 32 * (3 if not overrides else 2) + (
        4 if overrides else 0
    )
    # The removed terms were exact zeros; only the order of the sums in the matrix product
    # changes (BLAS blocks a 48-term dot product differently from a 46-term one).
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-6)


def test_removed_neurons_match_a_float64_reference_to_rounding():
    model = tiny_model().double().eval()
    with torch.no_grad():
        model.blocks[0].mlp.gate_up.weight[[5, 48 + 5]] = 0  # gate and up rows of neuron 5
        model.blocks[1].mlp.gate_up.weight[7] = 0  # the gate row alone: silu(0) * up = 0
    before = _logits(model)
    prune_neurons(model, 1 / 48)
    assert neuron_importance(model).gt(0).all()
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------- heads
def _loss_per_sequence(model, ids):
    logits = model(ids).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def test_head_importance_is_the_mean_absolute_gate_gradient():
    model = tiny_model().eval()
    importance = head_importance(model, IDS, batch_size=2)
    # The reference, without hooks: a gate on head h's output is a scale on its columns of
    # attn.o. One sequence at a time, the gradient of its loss w.r.t. the scales at 1.
    dim, heads = model.config.head_dim, model.config.num_heads
    expected = torch.zeros(len(model.blocks), heads)
    for layer in range(len(model.blocks)):
        trial = copy.deepcopy(model)
        o = trial.blocks[layer].attn.o
        weight = o.weight.detach().clone()
        scales = torch.ones(heads, requires_grad=True)
        o.forward = lambda x, o=o, weight=weight, scales=scales: F.linear(x, weight * scales.repeat_interleave(dim))
        for row in IDS:
            (gradient,) = torch.autograd.grad(_loss_per_sequence(trial, row[None]).sum(), scales)
            expected[layer] += gradient.abs() / len(IDS)
    torch.testing.assert_close(importance, expected, rtol=1e-4, atol=1e-8)
    assert importance.gt(0).all()


def test_head_importance_is_zero_for_a_silent_head_and_batching_does_not_change_it():
    model = tiny_model(**GQA).eval()
    with torch.no_grad():
        model.blocks[1].attn.o.weight[:, 3 * 8 : 4 * 8] = 0
    rows = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    importance = head_importance(model, rows, batch_size=4)
    assert importance[1, 3] == 0 and (importance.flatten().ne(0).sum() == 15)
    torch.testing.assert_close(importance, head_importance(model, rows, batch_size=6), rtol=1e-5, atol=1e-9)


def test_removing_zero_importance_heads_leaves_logits_unchanged():
    model = tiny_model(**GQA).eval()
    silent = [[1, 6], [3, 4]]  # one query head of each group of 4, per layer
    with torch.no_grad():
        for layer, heads in enumerate(silent):
            for head in heads:
                model.blocks[layer].attn.o.weight[:, head * 8 : (head + 1) * 8] = 0
    importance = head_importance(model, IDS)
    before = _logits(model)
    result = prune_heads(model, 2, importance, unit="query")
    assert result.config_changes == {"num_heads": (8, 6)}
    assert model.config.num_kv_heads == 2 and model.blocks[0].attn.qkv.out_features == (6 + 2 * 2) * 8
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-6)


def test_remove_heads_keeps_the_right_rows_and_columns():
    model = tiny_model(**GQA).eval()
    qkv = [block.attn.qkv.weight.detach().clone() for block in model.blocks]
    o = [block.attn.o.weight.detach().clone() for block in model.blocks]
    remove_heads(model, [[4, 5, 6, 7], [0, 1, 2, 3]])  # whole groups: group 1 in layer 0, group 0 in layer 1
    assert (model.config.num_heads, model.config.num_kv_heads) == (4, 1)
    for layer, group in enumerate((1, 0)):
        q = qkv[layer][group * 32 : (group + 1) * 32]
        k = qkv[layer][64 + group * 8 : 64 + (group + 1) * 8]
        v = qkv[layer][80 + group * 8 : 80 + (group + 1) * 8]
        assert torch.equal(model.blocks[layer].attn.qkv.weight, torch.cat((q, k, v)))
        assert torch.equal(model.blocks[layer].attn.o.weight, o[layer][:, group * 32 : (group + 1) * 32])


def test_heads_to_remove_rounds_to_even_groups():
    assert heads_to_remove(8, 2, 0.25) == 2  # one of each group of 4
    assert heads_to_remove(8, 2, 0.5, unit="group") == 4  # one whole group
    assert heads_to_remove(8, 8, 0.25) == 2  # multi-head attention: any heads
    assert heads_to_remove(8, 1, 0.5) == 4  # multi-query attention: one group of 8


# ------------------------------------------------------------------- export to transformers
@pytest.mark.parametrize(
    ("overrides", "unit", "heads"),
    [
        (GQA, "query", 2),
        (GQA, "group", 4),
        (dict(GQA, num_kv_heads=8), "query", 4),
        (dict(GQA, num_kv_heads=1), "query", 4),
        (dict(GQA, family="qwen2", qkv_bias=True), "query", 4),
    ],
    ids=["gqa-query", "gqa-group", "mha", "mqa", "qwen2-bias"],
)
def test_pruned_model_exports_and_transformers_gives_its_logits(tmp_path, overrides, unit, heads):
    model = tiny_model(**overrides).eval()
    with torch.no_grad():  # non-zero biases, so that slicing them is checked too
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.1)
    before = sum(p.numel() for p in model.parameters())
    prune_heads(model, heads, head_importance(model, IDS), unit=unit)
    prune_neurons(model, 0.25)
    assert sum(p.numel() for p in model.parameters()) < before
    save_model(model, tmp_path / "pruned")
    reloaded = load_model(tmp_path / "pruned")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reference.config.num_attention_heads == model.config.num_heads
    assert reference.config.intermediate_size == 48
    with torch.no_grad():
        expected = reference(IDS).logits
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_sparsity_outside_zero_to_one_is_refused(sparsity):
    model = tiny_model()
    for call in (lambda: magnitude_masks(model, sparsity), lambda: prune_neurons(model, sparsity)):
        with pytest.raises(PruneError, match=r"sparsity must be a number in \[0, 1\)"):
            call()


def test_bad_n_m_is_refused():
    model = tiny_model()
    with pytest.raises(PruneError, match="N must not exceed M; got 5:4"):
        prune_n_m(model, 5, 4)
    with pytest.raises(PruneError, match="multiples of 5; these layers are not: blocks.0.attn.qkv"):
        n_m_masks(model, 2, 5)
    with pytest.raises(PruneError, match="give no sparsity"):
        prune_model(model, "2:4", 0.5)
    with pytest.raises(PruneError, match="method must be one of"):
        prune_model(model, "random", 0.5)


def test_pruning_everything_is_refused():
    model = tiny_model(**GQA)
    importance = torch.ones(2, 8)
    with pytest.raises(PruneError, match="leaves none"):
        prune_heads(model, 8, importance)
    with pytest.raises(PruneError, match="leaves none"):
        prune_heads(model, 8, importance, unit="group")
    with pytest.raises(PruneError, match="would remove every head"):
        prune_model(model, "heads", 0.9, calibration=IDS)
    with pytest.raises(PruneError, match="would remove all 64 neurons"):
        prune_neurons(model, 0.999)
    with pytest.raises(PruneError, match="at least one"):
        remove_heads(model, [[], []])


def test_a_sparsity_that_rounds_to_nothing_is_refused():
    with pytest.raises(PruneError, match=r"rounds to 0 of the 2 key/value groups.*above 0.25"):
        prune_model(tiny_model(**GQA), "heads", 0.25, calibration=IDS, head_unit="group")
    with pytest.raises(PruneError, match=r"rounds to 0 of the 4 query heads of each group.*above 0.125"):
        prune_model(tiny_model(**GQA), "heads", 0.1, calibration=IDS)
    with pytest.raises(PruneError, match=r"rounds to 0 of the 64 neurons"):
        prune_neurons(tiny_model(**GQA), 0.005)
    model = tiny_model(**GQA)
    assert prune_neurons(model, 0.0).config_changes == {}  # zero asks for nothing, and gets it


def test_uneven_gqa_groups_are_refused():
    model = tiny_model(**GQA)
    importance = torch.rand(2, 8)
    with pytest.raises(PruneError, match="leaves the 2 key/value groups of 4 uneven.*accepted counts: 0, 2, 4, 6"):
        prune_heads(model, 3, importance)
    with pytest.raises(PruneError, match="count must be a multiple of 4"):
        prune_heads(model, 2, importance, unit="group")
    with pytest.raises(PruneError, match="groups of different sizes"):
        remove_heads(model, [[0, 1, 4], [0, 1, 4]])
    with pytest.raises(PruneError, match="same number of query heads"):
        remove_heads(model, [[0, 4], [0, 1, 4, 5]])
    assert model.config.num_heads == 8 and model.blocks[0].attn.qkv.out_features == 12 * 8  # nothing changed


def test_head_counts_transformers_cannot_load_are_refused():
    model = tiny_model(hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8)
    with pytest.raises(PruneError, match=r"hidden_size \(64\) to be a multiple.*accepts below 8: 1, 2, 4"):
        prune_heads(model, 2, torch.rand(2, 8))
    gpt2 = tiny_model(family="gpt2", gated_mlp=False, norm="layernorm", activation="gelu_tanh")
    with pytest.raises(PruneError, match="head pruning supports llama"):
        prune_heads(gpt2, 2, torch.rand(2, 4))
    moe = tiny_model(family="mixtral", num_experts=2)
    with pytest.raises(PruneError, match="mixture-of-experts"):
        prune_neurons(moe, 0.5)
    with pytest.raises(PruneError, match="calibration"):
        prune_model(tiny_model(**GQA), "heads", 0.25)


def test_calibration_rows():
    assert calibration_rows(list(range(100)), 16, 4).shape == (4, 16)
    assert calibration_rows(list(range(100)), 16, 99).shape == (6, 16)
    with pytest.raises(PruneError, match="fewer than one row of 16"):
        calibration_rows(list(range(10)), 16, 4)


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model_dir(tmp_path_factory.mktemp("prune") / "model", **GQA)


def test_cli_heads_equals_the_library(model_dir, tmp_path, capsys):
    text = "def add(a, b):\n    return a + b\n" * 40
    (tmp_path / "calibration.txt").write_text(text)
    argv = [
        "prune",
        "--model",
        str(model_dir),
        "--method",
        "heads",
        "--sparsity",
        "0.25",
        "--out",
        str(tmp_path / "out"),
    ]
    argv += ["--calibration", str(tmp_path / "calibration.txt"), "--samples", "4", "--seq-len", "32"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config_changes"] == {"num_heads": [8, 6]}
    model = load_model(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = calibration_rows(tokenizer.encode(text, add_special_tokens=False), 32, 4)
    prune_heads(model, 2, head_importance(model, rows))
    pruned = load_model(tmp_path / "out")
    assert pruned.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(pruned.state_dict()[name], tensor), name
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_cli_magnitude_and_2_4_keep_the_shapes(model_dir, tmp_path, capsys):
    for method, extra, zeros in (("magnitude", ["--sparsity", "0.5"], 0.5), ("2:4", [], 0.5)):
        out = tmp_path / method.replace(":", "-")
        assert main(["prune", "--model", str(model_dir), "--method", method, *extra, "--out", str(out)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["parameters_after"] == report["parameters_before"]
        assert weight_sparsity(load_model(out)) == pytest.approx(zeros, abs=1e-3)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--method", "3:2"], "N must not exceed M"),
        (["--method", "neurons", "--sparsity", "1"], "sparsity must be a number in [0, 1)"),
        (["--method", "heads"], "--method heads needs --sparsity"),
        (["--method", "heads", "--sparsity", "0.5", "--calibration", "/nonexistent.txt"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line(model_dir, tmp_path, capsys, extra, words):
    assert main(["prune", "--model", str(model_dir), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_apply_masks_checks_shapes():
    model = tiny_model()
    with pytest.raises(PruneError, match="mask for blocks.0.attn.o has shape"):
        apply_masks(model, {"blocks.0.attn.o": torch.ones(3, 3, dtype=torch.bool)})
