"""Early exit (CALM): the shared head's per-layer losses, the multi-layer objective in the
Trainer, and decoding that exits early, skips compute and never exits at threshold 1."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_encoder, tiny_model

from genforge.cache import ContiguousKVCache
from genforge.early_exit import (
    EarlyExitError,
    EarlyExitObjective,
    LanguageModelRows,
    confidence,
    depth_weights,
    early_exit_generate,
    early_exit_perplexity,
    exit_logits,
    layer_losses,
    propagate_kv,
)
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.train import TokenDataset, TrainConfig, Trainer


def truncated(model, layers: int):
    """The same model with only its first `layers` blocks: a direct computation of layer
    `layers`'s prediction through the shared head."""
    short = copy.deepcopy(model)
    short.blocks = short.blocks[:layers]
    return short


def test_layer_losses_equal_truncated_models():
    model = tiny_model(num_layers=3).eval()
    ids = torch.randint(0, 64, (2, 12))
    losses = layer_losses(model, ids)
    for layer in range(3):
        logits = truncated(model, layer + 1)(ids).logits
        direct = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(losses[layer], direct, atol=1e-6, rtol=0)


def test_confidence_measures():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]))
    torch.testing.assert_close(confidence(logits, "max_prob"), torch.tensor([0.5, 0.9]))
    torch.testing.assert_close(confidence(logits, "margin"), torch.tensor([0.2, 0.85]))
    with pytest.raises(EarlyExitError, match="accepted: max_prob, margin"):
        confidence(logits, "entropy")


def test_depth_weights_rise_with_depth():
    torch.testing.assert_close(depth_weights(4), torch.tensor([1.0, 2.0, 3.0, 4.0]) / 10)


@pytest.mark.slow
def test_objective_loss_is_the_weighted_sum_and_trains(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(num_layers=3)
    objective = EarlyExitObjective(3)
    ids = torch.randint(0, 64, (4, 16))
    loss, metrics = objective.micro_loss(model, model, {"input_ids": ids}, objective.weight({"input_ids": ids}))
    per_layer = layer_losses(model, ids)
    torch.testing.assert_close(loss, (depth_weights(3) * per_layer).sum(), atol=1e-6, rtol=0)
    assert metrics["loss_layer_2"] == pytest.approx(float(per_layer[1].detach()), abs=1e-6)
    # Through the Trainer: a repetitive corpus is learnt at every layer, not only the last.
    tokens = torch.arange(64).repeat(40) % 16
    data = LanguageModelRows(TokenDataset(tokens, seq_len=16))
    before = layer_losses(model, data.batch(range(8))["input_ids"]).detach()
    config = TrainConfig(out_dir=tmp_path, max_steps=20, batch_size=8, lr=3e-3, progress=False, export=False)
    result = Trainer(model, data, config, val_data=data, objective=objective).train()
    after = layer_losses(model.eval(), data.batch(range(8))["input_ids"]).detach()
    assert (after < before - 0.5).all()
    assert result.evals[-1]["val_loss"] == pytest.approx(float((depth_weights(3) * after).sum()), rel=0.05)


def test_threshold_one_decodes_the_full_models_greedy_tokens():
    model = tiny_model(num_layers=3).eval()
    prompt = [5, 9, 2, 33, 7]
    full = generate(model, [prompt], SamplingParams(temperature=0.0, max_new_tokens=12))[0].token_ids
    result = early_exit_generate(model, prompt, 12, threshold=1.0)
    assert result.tokens == list(full)
    assert result.layers_used == [3] * 12


def test_low_threshold_exits_early_and_skips_layers():
    model = tiny_model(num_layers=4).eval()
    calls = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: calls.append(m))
    result = early_exit_generate(model, [1, 2, 3], 8, threshold=1e-6)
    # The prompt's pass runs all 4 layers; every later token exits at layer 1.
    assert result.layers_used == [4] + [1] * 7
    assert len(calls) == 4 + 7
    assert result.average_layers == pytest.approx((4 + 7) / 8)
    # min_layers holds the exit back.
    assert early_exit_generate(model, [1, 2, 3], 4, threshold=1e-6, min_layers=2).layers_used == [4, 2, 2, 2]


def test_propagated_kv_equals_the_layers_own_projection():
    model = tiny_model(num_layers=2).eval()
    ids = torch.tensor([[3, 4, 5]])
    positions = torch.arange(3)[None]
    hidden = model.embed_tokens(ids)
    rope = model.rotary(positions, hidden.dtype)
    cache = ContiguousKVCache(model.config, 1, 3)
    with torch.no_grad():
        propagate_kv(model, 0, hidden, rope, cache)
        reference = ContiguousKVCache(model.config, 1, 3)
        model.blocks[0].attn(model.blocks[0].attn_norm(hidden), rope, None, True, reference)
    torch.testing.assert_close(cache.keys[0][:, :, :3], reference.keys[0][:, :, :3])
    torch.testing.assert_close(cache.values[0][:, :, :3], reference.values[0][:, :, :3])


def test_perplexity_at_threshold_one_is_the_models():
    model = tiny_model(num_layers=2).eval()
    ids = torch.randint(0, 64, (20,))
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    expected = float(torch.exp(F.cross_entropy(logits[:-1], ids[1:])))
    ppl, layers = early_exit_perplexity(model, ids, 1.0)
    assert ppl == pytest.approx(expected, rel=1e-5)
    assert layers == 2
    assert early_exit_perplexity(model, ids, 1e-6)[1] == 1


def test_exit_logits_of_last_layer_are_the_models():
    model = tiny_model().eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        out = model(ids)
        from genforge.early_exit import captured_layer_states

        with captured_layer_states(model) as states:
            model(ids)
    torch.testing.assert_close(exit_logits(model, states[-1]), out.logits)


def test_bad_input_is_refused():
    model = tiny_model()
    with pytest.raises(EarlyExitError, match=r"threshold must be in \(0, 1\]"):
        early_exit_generate(model, [1, 2], 4, threshold=1.5)
    with pytest.raises(EarlyExitError, match="min_layers must be in 1..2"):
        early_exit_generate(model, [1, 2], 4, threshold=0.5, min_layers=3)
    with pytest.raises(EarlyExitError, match="prompt is empty"):
        early_exit_generate(model, [], 4, threshold=0.5)
    with pytest.raises(EarlyExitError, match="encoder"):
        layer_losses(tiny_encoder(), torch.randint(0, 64, (1, 5)))
    with pytest.raises(EarlyExitError, match="2 non-negative numbers"):
        EarlyExitObjective(2, weights=[1.0, -1.0])


def test_cli_generate_early_exit(text_model_dir, capsys):
    from genforge.checkpoint import load_model
    from genforge.cli import main
    from genforge.tokenizer import Tokenizer

    argv = ["generate", "--model", str(text_model_dir), "--prompt", "the cache", "--max-new-tokens", "6"]
    assert main([*argv, "--early-exit", "1.0"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    tokenizer = Tokenizer.from_dir(text_model_dir)
    model = load_model(text_model_dir)
    full = generate(
        model, [tokenizer.encode("the cache")], SamplingParams(temperature=0.0, max_new_tokens=6), tokenizer=tokenizer
    )[0]
    assert printed == full.text  # padded vocabulary rows (the fixture's most likely logits) never chosen
    assert main([*argv, "--early-exit", "1.5"]) == 2
    assert main([*argv, "--early-exit", "0.5", "--strategy", "beam"]) == 2
    assert "does not combine with --strategy beam" in capsys.readouterr().err
