"""Speculative decoding and prompt lookup: greedy output identical to the target alone, the
sampled distribution equal to the target's (chi-square), statistics, bad input."""

import copy

import pytest
import reference_models
import torch
from factories import tiny_model
from scipy.stats import chisquare

from genforge.checkpoint import load_model
from genforge.generate.generator import generate
from genforge.generate.processors import DecodeContext, apply_processors, build_processors
from genforge.generate.sampling import SamplingParams
from genforge.generate.speculative import prompt_lookup_generate, speculative_generate

PROMPT = [5, 9, 33, 12, 7, 9, 40]
GREEDY_64 = SamplingParams(temperature=0, max_new_tokens=64)


@pytest.fixture(scope="module")
def target(hf_model_dir):
    return load_model(hf_model_dir("llama")[1])


@pytest.fixture(scope="module")
def drafts(target, hf_model_dir, tmp_path_factory):
    """Draft models sharing the target's vocabulary: another random Llama (almost never agrees),
    a GPT-2 (another family), and the target with 10% weight noise (agrees most of the time)."""
    directory = tmp_path_factory.mktemp("llama-seed1")
    reference_models.build("llama", seed=1).save_pretrained(directory)
    near = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * p.std() * 0.1)
    return {"other-llama": load_model(directory), "gpt2": load_model(hf_model_dir("gpt2")[1]), "near": near}


def target_greedy(model, params, eos=()):
    return generate(model, [PROMPT], params, eos_token_ids=list(eos))[0]


@pytest.mark.parametrize("draft_name", ["other-llama", "gpt2", "near"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_speculative_decoding_equals_target_greedy(k, draft_name, target, drafts):
    expected = target_greedy(target, GREEDY_64).token_ids
    out = speculative_generate(target, drafts[draft_name], PROMPT, GREEDY_64, num_draft_tokens=k, eos_token_ids=[])
    assert out.token_ids == expected
    assert out.finish_reason == "length"
    stats = out.stats
    # Without an eos every round keeps its accepted drafts plus one target token.
    assert stats.generated == 64 == stats.accepted + stats.target_forwards
    assert stats.accepted <= stats.drafted <= k * stats.target_forwards
    if draft_name == "near":  # both branches, accept and reject, were taken
        assert 0 < stats.acceptance_rate < 1


def test_a_draft_identical_to_the_target_is_always_accepted(target):
    out = speculative_generate(target, target, PROMPT, GREEDY_64, num_draft_tokens=4, eos_token_ids=[])
    assert out.token_ids == target_greedy(target, GREEDY_64).token_ids
    assert out.stats.acceptance_rate == 1.0
    # 12 full rounds of 4 drafts + 1 target token, then a last round limited to the 4 left.
    assert out.stats.target_forwards == 13
    assert out.stats.tokens_per_target_forward == 64 / 13
    assert out.stats.mean_accepted_per_target_forward == 51 / 13


@pytest.mark.parametrize("num_draft_tokens, max_ngram_size, min_ngram_size", [(10, 3, 1), (4, 2, 2), (1, 1, 1)])
def test_greedy_prompt_lookup_equals_target_greedy(num_draft_tokens, max_ngram_size, min_ngram_size, target):
    out = prompt_lookup_generate(
        target,
        PROMPT,
        GREEDY_64,
        num_draft_tokens=num_draft_tokens,
        max_ngram_size=max_ngram_size,
        min_ngram_size=min_ngram_size,
        eos_token_ids=[],
    )
    assert out.token_ids == target_greedy(target, GREEDY_64).token_ids
    assert out.stats.draft_forwards == 0
    assert out.stats.accepted > 0  # random tiny models repeat themselves: lookup finds matches


def test_processors_and_eos_keep_greedy_outputs_identical(target, drafts):
    penalised = SamplingParams(
        temperature=0, max_new_tokens=40, repetition_penalty=1.3, no_repeat_ngram_size=3, logit_bias={7: 2.0}
    )
    expected = target_greedy(target, penalised).token_ids
    assert (
        speculative_generate(target, drafts["near"], PROMPT, penalised, num_draft_tokens=3, eos_token_ids=[]).token_ids
        == expected
    )
    assert prompt_lookup_generate(target, PROMPT, penalised, eos_token_ids=[]).token_ids == expected

    eos = target_greedy(target, GREEDY_64).token_ids[10]
    stopped = target_greedy(target, GREEDY_64, eos=[eos])
    assert stopped.finish_reason == "stop"
    speculative = speculative_generate(
        target, drafts["near"], PROMPT, GREEDY_64, num_draft_tokens=4, eos_token_ids=[eos]
    )
    for out in (speculative, prompt_lookup_generate(target, PROMPT, GREEDY_64, eos_token_ids=[eos])):
        assert out.token_ids == stopped.token_ids
        assert out.finish_reason == "stop"


# ------------------------------------------------------------------ sampled distributions
DRAWS = 4000


def peaked_model(seed):
    """A one-layer model over 8 tokens whose next-token distributions are far from uniform."""
    model = tiny_model(
        seed, vocab_size=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=32
    )
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.4)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_pair():
    return peaked_model(0), peaked_model(1)


def next_token_distribution(model, contexts, params, prompt_length):
    """The processed distribution the plain generator samples from, after each context."""
    processors = build_processors(params, eos_token_ids=[], vocab_size=model.config.vocab_size)
    with torch.inference_mode():
        logits = model(torch.tensor(contexts)).logits[:, -1].float()
    rows = [
        apply_processors(logits[i : i + 1], DecodeContext(torch.tensor([c]), prompt_length), processors)
        for i, c in enumerate(contexts)
    ]
    return torch.softmax(torch.cat(rows), dim=-1).double()


def chi_square_p(tokens, distribution):
    """p-value of `tokens` being drawn from `distribution`; impossible tokens must never occur."""
    counts = torch.bincount(torch.tensor(tokens), minlength=distribution.shape[0]).double()
    possible = distribution > 0
    assert counts[~possible].sum() == 0
    expected = distribution[possible] / distribution[possible].sum() * len(tokens)
    return chisquare(counts[possible].numpy(), expected.numpy()).pvalue


def marginals(model, prompt, params, positions):
    """The exact distribution of each of the first `positions` tokens the target alone would
    sample, by enumerating every prefix of the (8-token) vocabulary."""
    vocab = model.config.vocab_size
    result = []
    prefixes, weights = [[]], torch.ones(1, dtype=torch.float64)  # every prefix and its probability
    for _ in range(positions):
        step = next_token_distribution(model, [prompt + prefix for prefix in prefixes], params, len(prompt))
        result.append(weights @ step)
        weights = (weights[:, None] * step).flatten()
        prefixes = [prefix + [token] for prefix in prefixes for token in range(vocab)]
    return result


@pytest.mark.parametrize(
    "params, draft_confidence",
    [
        (SamplingParams(temperature=1.0, max_new_tokens=3), 0.0),
        (SamplingParams(temperature=0.7, top_k=5, max_new_tokens=3), 0.0),
        (SamplingParams(temperature=1.0, max_new_tokens=3), 0.3),
    ],
    ids=["plain", "temperature-top-k", "dynamic-draft-length"],
)
def test_speculative_sampling_follows_the_target_distribution(params, draft_confidence, tiny_pair, one_thread):
    # k = 2 and 3 tokens: the first round drafts two, so token 1 is an accepted draft or a
    # residual draw, token 2 the same after an acceptance (or a second round's), and token 3
    # the bonus token after two acceptances. With a draft confidence, a round may stop after
    # one draft: where it stops depends on the draft's own draws only, which must not bias
    # the output.
    target, draft = tiny_pair
    prompt = [1, 5, 2, 7, 1, 5]
    drawn = []
    for seed in range(DRAWS):
        params.seed = seed
        drawn.append(
            speculative_generate(
                target, draft, prompt, params, num_draft_tokens=2, draft_confidence=draft_confidence, eos_token_ids=[]
            ).token_ids
        )
    for position, expected in enumerate(marginals(target, prompt, params, 3)):
        assert chi_square_p([tokens[position] for tokens in drawn], expected) > 0.001, position
    # The test has the power to tell the draft's distribution apart.
    q_first = next_token_distribution(draft, [prompt], params, len(prompt))[0]
    first = [tokens[0] for tokens in drawn]
    assert chi_square_p([t for t in first if q_first[t] > 0], q_first) < 0.001


def test_prompt_lookup_sampling_follows_the_target_distribution(tiny_pair, one_thread):
    target, _ = tiny_pair
    prompt = [1, 5, 2, 7, 1, 5]  # ends on "1 5": the lookup drafts "2 7"
    params = SamplingParams(temperature=1.0, max_new_tokens=3)
    first = []
    drafted = 0
    for seed in range(DRAWS // 2):
        params.seed = seed
        out = prompt_lookup_generate(target, prompt, params, num_draft_tokens=2, eos_token_ids=[])
        first.append(out.token_ids[0])
        drafted += out.stats.drafted
    assert drafted > 0
    assert chi_square_p(first, next_token_distribution(target, [prompt], params, len(prompt))[0]) > 0.001


def test_sampling_is_reproducible_with_a_seed(target, drafts):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_new_tokens=24)
    first = speculative_generate(target, drafts["near"], PROMPT, params, eos_token_ids=[])
    again = speculative_generate(target, drafts["near"], PROMPT, params, eos_token_ids=[])
    assert first.token_ids == again.token_ids
    params.seed = 12
    assert speculative_generate(target, drafts["near"], PROMPT, params, eos_token_ids=[]).token_ids != first.token_ids


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_draft_tokens=0), "num_draft_tokens must be an integer >= 1"),
        (dict(num_draft_tokens=2.5), "num_draft_tokens must be an integer >= 1"),
        (dict(prompt_ids=[[3, 4], [5, 6]]), "one prompt at a time, got a batch of 2"),
        (dict(prompt_ids=[3, 400]), "outside the vocabulary"),
        (dict(prompt_ids=[]), "no prompts given"),
        (dict(params=SamplingParams(stop=["x"])), "stop strings need a tokenizer"),
        (dict(params=SamplingParams(max_new_tokens=300)), "exceeds the target model's context of 256"),
        (dict(eos_token_ids=[99]), r"eos/stop token ids \[99\] are outside the vocabulary"),
        (dict(params=dict(temperature=0)), "params must be a SamplingParams"),
    ],
)
def test_bad_requests_are_rejected_before_any_work(kwargs, message, target, drafts):
    arguments = dict(prompt_ids=PROMPT, params=GREEDY_64) | kwargs
    with pytest.raises(ValueError, match=message):
        speculative_generate(target, drafts["near"], **arguments)
    if "num_draft_tokens" not in kwargs:  # the prompt-lookup default is valid
        with pytest.raises(ValueError, match=message):
            prompt_lookup_generate(target, **arguments)


def test_draft_models_that_cannot_serve_the_target_are_rejected(target, tiny_pair):
    with pytest.raises(ValueError, match=r"draft model's vocabulary \(8 tokens\) differs from the target's \(96\)"):
        speculative_generate(target, tiny_pair[0], PROMPT, GREEDY_64)
    short = copy.deepcopy(target)
    short.config = copy.copy(target.config)
    short.config.max_position_embeddings = 32
    with pytest.raises(ValueError, match="exceeds the draft model's context of 32"):
        speculative_generate(target, short, PROMPT, GREEDY_64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_ngram_size=0), "max_ngram_size must be an integer >= 1"),
        (dict(max_ngram_size=2, min_ngram_size=3), r"min_ngram_size \(3\) must not exceed max_ngram_size \(2\)"),
    ],
)
def test_bad_lookup_sizes_are_rejected(kwargs, message, target):
    with pytest.raises(ValueError, match=message):
        prompt_lookup_generate(target, PROMPT, GREEDY_64, **kwargs)


def test_stop_strings_cut_text_and_stop_like_generate(text_model_dir):
    from genforge.tokenizer import Tokenizer

    model, tokenizer = load_model(text_model_dir), Tokenizer.from_dir(text_model_dir)
    prompt = tokenizer.encode("the weather today is", add_special_tokens=False)
    free = generate(
        model, [prompt], SamplingParams(temperature=0, max_new_tokens=24), tokenizer=tokenizer, eos_token_ids=[]
    )[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    params = SamplingParams(temperature=0, max_new_tokens=24, stop=[stop])
    expected = generate(model, [prompt], params, tokenizer=tokenizer, eos_token_ids=[])[0]
    for out in (
        speculative_generate(model, copy.deepcopy(model), prompt, params, tokenizer=tokenizer, eos_token_ids=[]),
        prompt_lookup_generate(model, prompt, params, tokenizer=tokenizer, eos_token_ids=[]),
    ):
        assert out.finish_reason == "stop" and out.text == expected.text == free.text[: free.text.index(stop)]
        assert out.token_ids == expected.token_ids


def test_processors_see_each_position_context():
    """Row i of the target's k + 1 positions continues the context plus the first i drafts, and
    the draft model's single position continues all drafts so far: a presence penalty must
    push down exactly the tokens of that row's context."""
    from genforge.generate.speculative import _TokenRule

    params = SamplingParams(temperature=1.0, presence_penalty=1.0)
    rule = _TokenRule(params, build_processors(params, vocab_size=8), prompt_length=1, device=torch.device("cpu"))
    tokens, drafts = torch.tensor([1]), [2, 3]
    target_rows = rule.process(torch.zeros(3, 8), tokens, drafts)
    penalised = [set(torch.nonzero(row < 0).flatten().tolist()) for row in target_rows]
    assert penalised == [set(), {2}, {2, 3}]  # the prompt (token 1) is not penalised
    (draft_row,) = rule.process(torch.zeros(1, 8), tokens, drafts)
    assert set(torch.nonzero(draft_row < 0).flatten().tolist()) == {2, 3}


def test_draft_confidence_shortens_rounds_without_changing_greedy_output(target, drafts):
    expected = target_greedy(target, GREEDY_64).token_ids
    # The median confidence of the draft's greedy choices along the output: about half the
    # drafts fall below it, so rounds of every length occur.
    with torch.inference_mode():
        logits = drafts["near"](torch.tensor([PROMPT + expected])).logits[0, len(PROMPT) - 1 :].float()
    median = float(torch.softmax(logits, dim=-1).max(dim=-1).values.median())
    always = speculative_generate(target, drafts["near"], PROMPT, GREEDY_64, num_draft_tokens=4, eos_token_ids=[])
    unsure = speculative_generate(
        target, drafts["near"], PROMPT, GREEDY_64, num_draft_tokens=4, draft_confidence=median, eos_token_ids=[]
    )
    # A probability is never above 1: every round stops after its first draft.
    single = speculative_generate(
        target, drafts["near"], PROMPT, GREEDY_64, num_draft_tokens=4, draft_confidence=1.0, eos_token_ids=[]
    )
    assert always.token_ids == unsure.token_ids == single.token_ids == expected
    assert single.stats.drafted == single.stats.draft_forwards == single.stats.target_forwards
    assert single.stats.drafted < unsure.stats.drafted < always.stats.drafted
    sampled = speculative_generate(
        target,
        drafts["near"],
        PROMPT,
        SamplingParams(temperature=1.0, seed=3, max_new_tokens=32),
        num_draft_tokens=4,
        draft_confidence=1.0,
        eos_token_ids=[],
    )
    assert sampled.stats.drafted == sampled.stats.target_forwards


@pytest.mark.parametrize("value", [-0.1, 1.5, "high", True])
def test_bad_draft_confidence_is_rejected(value, target, drafts):
    with pytest.raises(ValueError, match=r"draft_confidence must be a probability in \[0, 1\]"):
        speculative_generate(target, drafts["near"], PROMPT, GREEDY_64, draft_confidence=value)
