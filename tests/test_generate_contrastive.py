"""Contrastive search and contrastive decoding: the scoring functions on hand-computed cases,
alpha = 0 (or 1) reducing to greedy, token parity with a cache-free reference loop on the
transformers models, batching, eos, and bad input.

transformers 5.23 no longer ships contrastive search in the library: `generate(penalty_alpha=
..., top_k=...)` now loads it from the hub repo "transformers-community/contrastive-search",
which is not reachable offline. The reference here is therefore a plain loop written in the
test from the paper's formula, run on the transformers model with no KV cache."""

import copy
import math

import pytest
import torch
from torch import nn

from genforge.checkpoint import load_model
from genforge.config import Config
from genforge.generate.contrastive import (
    contrastive_decoding,
    contrastive_decoding_scores,
    contrastive_search,
    contrastive_search_scores,
)
from genforge.generate.generator import generate
from genforge.generate.processors import LogitBias
from genforge.generate.sampling import SamplingParams
from genforge.model import Transformer

PROMPTS = [[5, 9, 33, 12, 7, 9, 40], [17, 3, 88], [60, 61, 62, 63, 2, 44, 45, 8, 9, 10]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(hf_model_dir):
    hf, directory = hf_model_dir("llama")
    return hf, load_model(directory)


@pytest.fixture(scope="module")
def gpt2(hf_model_dir):
    hf, directory = hf_model_dir("gpt2")
    return hf, load_model(directory)


def greedy(model, prompts, new_tokens, eos=()):
    return [
        c.token_ids
        for c in generate(
            model, prompts, SamplingParams(temperature=0, max_new_tokens=new_tokens), eos_token_ids=list(eos)
        )
    ]


# ---------------------------------------------------------------------- contrastive search: math
def test_contrastive_search_scores_on_a_hand_computed_case():
    # Context states e1 and e2. Candidate 0 repeats e1 (max cos 1), candidate 1 points away
    # from both (max cos -1/sqrt 2), candidate 2 = (0.6, 0.8) (max cos 0.8).
    context = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    candidates = torch.tensor([[[2.0, 0.0], [-1.0, -1.0], [0.6, 0.8]]])
    probs = torch.tensor([[0.55, 0.35, 0.10]])
    scores = contrastive_search_scores(probs, candidates, context, 0.5)
    expected = [0.5 * 0.55 - 0.5 * 1.0, 0.5 * 0.35 + 0.5 / math.sqrt(2), 0.5 * 0.10 - 0.5 * 0.8]
    assert scores[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert scores.argmax().item() == 1  # greedy would take candidate 0
    assert contrastive_search_scores(probs, candidates, context, 0.0).argmax().item() == 0
    # Masking e1 out (padding) leaves e2 only: candidate 0 is now orthogonal to the context.
    masked = contrastive_search_scores(probs, candidates, context, 0.5, torch.tensor([[False, True]]))
    assert masked[0].tolist() == pytest.approx([0.275, 0.175 + 0.5 / math.sqrt(2), 0.05 - 0.4], abs=1e-6)
    # A candidate of probability 0 (banned by a processor) can never win on dissimilarity.
    zero = contrastive_search_scores(torch.tensor([[0.9, 0.0]]), candidates[:, 1:], context, 0.99)
    assert zero[0, 1] == float("-inf")


def reference_contrastive_search(hf, prompt, alpha, k, new_tokens):
    """Su et al.'s rule on the transformers model, recomputing everything each step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            out = hf(torch.tensor([ids]), output_hidden_states=True)
            context = out.hidden_states[-1][0]  # final, normed hidden states of every token
            top_probs, top_ids = torch.softmax(out.logits[0, -1], dim=-1).topk(k)
            rows = torch.tensor([ids + [t] for t in top_ids.tolist()])
            candidates = hf(rows, output_hidden_states=True).hidden_states[-1][:, -1]
            similarity = torch.cosine_similarity(candidates[:, None, :], context[None, :, :], dim=-1).amax(dim=-1)
            ids.append(top_ids[((1 - alpha) * top_probs - alpha * similarity).argmax()].item())
    return ids[len(prompt) :]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_contrastive_search_matches_a_cache_free_reference_on_transformers(family, llama, gpt2):
    hf, model = {"llama": llama, "gpt2": gpt2}[family]
    for alpha, k in [(0.6, 4), (0.3, 6)]:
        ours = contrastive_search(model, PROMPTS, alpha, k, 16, eos_token_ids=[])  # one left-padded batch
        for prompt, completion in zip(PROMPTS, ours):
            assert completion.token_ids == reference_contrastive_search(hf, prompt, alpha, k, 16)
            assert completion.finish_reason == "length"


def test_contrastive_search_with_alpha_zero_is_greedy(llama):
    _, model = llama
    ours = contrastive_search(model, PROMPTS, 0.0, 5, 40, eos_token_ids=[])
    assert [c.token_ids for c in ours] == greedy(model, PROMPTS, 40)
    # The penalty really changes the output (the tiny random model repeats itself greedily).
    penalised = contrastive_search(model, PROMPTS, 0.6, 5, 40, eos_token_ids=[])
    assert [c.token_ids for c in penalised] != greedy(model, PROMPTS, 40)


def test_contrastive_search_stops_rows_at_eos_and_applies_processors(llama):
    _, model = llama
    free = contrastive_search(model, PROMPTS, 0.6, 4, 20, eos_token_ids=[])
    eos = free[1].token_ids[5]
    stopped = contrastive_search(model, PROMPTS, 0.6, 4, 20, eos_token_ids=[eos])
    for before, after in zip(free, stopped):
        end = before.token_ids.index(eos) + 1 if eos in before.token_ids else 20
        assert after.token_ids == before.token_ids[:end]
        assert after.finish_reason == ("stop" if eos in before.token_ids else "length")
    # Only 6 tokens survive the bias but top_k is 8: the zero-probability candidates must lose.
    allowed = set(range(90, 96))
    banned = contrastive_search(
        model, PROMPTS, 0.9, 8, 12, eos_token_ids=[], processors=[LogitBias.ban(range(90), vocab_size=96)]
    )
    assert all(set(c.token_ids) <= allowed for c in banned)


def test_contrastive_search_rejects_bad_arguments(llama):
    _, model = llama
    with pytest.raises(ValueError, match=r"penalty_alpha must be a number in \[0, 1\]"):
        contrastive_search(model, PROMPTS, 1.5, 4, 8)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 96\]"):
        contrastive_search(model, PROMPTS, 0.6, 0, 8)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        contrastive_search(model, PROMPTS, 0.6, 4, 0)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        contrastive_search(model, PROMPTS, 0.6, 4, 250)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        contrastive_search(model, [[1, 500]], 0.6, 4, 8)


# -------------------------------------------------------------------- contrastive decoding: math
def test_contrastive_decoding_scores_on_a_hand_computed_case():
    expert = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    amateur = torch.tensor([[0.6, 0.1, 0.2, 0.1]]).log()
    # alpha 0.25: the head is p >= 0.125, tokens 0-2; token 3 is out however the amateur rates it.
    scores = contrastive_decoding_scores(expert, amateur, alpha=0.25)
    assert scores[0, :3].tolist() == pytest.approx([math.log(0.5 / 0.6), math.log(3.0), math.log(0.75)], abs=1e-6)
    assert scores[0, 3] == float("-inf")
    assert scores.argmax().item() == 1  # greedy on the expert would say 0
    # alpha 1 keeps only the expert's top token; alpha 0 keeps every token of nonzero probability.
    only_top = contrastive_decoding_scores(expert, amateur, alpha=1.0)
    assert torch.isfinite(only_top).tolist() == [[True, False, False, False]]
    assert torch.isfinite(contrastive_decoding_scores(expert, amateur, alpha=0.0)).all()
    # Amateur temperature 0.5 squares and renormalises its probabilities.
    sharpened = torch.tensor([0.36, 0.01, 0.04, 0.01]) / 0.42
    scores = contrastive_decoding_scores(expert, amateur, alpha=0.25, amateur_temperature=0.5)
    expected = (torch.tensor([0.5, 0.3, 0.15]) / sharpened[:3]).log()
    assert scores[0, :3].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    # A token the expert gives probability 0 is never in the head, even with alpha = 0.
    expert_zero = torch.tensor([[0.0, 1.0, float("-inf")]])
    assert contrastive_decoding_scores(expert_zero, torch.zeros(1, 3), alpha=0.0)[0, 2] == float("-inf")


def reference_contrastive_decoding(expert, amateur, prompt, alpha, new_tokens):
    """The objective in probability space, recomputed from scratch every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            p_expert = torch.softmax(expert(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            p_amateur = torch.softmax(amateur(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            plausible = p_expert >= alpha * p_expert.max()
            ids.append(torch.where(plausible, (p_expert / p_amateur).log(), -math.inf).argmax().item())
    return ids[len(prompt) :]


def test_contrastive_decoding_matches_a_cache_free_reference(llama, gpt2):
    (hf_expert, expert), (hf_amateur, amateur) = llama, gpt2
    ours = contrastive_decoding(expert, amateur, PROMPTS, alpha=0.1, max_new_tokens=16, eos_token_ids=[])
    for prompt, completion in zip(PROMPTS, ours):
        assert completion.token_ids == reference_contrastive_decoding(hf_expert, hf_amateur, prompt, 0.1, 16)
    assert [c.token_ids for c in ours] != greedy(expert, PROMPTS, 16)


def test_contrastive_decoding_reduces_to_greedy(llama, gpt2):
    _, expert = llama
    _, amateur = gpt2
    # A uniform amateur subtracts the same constant from every token: greedy on the expert.
    uniform = copy.deepcopy(expert)
    uniform.lm_head = nn.Linear(expert.config.hidden_size, expert.config.vocab_size, bias=False)
    nn.init.zeros_(uniform.lm_head.weight)
    expected = greedy(expert, PROMPTS, 24)
    out = contrastive_decoding(expert, uniform, PROMPTS, alpha=0.1, max_new_tokens=24, eos_token_ids=[])
    assert [c.token_ids for c in out] == expected
    # alpha = 1 leaves only the expert's top token, whatever the amateur.
    out = contrastive_decoding(expert, amateur, PROMPTS, alpha=1.0, max_new_tokens=24, eos_token_ids=[])
    assert [c.token_ids for c in out] == expected


def test_sampled_contrastive_decoding_stays_in_the_plausible_head(llama, gpt2):
    (_, expert), (_, amateur) = llama, gpt2
    first = contrastive_decoding(
        expert, amateur, PROMPTS, alpha=0.2, max_new_tokens=20, temperature=1.0, seed=3, eos_token_ids=[]
    )
    again = contrastive_decoding(
        expert, amateur, PROMPTS, alpha=0.2, max_new_tokens=20, temperature=1.0, seed=3, eos_token_ids=[]
    )
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    for prompt, completion in zip(PROMPTS, first):
        with torch.no_grad():  # one forward over the whole text gives every step's distribution
            logits = expert(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1 : -1]
        probs = torch.softmax(logits, dim=-1)
        chosen = probs.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
        assert (chosen >= 0.2 * probs.amax(dim=-1) - 1e-6).all()


def test_contrastive_decoding_stops_at_eos(llama, gpt2):
    (_, expert), (_, amateur) = llama, gpt2
    free = contrastive_decoding(expert, amateur, PROMPTS, max_new_tokens=16, eos_token_ids=[])
    eos = free[0].token_ids[4]
    stopped = contrastive_decoding(expert, amateur, PROMPTS, max_new_tokens=16, eos_token_ids=[eos])
    for before, after in zip(free, stopped):
        end = before.token_ids.index(eos) + 1 if eos in before.token_ids else 16
        assert after.token_ids == before.token_ids[:end]
    assert stopped[0].finish_reason == "stop"


def test_contrastive_decoding_rejects_bad_arguments(llama):
    _, expert = llama
    other_vocab = Transformer(
        Config(
            family="llama",
            vocab_size=100,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(ValueError, match="expert's vocabulary has 96 tokens but the amateur's has 100"):
        contrastive_decoding(expert, other_vocab, PROMPTS)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        contrastive_decoding(expert, expert, PROMPTS, alpha=-0.1)
    with pytest.raises(ValueError, match="amateur_temperature must be a finite number > 0"):
        contrastive_decoding(expert, expert, PROMPTS, amateur_temperature=0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        contrastive_decoding(expert, expert, PROMPTS, temperature=-1)
    short = Transformer(
        Config(
            family="llama",
            vocab_size=96,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    )
    with pytest.raises(ValueError, match="exceeds the amateur's context of 32"):
        contrastive_decoding(expert, short, PROMPTS, max_new_tokens=30)
    with pytest.raises(ValueError, match="expert and amateur logits must both be"):
        contrastive_decoding_scores(torch.zeros(1, 5), torch.zeros(1, 6))
