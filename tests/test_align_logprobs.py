"""Completion log-probabilities against the explicit computation (full logits, log_softmax,
gather, mask) and against TRL's `get_batch_logps` on the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_model

from genforge.align.logprobs import completion_logprobs, token_logprobs

SEQ = 10


def _batch(left_padded: bool, seed: int = 0):
    """Four rows of different prompt and completion lengths, padded left or right."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, 5), (4, 3), (1, 1), (3, 7)]  # (prompt, completion) tokens
    input_ids = torch.zeros(len(shapes), SEQ, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    for row, (prompt, answer) in enumerate(shapes):
        start = SEQ - prompt - answer if left_padded else 0
        input_ids[row, start : start + prompt + answer] = torch.randint(3, 64, (prompt + answer,), generator=generator)
        attention[row, start : start + prompt + answer] = 1
        completion[row, start + prompt : start + prompt + answer] = 1
    return input_ids, attention, completion


def _explicit(model, input_ids, attention, completion, temperature: float = 1.0) -> torch.Tensor:
    logits = model(input_ids, attention_mask=attention).logits.float() / temperature
    per_token = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(per_token * completion[:, 1:], (1, 0))


@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("chunk_tokens", [None, 3])
def test_completion_logprobs_equal_the_explicit_computation(left_padded, chunk_tokens):
    model = tiny_model().eval()
    input_ids, attention, completion = _batch(left_padded)
    with torch.no_grad():
        ours = completion_logprobs(model, input_ids, attention, completion, chunk_tokens=chunk_tokens)
        explicit = _explicit(model, input_ids, attention, completion)
    torch.testing.assert_close(ours.per_token, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.sum, explicit.sum(-1), atol=1e-5, rtol=1e-5)
    assert ours.count.tolist() == [5, 3, 1, 7]
    torch.testing.assert_close(ours.mean, explicit.sum(-1) / torch.tensor([5.0, 3.0, 1.0, 7.0]), atol=1e-5, rtol=1e-5)
    assert bool((ours.per_token[completion == 0] == 0).all())


def test_gradients_equal_the_explicit_computation_through_recomputed_chunks():
    torch.manual_seed(1)
    model = tiny_model(seed=1, tie_word_embeddings=True)
    input_ids, attention, completion = _batch(left_padded=False, seed=1)
    completion_logprobs(model, input_ids, attention, completion, chunk_tokens=4).sum.sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    _explicit(model, input_ids, attention, completion).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_equal_trl_get_batch_logps_and_temperature_divides_the_logits():
    pytest.importorskip("trl")
    from trl.trainer.utils import selective_log_softmax

    model = tiny_model(seed=2).eval()
    input_ids, attention, completion = _batch(left_padded=True, seed=2)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention).logits
        for temperature in (1.0, 0.7):
            ours = completion_logprobs(model, input_ids, attention, completion, temperature=temperature)
            theirs = selective_log_softmax(logits[:, :-1], input_ids[:, 1:], temperature=temperature)
            torch.testing.assert_close(ours.per_token[:, 1:], theirs * completion[:, 1:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.per_token, _explicit(model, input_ids, attention, completion, temperature))


def test_token_logprobs_is_log_softmax_at_the_targets():
    torch.manual_seed(3)
    hidden, weight, bias = torch.randn(7, 8), torch.randn(30, 8), torch.randn(30)
    targets = torch.randint(0, 30, (7,))
    expected = torch.log_softmax(hidden @ weight.T + bias, -1)[torch.arange(7), targets]
    torch.testing.assert_close(token_logprobs(hidden, weight, targets, bias, chunk_tokens=2), expected)


def test_bad_masks_are_refused():
    model = tiny_model().eval()
    input_ids, attention, completion = _batch(left_padded=False)
    with pytest.raises(ValueError, match="completion_mask has shape"):
        completion_logprobs(model, input_ids, attention, completion[:, :-1])
    padded_completion = completion.clone()
    padded_completion[0, -1] = 1
    with pytest.raises(ValueError, match="row 0 marks padding"):
        completion_logprobs(model, input_ids, attention, padded_completion)
    first = completion.clone()
    first[2, 0] = 1
    with pytest.raises(ValueError, match="row 2 marks its first token"):
        completion_logprobs(model, input_ids, attention, first)
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, input_ids, attention, completion, temperature=0.0)
