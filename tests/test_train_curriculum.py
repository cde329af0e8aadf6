"""Curriculum learning (easy examples first, resumable) and scheduled sampling (the model's own
tokens fed back with a rising probability)."""

import json
import math
from pathlib import Path

import factories
import pytest
import torch
from test_train_trainer import SEQ_LEN, corpus, make_trainer

from genforge.train import TokenDataset, TrainError
from genforge.train.curriculum import (
    CurriculumSampler,
    length_difficulty,
    loss_difficulty,
    open_fraction,
    rarity_difficulty,
)
from genforge.train.data import DataError
from genforge.train.exposure import mix_in_predictions, own_token_probability


def test_schedules_open_the_data_from_start_to_all():
    for schedule in ("competence", "linear", "baby_steps"):
        shares = [open_fraction(schedule, t / 10, 0.2) for t in range(11)]
        assert shares[0] == pytest.approx(0.2) and shares[-1] == pytest.approx(1.0)
        assert shares == sorted(shares)
    # Competence (Platanios et al. 2019): sqrt(t (1 - c0^2) + c0^2).
    assert open_fraction("competence", 0.5, 0.2) == pytest.approx(math.sqrt(0.5 * 0.96 + 0.04))
    assert {open_fraction("baby_steps", t / 100, 0.25, stages=4) for t in range(100)} == {0.25, 0.5, 0.75, 1.0}


def test_sampler_draws_only_open_examples_and_resumes_exactly():
    difficulty = torch.arange(100, 0, -1).double()  # example 99 is the easiest
    sampler = CurriculumSampler(difficulty, total_samples=400, schedule="linear", start=0.1, ramp=0.5, seed=3)
    first = sampler.take(10)
    assert set(first) <= set(range(90, 100)) and len(set(first)) == 10  # the easiest tenth, no repeats
    sampler.take(190)  # past the ramp: everything is open
    assert sampler.pool_size() == 100
    state = sampler.state_dict()
    ahead = sampler.take(32)
    again = CurriculumSampler(difficulty, total_samples=400, schedule="linear", start=0.1, ramp=0.5, seed=3)
    again.load_state_dict(state)
    assert again.take(32) == ahead
    with pytest.raises(DataError, match="same data, seed and curriculum"):
        CurriculumSampler(difficulty[:50], total_samples=400, schedule="linear", seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="accepted: competence"):
        CurriculumSampler(difficulty, total_samples=10, schedule="hardest_first")


def test_difficulty_scores():
    assert length_difficulty([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]
    common, rare = [5, 5, 5, 5], [9, 8, 7, 6]
    scores = rarity_difficulty([common, common, rare], vocab_size=10)
    assert scores[2] > scores[0] == scores[1]
    model = factories.tiny_model().eval()
    data = TokenDataset(corpus(), SEQ_LEN)
    losses = loss_difficulty(model, data, batch_size=8)
    assert losses.shape == (len(data),) and torch.isfinite(losses).all()


def test_trainer_runs_a_curriculum_and_resumes_it(tmp_path):
    data = TokenDataset(corpus(), SEQ_LEN)
    difficulty = rarity_difficulty([data.batch([i])[0] for i in range(len(data))], vocab_size=64)

    def run(out, steps, resume=False):
        sampler = CurriculumSampler(difficulty, total_samples=8 * 4, start=0.25, seed=1)
        trainer = make_trainer(out, data=data, max_steps=8, save_every=4, eval_every=0, sampler=sampler)
        if resume:
            trainer.load_checkpoint()
        for _ in range(steps):
            trainer.train_step(trainer._next_batches())
            if trainer.step % 4 == 0:
                trainer.save_checkpoint()
        return trainer

    straight = run(tmp_path / "a", 8)
    resumed = run(tmp_path / "b", 4)
    resumed = run(tmp_path / "b", 4, resume=True)
    assert resumed.sampler.drawn == straight.sampler.drawn == 32
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_own_token_probability_rises_to_its_final_value():
    for decay in ("linear", "exponential", "inverse_sigmoid"):
        values = [own_token_probability(step, 100, 0.5, decay) for step in range(0, 101, 10)]
        assert values[0] == pytest.approx(0.0, abs=0.02) and values[-1] == pytest.approx(0.5, abs=0.02)
        assert values == sorted(values)
    with pytest.raises(ValueError, match="accepted: linear"):
        own_token_probability(1, 10, 0.5, "cosine")


def test_mixing_swaps_inputs_for_the_previous_positions_predictions():
    inputs = torch.tensor([[1, 2, 3, 4, 5]])
    predictions = torch.tensor([[20, 30, 40, 50, 60]])  # predictions[:, t] is the guess for inputs[:, t + 1]
    assert torch.equal(mix_in_predictions(inputs, predictions, 0.0), inputs)
    assert mix_in_predictions(inputs, predictions, 1.0).tolist() == [[1, 20, 30, 40, 50]]
    generator = torch.Generator().manual_seed(0)
    half = mix_in_predictions(inputs.repeat(200, 1), predictions.repeat(200, 1), 0.5, generator)
    swapped = (half[:, 1:] != inputs[:, 1:]).float().mean().item()
    assert 0.45 < swapped < 0.55 and torch.all(half[:, 0] == 1)


def test_trainer_with_scheduled_sampling_learns_and_logs(tmp_path):
    pattern = TokenDataset(torch.arange(3, 26).repeat(40), SEQ_LEN)
    trainer = make_trainer(tmp_path, data=pattern, max_steps=16, eval_every=0, scheduled_sampling=0.5)
    trainer.train()
    records = [json.loads(line) for line in Path(tmp_path, "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "eval_loss" not in r]
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"]
    probabilities = [r["own_token_probability"] for r in steps]
    assert probabilities[0] == 0.0 and probabilities == sorted(probabilities) and probabilities[-1] > 0.4
    with pytest.raises(TrainError, match="scheduled_sampling must be in"):
        make_trainer(tmp_path / "bad", scheduled_sampling=1.5)
    with pytest.raises(TrainError, match="not supported with"):
        make_trainer(tmp_path / "bad", scheduled_sampling=0.5, model=factories.tiny_encoder())


def test_pretrain_command_takes_a_curriculum_and_scheduled_sampling(text_model_dir, tmp_path, capsys):
    from genforge.cli import main

    (tmp_path / "corpus.txt").write_text("the key value cache keeps past keys and values so decoding is fast. " * 30)
    args = ["pretrain", "--model", str(text_model_dir), "--text", str(tmp_path / "corpus.txt")]
    args += ["--seq-len", "16", "--batch-size", "2", "--steps", "3", "--warmup", "0", "--eval-every", "0"]
    args += ["--curriculum", "competence", "--scheduled-sampling", "0.3", "--label-smoothing", "0.1"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "trained to step 3" in capsys.readouterr().err
    # A model directory as the difficulty scorer: windows ranked by their loss under it.
    assert main([*args, "--difficulty", str(text_model_dir), "--out", str(tmp_path / "scored")]) == 0
    assert "scoring" in capsys.readouterr().err
    assert main([*args, "--scheduled-sampling", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "scheduled_sampling must be in [0, 1]" in capsys.readouterr().err
