"""genforge.train.optim: parameter groups and the warmup-cosine schedule, by hand and against transformers."""

import math

import pytest
import torch
from factories import tiny_model

from genforge.train import build_optimizer, build_scheduler, clip_gradients, split_parameter_groups, warmup_cosine_lr


def test_schedule_values_by_hand():
    lr = lambda s: warmup_cosine_lr(s, 1.0, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)  # noqa: E731
    assert [lr(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # Half way through the 8 decay steps the cosine is at 0.5: 0.1 + 0.9 * 0.5.
    assert lr(8) == pytest.approx(0.55, abs=1e-12)
    assert lr(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)
    assert lr(12) == pytest.approx(0.1, abs=1e-12)
    assert lr(100) == pytest.approx(0.1, abs=1e-12)  # flat after the end
    assert warmup_cosine_lr(0, 3e-4, 0, 10) == pytest.approx(3e-4)  # no warmup starts at the peak


def test_schedule_matches_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    model = torch.nn.Linear(2, 2)
    theirs = get_cosine_schedule_with_warmup(torch.optim.SGD(model.parameters(), lr=1.0), 3, 11)
    ours = build_scheduler(torch.optim.SGD(model.parameters(), lr=1.0), 3, 11)
    for _ in range(12):  # past total_steps transformers starts a new cosine cycle; ours stays at the floor
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], abs=1e-12)
        ours.optimizer.step(), theirs.optimizer.step()
        ours.step(), theirs.step()


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_lr(0, 1.0, warmup_steps=5, total_steps=3)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        warmup_cosine_lr(0, 1.0, 0, 3, min_lr_ratio=2.0)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_groups_exclude_norms_biases_embeddings(tied):
    model = tiny_model(tie_word_embeddings=tied, qkv_bias=True)
    decay, no_decay = split_parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed_tokens.weight" in no_decay_names
    assert all(("norm" in n or n.endswith(".bias") or n.startswith("embed")) for n in no_decay_names)
    assert "blocks.0.attn.qkv.bias" in no_decay_names and "final_norm.weight" in no_decay_names
    assert "blocks.0.attn.qkv.weight" in decay_names and "blocks.1.mlp.down.weight" in decay_names
    assert ("lm_head.weight" in decay_names) == (not tied)
    # Every parameter in exactly one group, a tied tensor once.
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_clip_gradients_returns_the_norm_and_clips():
    model = torch.nn.Linear(3, 1, bias=False)
    model.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])
    assert clip_gradients(model, None) == pytest.approx(5.0)
    assert clip_gradients(model, 1.0) == pytest.approx(5.0)
    assert float(model.weight.grad.norm()) == pytest.approx(1.0, rel=1e-5)
