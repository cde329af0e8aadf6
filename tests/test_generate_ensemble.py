"""Decode-time ensembling (genforge.generate.ensemble): the processor's mixture equals the
mixture computed from scratch on the whole prefix at every step, a model ensembled with itself
decodes as it does alone, and each step runs one new token through each other model."""

import pytest
import torch
from factories import tiny_model

from genforge.generate.beam import beam_search
from genforge.generate.ensemble import EnsembleError, ModelEnsemble, ensemble_generate
from genforge.generate.generator import generate
from genforge.generate.processors import DecodeContext
from genforge.generate.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 3, 44, 9], [7, 21], [30, 2, 2, 61]]  # different lengths: left padding


class Recorder:
    """A processor that keeps each step's context and logits (placed after the ensemble)."""

    def __init__(self):
        self.steps = []

    def __call__(self, logits, ctx):
        self.steps.append((ctx.input_ids.clone(), ctx.attention_mask.clone(), logits.clone()))
        return logits


def full_prefix_log_probs(model, ids, mask):
    """The model's next-token log-probabilities computed on the whole prefix, no cache."""
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, -1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def models():
    return tiny_model(1).eval(), tiny_model(2).eval(), tiny_model(3).eval()


@pytest.mark.parametrize("average", ["probability", "log_probability"])
def test_the_mixture_equals_a_direct_computation_at_every_step(average, models):
    first, second, third = models
    weights = (1.0, 3.0, 2.0)
    recorder = Recorder()
    ensemble = ModelEnsemble([first, second, third], weights, average)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4)
    generate(first, PROMPTS, params, extra_processors=[ensemble, recorder])
    assert len(recorder.steps) == 8
    share = torch.tensor(weights) / 6
    for ids, mask, got in recorder.steps:
        parts = torch.stack([full_prefix_log_probs(m, ids, mask) for m in (first, second, third)])
        if average == "probability":
            expected = torch.log((parts.exp() * share.view(-1, 1, 1)).sum(0))
        else:
            expected = torch.log_softmax((parts * share.view(-1, 1, 1)).sum(0), dim=-1)
        assert (got - expected).abs().max() < 1e-5
    # The ensemble did choose differently from the first model alone (the test can fail).
    alone = generate(first, PROMPTS, params)
    assert [c.token_ids for c in alone] != [
        c.token_ids for c in generate(first, PROMPTS, params, extra_processors=[ensemble])
    ]


@pytest.mark.parametrize("average", ["probability", "log_probability"])
def test_a_model_ensembled_with_itself_decodes_as_alone(average, models):
    model = models[0]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    alone, together = Recorder(), Recorder()
    expected = generate(model, PROMPTS, greedy, extra_processors=[alone])
    got = generate(model, PROMPTS, greedy, extra_processors=[ModelEnsemble([model, model], (2, 5), average), together])
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for (_, _, plain), (_, _, mixed) in zip(alone.steps, together.steps, strict=True):
        assert (mixed - torch.log_softmax(plain, dim=-1)).abs().max() < 1e-5
    assert [c.token_ids for c in ensemble_generate([model, model], PROMPTS, greedy)] == [c.token_ids for c in expected]


def test_each_step_runs_one_new_token_through_each_other_model(models):
    first, second, _ = models
    fed = []
    hook = second.register_forward_pre_hook(lambda module, args, kwargs: fed.append(args[0].shape), with_kwargs=True)
    try:
        generate(
            first,
            PROMPTS,
            SamplingParams(max_new_tokens=6, temperature=0.0),
            extra_processors=[ModelEnsemble([first, second])],
        )
    finally:
        hook.remove()
    assert fed[0] == (3, 5)  # the prompts once
    assert fed[1:] == [(3, 1)] * 5  # then one token per row and step


def test_rows_that_leave_or_reorder_reuse_their_cache_and_stay_exact(models):
    first, second, _ = models
    ensemble = ModelEnsemble([first, second], (1, 1))
    ids = torch.tensor([[0, 0, 5, 17, 3], [7, 21, 30, 2, 9], [0, 4, 4, 8, 1]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0], [1]])).long()

    def step(ids, mask):
        logits = full_prefix_log_probs(first, ids, mask)
        got = ensemble(logits, DecodeContext(ids, 3, mask))
        expected = torch.logsumexp(
            torch.stack([logits, full_prefix_log_probs(second, ids, mask)]) + torch.tensor(0.5).log(), dim=0
        )
        assert (got - expected).abs().max() < 1e-5

    fed = []
    hook = second.register_forward_pre_hook(
        # Only the ensemble's calls (with a cache), not this test's full-prefix references.
        lambda module, args, kwargs: fed.append(tuple(args[0].shape)) if kwargs.get("cache") else None,
        with_kwargs=True,
    )
    try:
        step(ids, mask)
        # Row 1 finished and left; rows 2 and 0 swapped (as beams reorder); a new token each.
        ids = torch.cat([ids[[2, 0]], torch.tensor([[11], [12]])], dim=1)
        mask = torch.cat([mask[[2, 0]], torch.ones(2, 1, dtype=torch.long)], dim=1)
        step(ids, mask)
        # A rollback of two positions (speculative decoding) and another token.
        ids = torch.cat([ids[:, :4], torch.tensor([[13], [14]])], dim=1)
        step(ids, mask[:, :5])
        # A context that shares nothing starts over.
        step(torch.tensor([[9, 9, 9]]), None)
    finally:
        hook.remove()
    assert fed == [(3, 5), (2, 1), (2, 1), (1, 3)]


def test_beam_search_over_a_self_ensemble_equals_plain_beam_search(models):
    model = models[0]
    expected = beam_search(model, PROMPTS[:2], num_beams=3, max_new_tokens=6, eos_token_ids=[])
    got = beam_search(
        model, PROMPTS[:2], num_beams=3, max_new_tokens=6, eos_token_ids=[], processors=[ModelEnsemble([model, model])]
    )
    assert [[h.token_ids for h in hs] for hs in got] == [[h.token_ids for h in hs] for hs in expected]


def test_weights_are_positive_and_normalised(models):
    first, second, _ = models
    assert ModelEnsemble([first, second], (2, 6)).weights == (0.25, 0.75)
    assert ModelEnsemble([first, second]).weights == (0.5, 0.5)
    for weights in ((1.0, 0.0), (1.0, -2.0), (1.0, float("inf")), (True, 1.0)):
        with pytest.raises(EnsembleError, match="positive numbers"):
            ModelEnsemble([first, second], weights)
    with pytest.raises(EnsembleError, match="3 weight\\(s\\) for 2 models"):
        ModelEnsemble([first, second], (1, 1, 1))
    with pytest.raises(EnsembleError, match="at least two models"):
        ModelEnsemble([first])
    with pytest.raises(EnsembleError, match="accepted: probability, log_probability"):
        ModelEnsemble([first, second], average="mean")


def test_a_vocabulary_mismatch_is_refused_with_both_sizes(models):
    first = models[0]
    with pytest.raises(EnsembleError) as caught:
        ModelEnsemble([first, tiny_model(vocab_size=80)])
    assert "vocabulary of 80 tokens but the decoding model has 64" in str(caught.value)
    ensemble = ModelEnsemble([first, models[1]])
    with pytest.raises(EnsembleError, match="the logits have 80 columns .* vocabulary of 64"):
        ensemble(torch.zeros(1, 80), DecodeContext(torch.tensor([[1, 2]]), 2))


def test_a_ban_from_an_earlier_processor_stays(models):
    first, second, _ = models
    ids = torch.tensor([[3, 4, 5]])
    logits = full_prefix_log_probs(first, ids, None)
    logits[0, 7] = float("-inf")
    out = ModelEnsemble([first, second])(logits, DecodeContext(ids, 3))
    assert out[0, 7] == float("-inf") and torch.isfinite(out[0, :7]).all()


def test_cli_ensemble_of_two_models_equals_the_library_ensemble(tmp_path, capsys):
    """`genforge generate --model A --ensemble B`: greedy tokens of the probability mixture,
    as `ensemble_generate` gives them; the flags are checked before anything loads."""
    import json

    from finetune_shared import tiny_chat_model_dir

    from genforge.cli import main
    from genforge.loading import load_for_inference

    first = tiny_chat_model_dir(tmp_path / "a", seed=0)
    second = tiny_chat_model_dir(tmp_path / "b", seed=3)
    argv = ["generate", "--model", str(first), "--ensemble", str(second), "--prompt", "What is", "--prompt", "Name"]
    assert main(argv + ["--temperature", "0", "--max-new-tokens", "5", "--ensemble-weights", "2", "1"]) == 0
    texts = [json.loads(line)["completion"] for line in capsys.readouterr().out.strip().splitlines()]
    a, b = load_for_inference(first), load_for_inference(second)
    prompts = [a.tokenizer.encode(p) for p in ("What is", "Name")]
    params = SamplingParams(temperature=0, max_new_tokens=5)
    expected = ensemble_generate([a.model, b.model], prompts, params, weights=[2, 1], tokenizer=a.tokenizer)
    assert texts == [c.text for c in expected]
    assert main(argv + ["--ensemble-weights", "1"]) == 2
    assert "one weight for --model and one per --ensemble model (2), got 1" in capsys.readouterr().err
