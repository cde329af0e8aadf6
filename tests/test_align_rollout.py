"""Rollouts: batched samples laid out as right-padded prompt + completion rows whose scores
equal scoring each row on its own."""

from __future__ import annotations

import pytest
import torch

from genforge.align.logprobs import completion_logprobs
from genforge.align.rollout import generate_rollout, score_rollout
from genforge.generate.sampling import SamplingParams


def test_rollout_rows_hold_their_prompt_and_completion(bpe_model, bpe_tokenizer):
    model = bpe_model
    prompts = [bpe_tokenizer.encode("def f(x):"), bpe_tokenizer.encode("import json\n")]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    rollout = generate_rollout(model, bpe_tokenizer, prompts, 3, params)
    assert rollout.rows == 6 and rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    for row in range(rollout.rows):
        prompt = prompts[int(rollout.prompt_index[row])]
        length = int(rollout.attention_mask[row].sum())
        ids = rollout.sequences[row, :length].tolist()
        assert ids == prompt + rollout.completions[row]
        assert rollout.completion_mask[row].tolist() == [0] * len(prompt) + [1] * len(rollout.completions[row]) + [
            0
        ] * (rollout.sequences.shape[1] - length)
        assert 1 <= len(rollout.completions[row]) <= 6
    # Sampled, not copied: a shared prompt gives differing rows.
    assert len({tuple(c) for c in rollout.completions}) > 2

    scored = score_rollout(model, rollout, batch_size=4)
    for row in range(rollout.rows):
        one = rollout.select([row])
        alone = completion_logprobs(model.eval(), one.sequences, one.attention_mask, one.completion_mask)
        torch.testing.assert_close(scored.sum[row], alone.sum[0].detach(), atol=1e-5, rtol=1e-5)
    assert scored.count.tolist() == [len(c) for c in rollout.completions]


def test_rollout_refuses_what_it_cannot_sample(bpe_model, bpe_tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_rollout(bpe_model, bpe_tokenizer, [[5, 6]], 2, SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        generate_rollout(bpe_model, bpe_tokenizer, [[]], 2, SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="samples_per_prompt"):
        generate_rollout(bpe_model, bpe_tokenizer, [[5]], 0, SamplingParams(max_new_tokens=3))
